"""Occlusion options: sizes in voxels or mm (anisotropic grids), one-line errors, the grid itself."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from support import blob_volume, oblique_geometry, save_spec_model
from xaioverlay import cli, sliding
from xaioverlay.errors import InputError
from xaioverlay.explain import explain
from xaioverlay.methods import build_method
from xaioverlay.baselines import gaussian_blur
from xaioverlay.methods.occlusion.grid import OccluderGrid, axis_starts, mean_drop_map
from xaioverlay.models import load_model
from xaioverlay.volumes import write_volume

TINY_UNET = {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [2, 4],
                                      "strides": [2], "num_res_units": 0, "norm": "batch"}}


@pytest.mark.parametrize("spec, size, stride, fill", [
    ("occlusion", (16, 16, 16), (8, 8, 8), "zero"),
    ("occlusion:12", (12, 12, 12), (6, 6, 6), "zero"),
    ("occlusion:16/8", (16, 16, 16), (8, 8, 8), "zero"),
    ("occlusion:16x16x8/4x4x2:blur", (16, 16, 8), (4, 4, 2), "blur"),
    ("occlusion:mean:9/3", (9, 9, 9), (3, 3, 3), "mean"),
    ("occlusion:7", (7, 7, 7), (4, 4, 4), "zero"),  # half of 7 voxels rounds up
])
def test_voxel_sizes_strides_and_fills_are_read(spec, size, stride, fill):
    method = build_method(spec)
    assert method.options.voxels(None) == (size, stride)
    assert method.options.fill == fill
    assert build_method(method.spec).options == method.options  # the normalised spec reads back the same


def test_sizes_in_mm_follow_the_spacing_of_each_axis():
    method = build_method("occlusion:6mm/3mm")
    # 6 mm on 1.2 × 1.0 × 3.0 mm voxels: 5, 6, 2 voxels; 3 mm: 2.5 (rounds up), 3, 1
    assert method.options.voxels((1.2, 1.0, 3.0)) == ((5, 6, 2), (3, 3, 1))


def test_mm_occluders_on_an_anisotropic_oblique_grid_equal_the_voxel_equivalent(tmp_path):
    geometry = oblique_geometry(size=(20, 16, 8), spacing=(1.2, 1.0, 3.0))
    model = load_model(save_spec_model(tmp_path, TINY_UNET, task="segmentation", class_names=["b", "t"]), device="cpu")
    centre = geometry.ijk_to_ras_points(np.array([[10.0, 8.0, 4.0]]))[0]
    volume = blob_volume(geometry, centre, 4.0, noise=0.2)
    target = f"channel:1@point:{centre[0]},{centre[1]},{centre[2]},3"
    in_mm, in_voxels = explain(model, [volume], ["occlusion:6mm/3mm", "occlusion:5x6x2/3x3x1"], target).results
    assert in_mm.parameters["size_voxels"] == [5, 6, 2] and in_mm.parameters["stride_voxels"] == [3, 3, 1]
    assert in_mm.parameters["size"] == "6mm"
    torch.testing.assert_close(in_mm.model_grid_map, in_voxels.model_grid_map)


def test_mm_sizes_outside_explain_ask_for_the_spacing():
    method = build_method("occlusion:20mm")
    with pytest.raises(InputError, match="spacing"):
        method.grid((32, 32, 32), None)


BAD = [
    ("occlusion:abc", "unknown field"),
    ("occlusion:16/32", "stride larger than the occluder"),
    ("occlusion:0", "must be > 0"),
    ("occlusion:1.5", "whole number"),
    ("occlusion:16/8:blur:mean", "two fills"),
    ("occlusion:16:8", "two sizes"),
    ("occlusion:16::blur", "empty field"),
    ("occlusion:16cm", "cannot read"),
    ("occlusion-adaptive:0", "at least 1"),
    ("occlusion-adaptive:12.5", "whole number"),
    ("occlusion-adaptive:400:fast", "unknown field"),
]


@pytest.mark.parametrize("spec, words", BAD)
def test_bad_option_strings_give_one_line_errors_that_show_the_form(spec, words):
    with pytest.raises(InputError) as caught:
        build_method(spec)
    message = str(caught.value)
    assert "\n" not in message and words in message
    assert any(fix in message for fix in ("e.g.", "use ", "add ", "give "))  # and how to fix it


def test_cli_reports_a_bad_occlusion_option_on_one_line(tmp_path, capsys):
    model = save_spec_model(tmp_path / "m", TINY_UNET, task="segmentation", class_names=["b", "t"])
    volume = write_volume(blob_volume(oblique_geometry(size=(8, 8, 8)), (0, 0, 0), 3), tmp_path / "v.nrrd")
    code = cli.main(["explain", "--model", str(model), "--input", str(volume), "--methods", "occlusion:16/8:sharp",
                     "--out", str(tmp_path / "out"), "--progress", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "occlusion:16/8:sharp" in err
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("length, size, stride", [(20, 4, 2), (23, 4, 3), (16, 16, 8), (10, 16, 8), (64, 16, 6)])
def test_occluders_are_placed_like_monai_sliding_windows(length, size, stride):
    starts = axis_starts(length, size, stride)
    if size <= length:
        windows = sliding.window_slices((length,), (size,), 1 - stride / size)
        assert starts == [window[0].start for window in windows]
    assert starts[0] == 0 and starts[-1] == max(length - size, 0)  # every voxel is covered
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_mean_drop_map_is_the_mean_over_covering_occluders():
    grid = OccluderGrid((7, 6, 5), (3, 2, 4), (2, 2, 1))
    drops = torch.randn(grid.counts, dtype=torch.float64)
    evaluated = torch.rand(grid.counts) > 0.3
    fast, coverage = mean_drop_map(drops, grid.axis_masks(), evaluated)
    boxes = grid.boxes()
    for x, y, z in itertools.product(range(7), range(6), range(5)):
        covering = [i for i, (low, high) in enumerate(boxes.tolist())
                    if all(l <= v < h for l, v, h in zip(low, (x, y, z), high)) and bool(evaluated.flatten()[i])]
        expected = drops.flatten()[covering].mean() if covering else torch.tensor(0.0, dtype=torch.float64)
        assert coverage[x, y, z] == len(covering)
        assert torch.isclose(fast[x, y, z], expected)


def test_blur_fill_keeps_a_constant_and_smooths_an_edge():
    constant = torch.full((1, 2, 9, 8, 7), 3.0)
    torch.testing.assert_close(gaussian_blur(constant, (2.0, 2.0, 1.0)), constant)
    step = torch.zeros((1, 1, 16, 4, 4))
    step[:, :, 8:] = 1.0
    blurred = gaussian_blur(step, (2.0, 0.0, 0.0))[0, 0, :, 0, 0]
    assert torch.all(blurred[1:] >= blurred[:-1]) and 0.3 < float(blurred[8]) < 0.7
