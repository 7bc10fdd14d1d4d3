"""Adaptive occlusion: within budget, exact where it refines, and it refines where the evidence is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xaioverlay.explain import explain
from xaioverlay.methods.occlusion import AdaptiveOcclusion, Occlusion
from xaioverlay.methods.occlusion.adaptive import box_means, plan_levels
from xaioverlay.methods.occlusion.grid import OccluderGrid
from xaioverlay.methods.occlusion.options import Lengths, OccluderOptions
from xaioverlay.models.base import LoadedModel
from xaioverlay.volumes import Geometry, Volume

SHAPE = (32, 32, 32)
LESION_CENTRE, LESION_RADIUS = np.array([22.0, 10.0, 16.0]), 4.0


class LesionDetector(nn.Module):
    """Score = how much of the volume is brighter than 0.5 after a 3³ mean filter (analytic)."""

    def __init__(self) -> None:
        super().__init__()
        self.smooth = nn.Conv3d(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(self.smooth.weight, 1 / 27)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool3d(1)

    def forward(self, x):
        return self.pool(self.act(self.smooth(x) - 0.5)).flatten(1) * 100


class SaturatingDetector(LesionDetector):
    """Saturates once a little of the lesion is seen: hiding a part of it costs almost nothing, hiding
    it whole everything — the strongly non-additive case of a segmentation target (analytic)."""

    def forward(self, x):
        return torch.tanh(super().forward(x) * 10) * 100


@pytest.fixture(scope="module")
def model():
    return LoadedModel(network=LesionDetector(), device=torch.device("cpu"), task="classification",
                       class_names=["lesion"], in_channels=1, activation="none")


@pytest.fixture(scope="module")
def volume():
    index = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    lesion = np.linalg.norm(index - LESION_CENTRE, axis=-1) <= LESION_RADIUS
    noise = np.random.default_rng(0).normal(0, 0.05, SHAPE)
    return Volume((lesion * 1.0 + noise).astype(np.float32), Geometry(SHAPE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), "lesion"), lesion


def finest(size=4, stride=2) -> OccluderOptions:
    return OccluderOptions(Lengths((float(size),) * 3), Lengths((float(stride),) * 3))


def test_adaptive_spends_a_tenth_of_the_passes_and_matches_exact_on_the_lesion(model, volume):
    image, lesion = volume
    exact, adaptive = explain(model, [image], [Occlusion(finest()), AdaptiveOcclusion(300, finest())]).results
    assert exact.extras["occluded_passes"] == 15**3
    assert adaptive.extras["occluders_evaluated"] <= 300 and adaptive.passes["forward"] <= 300 + 2
    assert adaptive.extras["fewer_passes_than_exact"] >= 10
    a, e = adaptive.model_grid_map.numpy(), exact.model_grid_map.numpy()
    peak = np.unravel_index(int(a.argmax()), SHAPE)
    assert lesion[peak]  # pointing game
    # where it refined (around the lesion's centre), the adaptive map *is* exact occlusion at the finest size
    index = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    core = np.linalg.norm(index - LESION_CENTRE, axis=-1) <= LESION_RADIUS / 2
    assert np.abs(a[core] - e[core]).max() <= 1e-4 * (e.max() - e.min())
    mass = lambda m: np.clip(m, 0, None)[lesion].sum() / np.clip(m, 0, None).sum()  # noqa: E731
    assert abs(mass(a) - mass(e)) <= 0.05 * mass(e)


def test_a_coarse_box_that_hides_the_whole_lesion_spreads_nothing_outside_it(volume):
    image, lesion = volume
    model = LoadedModel(network=SaturatingDetector(), device=torch.device("cpu"), task="classification",
                        class_names=["lesion"], in_channels=1, activation="none")
    exact, adaptive = explain(model, [image], [Occlusion(finest()), AdaptiveOcclusion(300, finest())]).results
    a, e = adaptive.model_grid_map.numpy(), exact.model_grid_map.numpy()
    coarse = adaptive.parameters["levels"][0]
    assert coarse["size_voxels"][0] >= 2 * LESION_RADIUS + 1  # a coarse box can hide the whole lesion at once
    mass = lambda m: np.clip(m, 0, None)[lesion].sum() / np.clip(m, 0, None).sum()  # noqa: E731
    assert mass(e) > 0.3 and abs(mass(a) - mass(e)) <= 0.05 * mass(e)
    assert np.corrcoef(a.ravel(), e.ravel())[0, 1] >= 0.99


def test_progress_counts_occluders_of_the_budget_on_a_sliding_window_model():
    from xaioverlay.demo import SEGMENTER, bundle_path
    from xaioverlay.models import load_model
    from xaioverlay.phantoms import make_phantom
    from xaioverlay.progress import Progress

    events = []
    model = load_model(bundle_path(SEGMENTER), device="cpu")  # 64³ windows over a 64 × 80 × 64 volume
    explain(model, [make_phantom(100000).image], [AdaptiveOcclusion(60, finest(8, 4))], progress=Progress(events.append))
    steps = [e for e in events if e["event"] == "progress" and e.get("unit") == "occluders"]
    assert steps and all(0 <= e["done"] <= e["total"] == 60 for e in steps)
    assert steps[-1]["done"] == 60 and [e["done"] for e in steps] == sorted(e["done"] for e in steps)


def test_a_budget_that_covers_the_finest_grid_gives_exact_occlusion(model, volume):
    image, _ = volume
    options = OccluderOptions(Lengths((8.0,) * 3), Lengths((8.0,) * 3))
    exact, adaptive = explain(model, [image], [Occlusion(options), AdaptiveOcclusion(64, options)]).results
    assert adaptive.parameters["levels"] == [{"size_voxels": [8, 8, 8], "stride_voxels": [8, 8, 8], "occluders": 64, "evaluated": 64}]
    torch.testing.assert_close(adaptive.model_grid_map, exact.model_grid_map)


@pytest.mark.parametrize("spec", ["occlusion-adaptive", "occlusion-adaptive:blur", "occlusion-adaptive:300", "occlusion-adaptive:300:6/3:mean",
                                  "occlusion-adaptive:10mm/5mm"])
def test_a_recorded_spec_reads_back_as_the_same_method(spec):
    from xaioverlay.methods import build_method

    method = build_method(spec)
    again = build_method(method.spec)
    assert (again.budget, again.options.size, again.options.effective_stride, again.options.fill) == \
        (method.budget, method.options.size, method.options.effective_stride, method.options.fill)


def test_levels_double_until_the_coarsest_takes_a_quarter_of_the_budget():
    levels = plan_levels(OccluderGrid((64, 80, 64), (8, 8, 8), (4, 4, 4)), 400)
    assert [g.size for g in levels] == [(32, 32, 32), (16, 16, 16), (8, 8, 8)]
    assert [g.stride for g in levels] == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    assert len(levels[0]) <= 100 < len(levels[1])


def test_box_means_equal_direct_means():
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand((9, 7, 8), generator=generator)
    boxes = torch.tensor([[[0, 0, 0], [9, 7, 8]], [[2, 3, 1], [5, 4, 7]], [[8, 6, 7], [9, 7, 8]]])
    expected = torch.stack([volume[l[0]:h[0], l[1]:h[1], l[2]:h[2]].mean() for l, h in boxes.tolist()])
    torch.testing.assert_close(box_means(volume, boxes), expected)
