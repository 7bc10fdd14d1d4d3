"""Metrics on large maps make no float64 copy of a whole map, and give the float64 answers."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xaioverlay.metrics import complexity, localisation
from xaioverlay.metrics import precise
from xaioverlay.metrics.agreement import agreement_matrix, spearman


class LargestFloat64(TorchDispatchMode):
    """Records the largest float64 tensor any PyTorch operation produced (numel)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                self.numel = max(self.numel, value.numel())
        return out


@pytest.fixture
def maps(monkeypatch):
    monkeypatch.setattr(precise, "CHUNK", 1024)  # the voxels converted at a time, small against the map
    generator = torch.Generator().manual_seed(0)
    shape = (40, 36, 30)
    base = torch.randn(shape, generator=generator)
    return {"a": base, "b": base + 0.5 * torch.randn(shape, generator=generator),
            "c": torch.relu(torch.randn(shape, generator=generator))}  # ties: the zeros a ReLU leaves


def test_agreement_and_spearman_match_scipy_without_a_float64_map(maps):
    voxels = maps["a"].numel()
    with LargestFloat64() as largest:
        names, matrix = agreement_matrix(maps)
        single = spearman(maps["a"][None], maps["c"][None])
    assert largest.numel < voxels / 4, f"a float64 tensor of {largest.numel} values ({voxels} voxels a map)"
    for i, first in enumerate(names):
        for j, second in enumerate(names):
            expected = scipy.stats.spearmanr(maps[first].flatten().numpy(), maps[second].flatten().numpy()).statistic
            assert float(matrix[i, j]) == pytest.approx(expected, abs=1e-6)
    assert float(single[0]) == pytest.approx(float(matrix[0, 2]), abs=1e-9)


def test_complexity_and_relevance_mass_match_float64_without_a_float64_map(maps):
    relevance = maps["b"][None]
    mask = maps["a"] > 0.5
    with LargestFloat64() as largest:
        gini = float(complexity.gini_sparseness(relevance)[0])
        entropy = float(complexity.normalised_entropy(relevance)[0])
        mass = float(localisation.relevance_mass_accuracy(relevance, mask)[0])
    assert largest.numel < relevance.numel() / 4
    magnitude, _ = relevance.flatten().abs().double().sort()
    count = magnitude.numel()
    weights = 2 * torch.arange(1, count + 1, dtype=torch.float64) - count - 1
    assert gini == pytest.approx(float((magnitude * weights).sum() / (count * magnitude.sum())), rel=1e-9)
    p = magnitude / magnitude.sum()
    assert entropy == pytest.approx(float(-(p * p.log()).sum() / math.log(count)), rel=1e-9)
    positive = relevance.flatten().clamp_min(0).double()
    assert mass == pytest.approx(float(positive[mask.flatten()].sum() / positive.sum()), rel=1e-9)


def test_pointing_game_rank_accuracy_and_chance_levels_without_a_float64_map(maps):
    relevance = maps["b"][None]
    mask = maps["a"] > 0.5
    region = maps["a"] > 0.2
    with LargestFloat64() as largest:
        weighted = float(localisation.size_weighted_pointing_game(relevance, region)[0])
        rank = float(localisation.relevance_rank_accuracy(relevance, mask)[0])
        chance = localisation.chance_levels(mask, region)
    assert largest.numel < relevance.numel() / 4, f"a float64 tensor of {largest.numel} values"
    flat, inside, near = relevance.flatten().double(), mask.flatten(), region.flatten()
    share_region, share_mask = float(near.double().mean()), float(inside.double().mean())
    hit = float(near[flat.argmax()])
    assert weighted == pytest.approx(hit * (1 - share_region), rel=1e-12)
    top = torch.topk(flat, int(inside.sum())).indices
    assert rank == pytest.approx(float(inside[top].double().mean()), rel=1e-12)
    assert chance == pytest.approx({"pointing_game": share_region, "pointing_game_size_weighted":
                                    share_region * (1 - share_region), "relevance_mass": share_mask,
                                    "relevance_rank": share_mask}, rel=1e-12)
