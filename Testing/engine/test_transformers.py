"""MONAI's transformer networks (they need einops) load from a data-only spec and run through the engine."""

from __future__ import annotations

import pytest
import torch

from conftest import save_spec_model
from xaioverlay.methods import build_method
from xaioverlay.models import load_model
from xaioverlay.targets import Target

SMALL_UNETR = {"name": "UNETR", "args": {"in_channels": 1, "out_channels": 2, "img_size": [32, 32, 32],
                                         "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4,
                                         "spatial_dims": 3}}
SMALL_SWINUNETR = {"name": "SwinUNETR", "args": {"in_channels": 1, "out_channels": 2, "feature_size": 12,
                                                 "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 3], "spatial_dims": 3}}
SMALL_VIT = {"name": "ViT", "args": {"in_channels": 1, "img_size": [32, 32, 32], "patch_size": [8, 8, 8],
                                     "hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 4,
                                     "classification": True, "num_classes": 2}}
#: network, task, input size (SwinUNETR's instance norm needs more than one voxel after five halvings)
TRANSFORMERS = {"UNETR": (SMALL_UNETR, "segmentation", 32), "SwinUNETR": (SMALL_SWINUNETR, "segmentation", 64),
                "ViT": (SMALL_VIT, "classification", 32)}


def transformer_model(tmp_path, name):
    network, task, _ = TRANSFORMERS[name]
    saved = save_spec_model(tmp_path / name, network, task=task, class_names=["background", "tumour"])
    return load_model(saved, device="cpu")


def target_for(model, size=32):
    if model.task == "classification":
        return Target(1, "tumour", "logit", "softmax", None, {})
    region = torch.zeros(size, size, size)
    region[8:20, 10:22, 6:18] = 1
    return Target(1, "tumour", "logit", "softmax", region, {})


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_transformer_loads_from_spec_and_runs_gradient_times_input_and_gradcam(tmp_path, name):
    model = transformer_model(tmp_path, name)
    assert type(model.network).__name__ == name
    size = TRANSFORMERS[name][2]
    x = torch.randn(1, 1, size, size, size)
    target = target_for(model, size)
    for spec in ("gxi", "gradcam"):
        method = build_method(spec)
        method.prepare(model, x)
        attribution = method.attribute(model, x, target)
        assert attribution.map.shape == (size, size, size)
        assert torch.isfinite(attribution.map).all() and float(attribution.map.abs().sum()) > 0, spec
