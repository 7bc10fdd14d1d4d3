"""The trained attention tumour segmenters (``tools/train_attention_models.py``).

Fast checks: each bundle has the MONAI layout within 10 MB, loads through the engine, and on two
held-out phantoms segments the tumour as well as the held-out Dice recorded in its metadata says.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from support import assert_bundle_layout
from xaioverlay.methods import REGISTRY
from xaioverlay.models import load_model
from xaioverlay.phantoms import HELD_OUT_SEEDS, make_phantom

BUNDLES = Path(__file__).resolve().parents[2] / "Resources" / "bundles"
#: Bundle → network class.
NETWORKS = {"tumour_attention_unet": "AttentionUnet", "tumour_swin_unetr": "SwinUNETR"}
#: The first held-out phantoms, all among those the recorded Dice was measured on.
SEEDS = list(HELD_OUT_SEEDS[:2])


def _metadata(name: str) -> dict:
    return json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("name", NETWORKS)
def test_bundle_layout_size_and_recorded_training(name):
    assert_bundle_layout(BUNDLES / name)
    meta = _metadata(name)
    held_out = meta["xaioverlay"]["held_out"]
    assert meta["xaioverlay"]["task"] == "segmentation"
    assert held_out["n_phantoms"] >= 20 and held_out["seeds"].startswith(f"HELD_OUT_SEEDS[:{held_out['n_phantoms']}]")
    assert meta["eval_metrics"]["mean_dice"] == held_out["dice"]
    assert "tools/train_attention_models.py" in meta["xaioverlay"]["training"]["command"]


@pytest.mark.parametrize("name", NETWORKS)
def test_bundle_loads_and_segments_held_out_phantoms_as_its_metadata_says(name):
    model = load_model(BUNDLES / name, device="cpu")
    assert type(model.network).__name__ == NETWORKS[name]
    assert model.task == "segmentation" and model.class_names == ["background", "tumour"]
    assert all(p.dtype == torch.float32 for p in model.network.parameters())  # float16 weights load as float32
    held_out = _metadata(name)["xaioverlay"]["held_out"]
    dices = []
    for seed in SEEDS:
        phantom = make_phantom(seed)
        model_input = model.preprocess([phantom.image])
        label = model.infer(model_input.tensor)[0].argmax(0).numpy() > 0
        assert label.shape == phantom.tumour_mask.array.shape  # the phantom grid is the model grid
        dices.append(_dice(label, phantom.tumour_mask.array > 0))
    # These phantoms were among those measured: none can fall below the recorded worst case, and their
    # mean lies near the recorded mean.
    assert min(dices) >= held_out["dice_min"] - 1e-3, (dices, held_out)
    assert abs(np.mean(dices) - held_out["dice"]) <= 0.1, (dices, held_out)


def test_attention_method_is_available_on_the_attention_unet_bundle():
    model = load_model(BUNDLES / "tumour_attention_unet", device="cpu")
    assert REGISTRY["attention"].unavailable(model) is None
