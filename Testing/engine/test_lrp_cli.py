"""LRP, gxi and IG through the engine and the CLI: sliding-window segmenters and MONAI bundles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from support import blob_volume, oblique_geometry, save_spec_model
from xaioverlay.cli import main
from xaioverlay.explain import explain
from xaioverlay.models import load_model
from xaioverlay.prediction import predict
from xaioverlay.targets import resolve_target
from xaioverlay.volumes import Geometry, write_volume

BN_UNET = {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
                                    "strides": [2, 2], "num_res_units": 1, "norm": "batch"}}


def test_windowed_lrp0_and_gxi_equal_the_gradient_through_monai_sliding_window_inference(tmp_path):
    spec = save_spec_model(tmp_path / "unet", BN_UNET, task="segmentation", class_names=["background", "tumour"],
                           sliding_window={"roi_size": [16, 16, 16], "overlap": 0.25, "mode": "gaussian"})
    model = load_model(spec, device="cpu")
    for module in model.network.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 1.5)
    geometry = Geometry((28, 22, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    volume = blob_volume(geometry, geometry.ijk_to_ras_points([[12, 10, 8]])[0], 5.0, noise=0.2)
    spec_text = "channel:tumour@point:" + ",".join(f"{v:.1f}" for v in geometry.ijk_to_ras_points([[12, 10, 8]])[0]) + ",6"
    explanation = explain(model, [volume], ["lrp:zero", "gxi", "lrp"], spec_text)
    results = {r.spec: r for r in explanation.results}
    assert results["lrp:zero"].parameters["windows"]["used"] > 1  # really window by window

    # reference: the gradient of the same target through MONAI's own sliding-window inference
    model_input = model.preprocess([volume])
    target = resolve_target(spec_text, model, model_input, predict(model, model_input.tensor))
    x = model_input.tensor.clone().requires_grad_(True)
    window = model.sliding_window
    out = sliding_window_inference(x, window.roi_size, 1, model.network, overlap=window.overlap, mode=window.mode,
                                   sigma_scale=window.sigma_scale)
    (grad,) = torch.autograd.grad(target(out).sum(), x)
    reference = (x * grad).detach()[0, 0]
    for spec in ("lrp:zero", "gxi"):
        difference = (results[spec].model_grid_map - reference).abs().max() / reference.abs().max()
        assert float(difference) <= 1e-5, spec

    # the relevance explained, summed over windows, is the target's value on the whole volume
    for spec in ("lrp:zero", "lrp"):
        conservation = results[spec].extras["conservation"]
        assert conservation["output_relevance"] == pytest.approx(explanation.target["value"], rel=1e-4)
        assert conservation["input_relevance"] == pytest.approx(float(results[spec].model_grid_map.sum()), rel=1e-4)


@pytest.mark.parametrize("baseline", ["mean", "blurred"])
def test_windowed_ig_uses_the_whole_volumes_baseline_and_equals_ig_through_monai_sliding_window_inference(tmp_path, baseline):
    from xaioverlay.methods.gradients import make_baseline

    spec = save_spec_model(tmp_path / "unet", BN_UNET, task="segmentation", class_names=["background", "tumour"],
                           sliding_window={"roi_size": [16, 16, 16], "overlap": 0.25, "mode": "gaussian"})
    model = load_model(spec, device="cpu")
    geometry = Geometry((28, 22, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    volume = blob_volume(geometry, geometry.ijk_to_ras_points([[12, 10, 8]])[0], 5.0, noise=0.2)
    spec_text = "channel:tumour@point:" + ",".join(f"{v:.1f}" for v in geometry.ijk_to_ras_points([[12, 10, 8]])[0]) + ",6"
    steps = 8
    result = explain(model, [volume], [f"ig:{steps}/{baseline}"], spec_text).results[0]
    assert result.parameters["windows"]["used"] > 1

    # reference: IG with the same quadrature, every step through MONAI's own sliding-window inference
    from xaioverlay.methods.gradients import gauss_legendre

    model_input = model.preprocess([volume])
    target = resolve_target(spec_text, model, model_input, predict(model, model_input.tensor))
    x = model_input.tensor
    start = make_baseline(x, baseline)  # the whole volume's baseline, not each window's
    window = model.sliding_window
    nodes, weights = gauss_legendre(steps)
    total = torch.zeros_like(x)
    for alpha, weight in zip(nodes, weights):
        point = (start + float(alpha) * (x - start)).requires_grad_(True)
        out = sliding_window_inference(point, window.roi_size, 1, model.network, overlap=window.overlap, mode=window.mode,
                                       sigma_scale=window.sigma_scale)
        (grad,) = torch.autograd.grad(target(out).sum(), point)
        total += float(weight) * grad
    reference = ((x - start) * total)[0].sum(0)
    difference = (result.model_grid_map - reference).abs().max() / reference.abs().max()
    assert float(difference) <= 1e-4


def test_probability_targets_are_refused_for_window_by_window_methods(tmp_path):
    from xaioverlay.errors import InputError

    spec = save_spec_model(tmp_path / "unet", BN_UNET, task="segmentation", class_names=["background", "tumour"],
                           sliding_window={"roi_size": [16, 16, 16], "overlap": 0.25})
    model = load_model(spec, device="cpu")
    geometry = Geometry((28, 22, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    volume = blob_volume(geometry, geometry.ijk_to_ras_points([[12, 10, 8]])[0], 5.0, noise=0.2)
    spec_text = "channel:tumour@point:" + ",".join(f"{v:.1f}" for v in geometry.ijk_to_ras_points([[12, 10, 8]])[0]) + ",6"
    with pytest.raises(InputError, match="--score logit"):
        explain(model, [volume], ["gxi"], spec_text, score="probability")


def write_bundle(folder, norm: str, seed: int = 0):
    """A MONAI bundle (configs/inference.json, configs/metadata.json, models/model.pt) of a UNet."""
    from monai.networks.nets import UNet

    network = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
               "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": norm}
    inference = {
        "network_def": network,
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "NormalizeIntensityd", "keys": "image"},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [24, 24, 24], "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
    }
    metadata = {
        "name": f"unet-{norm}",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": [24, 24, 24]}},
            "outputs": {"pred": {"type": "image", "num_channels": 2, "channel_def": {"0": "background", "1": "tumour"}}},
        },
    }
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in network.items() if k != "_target_"}
    torch.save(UNet(**kwargs).state_dict(), folder / "models" / "model.pt")
    return folder


@pytest.mark.parametrize("norm", ["instance", "batch"])  # MONAI's default UNet: InstanceNorm + PReLU
def test_cli_explains_a_monai_unet_bundle_with_lrp(tmp_path, capsys, norm):
    bundle = write_bundle(tmp_path / "bundle", norm)
    geometry = oblique_geometry(size=(40, 32, 20))
    centre = geometry.ijk_to_ras_points([[20, 16, 10]])[0]
    image = write_volume(blob_volume(geometry, centre, 8.0, value=2.0, noise=0.2), tmp_path / "case.nrrd")
    out = tmp_path / "out"
    target = "channel:tumour@point:" + ",".join(f"{v:.2f}" for v in centre) + ",8"
    code = main(["explain", "--model", str(bundle), "--input", str(image), "--target", target, "--methods",
                 "lrp,lrp:epsilon-gamma-box,lrp:epsilon-alpha2-beta1-flat,gxi,ig:8/blurred", "--out", str(out), "--progress", "none"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads((out / "explanation.json").read_text())
    files = {m["spec"]: m["file"] for m in record["methods"]}
    assert files == {"lrp": "lrp.nrrd", "lrp:epsilon-gamma-box": "lrp-epsilon-gamma-box.nrrd",
                     "lrp:epsilon-alpha2-beta1-flat": "lrp-epsilon-alpha2-beta1-flat.nrrd", "gxi": "gxi.nrrd",
                     "ig:8/blurred": "ig-8-blurred.nrrd"}
    for method in record["methods"]:
        assert method["signed"] is True
        low, high = method["value_range"]
        assert low < 0 < high  # signed maps keep their sign
        assert (out / method["file"]).is_file()
    lrp_record = next(m for m in record["methods"] if m["spec"] == "lrp")
    conservation = lrp_record["extras"]["conservation"]
    assert conservation["output_relevance"] == pytest.approx(record["target"]["value"], rel=1e-4)
    assert 0 <= conservation["relative_error"] < 1
    assert lrp_record["parameters"]["composite"] == "epsilon-plus-flat"
    assert lrp_record["parameters"]["rules"]["convolution"] == "alpha1-beta0"
    ig_record = next(m for m in record["methods"] if m["spec"] == "ig:8/blurred")
    assert ig_record["passes"]["backward"] == 8 * ig_record["parameters"]["windows"]["used"]
    assert set(ig_record["extras"]["completeness"]) == {"sum_attributions", "score_difference", "relative_error"}
    assert (out / "montage.png").is_file()


def test_lrp_on_a_torchscript_model_is_refused_with_a_clear_message(tmp_path, capsys):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    network = UNet(3, 1, 2, (4, 8), (2,), num_res_units=1).eval()
    path = tmp_path / "model.ts"
    torch.jit.script(network).save(str(path))
    geometry = Geometry((16, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    centre = geometry.ijk_to_ras_points([[8, 8, 8]])[0]
    image = write_volume(blob_volume(geometry, centre, 4.0), tmp_path / "case.nrrd")
    target = "channel:1@point:" + ",".join(f"{v:.1f}" for v in centre) + ",3"
    code = main(["explain", "--model", str(path), "--input", str(image), "--target", target,
                 "--methods", "lrp", "--out", str(tmp_path / "out"), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "LRP needs the network's internal layers" in err
    # gxi and IG are model-agnostic: they run on TorchScript
    code = main(["explain", "--model", str(path), "--input", str(image), "--target", target,
                 "--methods", "gxi,ig:4", "--out", str(tmp_path / "out"), "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    assert np.isfinite(json.loads((tmp_path / "out" / "explanation.json").read_text())["methods"][0]["value_range"]).all()
