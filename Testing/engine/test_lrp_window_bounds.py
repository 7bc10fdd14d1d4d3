"""LRP's z^B bounds come from the whole volume, per input channel: every sliding window uses the same ones,
so window borders leave no seams (each window's own extremes would differ from its neighbours')."""

from __future__ import annotations

import numpy as np
import torch

from support import save_spec_model
from test_occlusion_exact import BN_UNET, grid_volume, randomise_batchnorm
from xaioverlay.explain import explain
from xaioverlay.methods.lrp import LRP, Composite, Epsilon, Gamma, ZBox
from xaioverlay.models import load_model
from xaioverlay.volumes import Volume

TARGET = "channel:1@box:-4,-4,4,-20,-20,20"  # RAS mm on grid_volume's identity grid: the middle of a 24³ volume


def box_composite(low, high) -> Composite:
    """epsilon-gamma-box with the z^B bounds given as numbers."""
    return Composite("explicit-box", first=ZBox(low, high), convolution=Gamma(0.25), dense=Epsilon(1e-6))


def load(folder, in_channels=1, sliding_window=None):
    network = {"name": BN_UNET["name"], "args": {**BN_UNET["args"], "in_channels": in_channels}}
    spec = save_spec_model(folder, network, task="segmentation", class_names=["background", "tumour"],
                           sliding_window=sliding_window)
    model = load_model(spec, device="cpu")
    randomise_batchnorm(model.network)
    return model


def test_every_sliding_window_uses_the_whole_volumes_z_box_bounds(tmp_path):
    model = load(tmp_path, sliding_window={"roi_size": [12, 12, 12], "overlap": 0.25, "mode": "gaussian"})
    volume = grid_volume((24, 24, 24), seed=3, centre=(-6.0, -6.0, -6.0), radius=3.0)
    volume.array[16:, 16:, 16:] += 5.0  # one corner much brighter: windows elsewhere have a lower maximum
    low, high = float(volume.array.min()), float(volume.array.max())
    assert volume.array[:12, :12, :12].max() < high - 2 and volume.array[16:, 16:, 16:].min() > low + 3
    data, given = explain(model, [volume], [LRP("epsilon-gamma-box"), LRP(box_composite(low, high))], TARGET).results
    assert data.parameters["windows"]["used"] > 1
    scale = float(given.model_grid_map.abs().max())
    torch.testing.assert_close(data.model_grid_map, given.model_grid_map, rtol=0, atol=1e-5 * scale)
    assert data.parameters["input_bounds"]["low"] == [low] and data.parameters["input_bounds"]["high"] == [high]


def test_z_box_bounds_are_each_input_channels_extremes(tmp_path):
    model = load(tmp_path, in_channels=2)
    first = grid_volume((16, 16, 16), seed=4)
    second = Volume(first.array * 10.0 - 3.0, first.geometry, "second")
    data, given = explain(model, [first, second], [LRP("epsilon-gamma-box"), LRP(box_composite(
        (float(first.array.min()), float(second.array.min())), (float(first.array.max()), float(second.array.max()))))],
        "channel:1@box:-4,-4,4,-12,-12,12").results
    bounds = data.parameters["input_bounds"]
    np.testing.assert_allclose(bounds["low"], [first.array.min(), second.array.min()])
    np.testing.assert_allclose(bounds["high"], [first.array.max(), second.array.max()])
    torch.testing.assert_close(data.model_grid_map, given.model_grid_map)
