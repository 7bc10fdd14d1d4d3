"""Model loading: three formats into one object; unsafe or broken files refused with a reason."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from support import SMALL_UNET, save_bundle, save_spec_model
from xaioverlay.errors import ModelError
from xaioverlay.models import load_model, resolve_device


def unet_state(seed=0):
    import monai.networks.nets as nets

    torch.manual_seed(seed)
    return nets.UNet(**SMALL_UNET["args"]).state_dict()


def unet_bundle(folder, **kwargs):
    network_def = {"_target_": "UNet", **SMALL_UNET["args"]}
    return save_bundle(folder, network_def, unet_state(), class_names=["background", "spleen"], **kwargs)


def test_bundle_is_read_with_its_own_config_metadata_and_inferer(tmp_path):
    bundle = unet_bundle(tmp_path / "spleen_like", preprocessing=[
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0, "b_max": 1, "clip": True},
    ], inferer={"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 2, "overlap": 0.5, "mode": "gaussian"})
    model = load_model(bundle, device="cpu")
    assert model.format == "monai-bundle" and model.task == "segmentation"
    assert model.class_names == ["background", "spleen"] and model.activation == "softmax" and model.in_channels == 1
    window = model.sliding_window
    assert (window.roi_size, window.overlap, window.mode, window.sw_batch_size) == ((32, 32, 32), 0.5, "gaussian", 2)
    assert model.model_id.startswith("spleen_like@")
    for name, tensor in unet_state().items():  # the bundle's weights, not a fresh initialisation
        torch.testing.assert_close(model.network.state_dict()[name], tensor)
    assert not model.network.training


def test_pickled_module_is_refused_with_the_risk_and_the_conversion(tmp_path):
    import monai.networks.nets as nets

    folder = tmp_path / "spec"
    spec = save_spec_model(folder, SMALL_UNET, task="segmentation", class_names=["a", "b"])
    torch.save(nets.UNet(**SMALL_UNET["args"]), folder / "model.pt")  # a whole pickled module
    with pytest.raises(ModelError, match=r"unpickle arbitrary code \(a security risk\).*state_dict\(\)") as error:
        load_model(spec, device="cpu")
    assert "\n" not in str(error.value)


def test_spec_is_data_only_and_names_what_is_wrong(tmp_path):
    spec = save_spec_model(tmp_path / "s", SMALL_UNET, task="segmentation", class_names=["a", "b"])
    content = yaml.safe_load(spec.read_text())
    content["network"]["args"]["channels"] = "$__import__('os').getcwd()"
    spec.write_text(yaml.safe_dump(content))
    with pytest.raises(ModelError, match="holds an expression"):
        load_model(spec, device="cpu")
    content["network"] = {"name": "UNett", "args": {}}
    spec.write_text(yaml.safe_dump(content))
    with pytest.raises(ModelError, match="unknown network 'UNett'"):
        load_model(spec, device="cpu")
    content["network"] = {"name": "UNet", "args": {**SMALL_UNET["args"], "channels": [8, 16, 32]}}
    spec.write_text(yaml.safe_dump(content))
    with pytest.raises(ModelError, match="weights do not fit the network"):
        load_model(spec, device="cpu")


def test_json_spec_with_monai_style_targets_and_preprocessing(tmp_path):
    spec = save_spec_model(tmp_path / "s", SMALL_UNET, task="segmentation", class_names=["a", "b"])
    content = yaml.safe_load(spec.read_text())
    content["network"] = {"_target_": "monai.networks.nets.UNet", **SMALL_UNET["args"]}
    content["preprocessing"] = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "NormalizeIntensityd", "keys": "image"}]
    path = tmp_path / "s" / "model.json"
    path.write_text(json.dumps(content))
    model = load_model(path, device="cpu")
    assert [type(t).__name__ for t in model.transforms.transforms] == ["NormalizeIntensityd"]  # loading step skipped


def test_torchscript_task_and_classes_come_from_a_sidecar_or_the_output(tmp_path):
    import monai.networks.nets as nets

    network = nets.UNet(**SMALL_UNET["args"]).eval()
    path = tmp_path / "seg.ts"
    torch.jit.trace(network, torch.zeros(1, 1, 32, 32, 32)).save(str(path))
    bare = load_model(path, device="cpu")
    assert bare.task == "segmentation" and bare.class_names == ["class 0", "class 1"]
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump({"task": "segmentation", "class_names": ["bg", "liver"], "activation": "softmax"}))
    described = load_model(path, device="cpu")
    assert described.class_names == ["bg", "liver"] and described.activation == "softmax" and described.format == "torchscript"


def test_state_dict_given_as_torchscript_points_to_the_spec_format(tmp_path):
    torch.save(unet_state(), tmp_path / "weights.pt")
    with pytest.raises(ModelError, match="give a spec file"):
        load_model(tmp_path / "weights.pt", device="cpu")


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ModelError, match="sees no CUDA GPU; use --device cpu"):
            resolve_device("cuda")
    with pytest.raises(ModelError, match="unknown device 'gpu'"):
        resolve_device("gpu")
