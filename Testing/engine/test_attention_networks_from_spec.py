"""Issue 13's check, through the command line on untrained stock networks saved as data-only specs:
LRP, gradient × input and the attention method on MONAI's attention, squeeze-excitation and
transformer networks and VNet; LRP's conservation recorded in explanation.json; attention refused
with its reason where a network has none."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import save_spec_model
from xaioverlay.cli import main
from xaioverlay.methods.attention import SE_REASON
from xaioverlay.volumes import Geometry, Volume, write_volume

SEG, CLS = "segmentation", "classification"
#: name → (args, task, input size, why attention is unavailable or None); small sizes, untrained weights
NETWORKS = {
    "AttentionUnet": ({"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
                       "strides": [2, 2]}, SEG, 32, None),
    "SEResNet50": ({"spatial_dims": 3, "in_channels": 1, "num_classes": 2, "layers": [1, 1, 1, 1]}, CLS, 32,
                   SE_REASON),
    "EfficientNetBN": ({"model_name": "efficientnet-b0", "pretrained": False, "spatial_dims": 3, "in_channels": 1,
                        "num_classes": 2}, CLS, 32, SE_REASON),
    "VNet": ({"spatial_dims": 3, "in_channels": 1, "out_channels": 2}, SEG, 32,
             "VNet has no attention gates or self-attention blocks"),
    "UNETR": ({"in_channels": 1, "out_channels": 2, "img_size": [32, 32, 32], "feature_size": 12, "hidden_size": 48,
               "mlp_dim": 96, "num_heads": 4}, SEG, 32, None),
    "SwinUNETR": ({"in_channels": 1, "out_channels": 2, "feature_size": 12, "depths": [2, 2, 2, 2],
                   "num_heads": [3, 3, 3, 3], "norm_name": "batch"}, SEG, 32, None),
    "ViT": ({"in_channels": 1, "img_size": [32, 32, 32], "patch_size": [8, 8, 8], "hidden_size": 48, "mlp_dim": 96,
             "num_layers": 2, "num_heads": 4, "classification": True, "num_classes": 2}, CLS, 32, None),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_lrp_gxi_and_attention_run_from_a_spec_with_conservation_recorded(tmp_path, capsys, name):
    args, task, size, unavailable = NETWORKS[name]
    spec = save_spec_model(tmp_path / name, {"name": name, "args": args}, task=task,
                           class_names=["background", "tumour"])
    torch.manual_seed(1)
    geometry = Geometry((size,) * 3, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    image = write_volume(Volume(torch.rand(size, size, size).numpy(), geometry), tmp_path / "case.nrrd")
    centre = geometry.ijk_to_ras_points([[size // 2] * 3])[0]  # a ball: an untrained net may predict no tumour
    target = "channel:tumour@point:" + ",".join(f"{v:.2f}" for v in centre) + ",6" if task == SEG else "class:tumour"
    methods = "lrp,gxi" + ("" if unavailable else ",attention")
    out = tmp_path / "out"
    code = main(["explain", "--model", str(spec), "--input", str(image), "--target", target, "--methods", methods,
                 "--out", str(out), "--progress", "none", "--no-montage"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "explanation.json").read_text())
    by_method = {m["method"]: m for m in record["methods"]}
    assert set(by_method) == set(methods.split(","))
    conservation = by_method["lrp"]["extras"]["conservation"]
    assert conservation["output_relevance"] == pytest.approx(record["target"]["value"], rel=1e-4)
    assert 0 <= conservation["relative_error"] < float("inf")
    for method in by_method.values():
        assert (out / method["file"]).is_file()
    if unavailable:
        code = main(["explain", "--model", str(spec), "--input", str(image), "--target", target,
                     "--methods", "attention", "--out", str(tmp_path / "refused"), "--progress", "none"])
        err = capsys.readouterr().err
        assert code == 1 and len(err.strip().splitlines()) == 1 and unavailable in err
