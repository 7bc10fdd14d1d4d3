"""Analytic cases for the map-only metrics (localisation in mm, complexity) and the perturbation order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xaioverlay.metrics import complexity, localisation
from xaioverlay.baselines import gaussian_blur
from xaioverlay.metrics.faithfulness import baseline_input, deletion_insertion, perturbation_steps
from xaioverlay.models import LoadedModel
from xaioverlay.targets import Target


def test_distance_to_mask_is_euclidean_in_mm_on_anisotropic_voxels():
    mask = np.zeros((20, 16, 8), bool)
    mask[5:7, 4:6, 2:4] = True
    spacing = (0.8, 1.3, 3.0)
    distance = localisation.distance_to_mask_mm(mask, spacing)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in mask.shape], indexing="ij"), -1) * spacing
    inside = grid[mask]
    brute = np.min(np.linalg.norm(grid[..., None, :] - inside[None, None, None], axis=-1), axis=-1)
    np.testing.assert_allclose(distance, brute, atol=1e-3)
    assert (distance[mask] == 0).all()


@pytest.mark.parametrize("tolerance_mm, hit", [(0.0, 0), (5.9, 0), (6.1, 1)])
def test_pointing_game_tolerance_counts_millimetres_not_voxels(tolerance_mm, hit):
    """The peak lies 2 voxels above the mask along an axis of 3 mm voxels: 6 mm away."""
    mask = np.zeros((10, 10, 10), bool)
    mask[4:6, 4:6, 2:4] = True
    relevance = torch.zeros((1, 10, 10, 10))
    relevance[0, 5, 5, 5] = 1.0  # k = 5; nearest mask voxel k = 3
    region = torch.as_tensor(localisation.distance_to_mask_mm(mask, (1.0, 1.0, 3.0)) <= tolerance_mm)
    assert float(localisation.pointing_game(relevance, region)[0]) == hit
    weighted = float(localisation.size_weighted_pointing_game(relevance, region)[0])
    assert weighted == pytest.approx(hit * (1 - float(region.double().mean())))


def test_ties_at_the_maximum_hit_when_any_of_them_hits():
    relevance = torch.zeros((1, 4, 4, 4))
    relevance[0, 0, 0, 0] = relevance[0, 3, 3, 3] = 2.0
    mask = torch.zeros((4, 4, 4), dtype=torch.bool)
    mask[3, 3, 3] = True
    assert float(localisation.pointing_game(relevance, mask)[0]) == 1.0


def test_mass_counts_only_positive_relevance_and_rank_takes_the_top_mask_size():
    relevance = torch.tensor([[4.0, 1.0, -5.0, 3.0, 0.5, -1.0]])
    mask = torch.tensor([True, True, True, False, False, False])
    # positive relevance: 4 + 1 inside, 3 + 0.5 outside
    assert float(localisation.relevance_mass_accuracy(relevance, mask)[0]) == pytest.approx(5 / 8.5)
    # top 3 values: 4 (in), 3 (out), 1 (in)
    assert float(localisation.relevance_rank_accuracy(relevance, mask)[0]) == pytest.approx(2 / 3)
    assert math.isnan(float(localisation.relevance_mass_accuracy(-relevance.abs(), mask)[0]))


def test_chance_levels_are_shares_of_the_grid():
    mask = torch.zeros((10, 10, 10), dtype=torch.bool)
    mask[:2] = True
    region = torch.zeros_like(mask)
    region[:5] = True
    chance = localisation.chance_levels(mask, region)
    assert chance == {"pointing_game": 0.5, "pointing_game_size_weighted": 0.25, "relevance_mass": 0.2, "relevance_rank": 0.2}


def test_random_maps_score_near_their_chance_level():
    """Averaged over many random maps, each score approaches its stated chance level."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros((12, 12, 12), dtype=torch.bool)
    mask[2:8, 3:9, 1:5] = True
    region = torch.as_tensor(localisation.distance_to_mask_mm(mask.numpy(), (1.0, 1.0, 1.0)) <= 1.5)
    maps = torch.rand((400, 12, 12, 12), generator=generator)
    chance = localisation.chance_levels(mask, region)
    assert float(localisation.pointing_game(maps, region).mean()) == pytest.approx(chance["pointing_game"], abs=0.06)
    assert float(localisation.relevance_mass_accuracy(maps, mask).mean()) == pytest.approx(chance["relevance_mass"], abs=0.01)
    assert float(localisation.relevance_rank_accuracy(maps, mask).mean()) == pytest.approx(chance["relevance_rank"], abs=0.01)


def test_sparseness_and_entropy_of_a_point_and_of_a_uniform_map():
    count = 6 * 5 * 4
    point = torch.zeros((1, 6, 5, 4))
    point[0, 2, 2, 2] = -3.0  # magnitudes count, not signs
    uniform = torch.full((1, 6, 5, 4), 0.7)
    assert float(complexity.gini_sparseness(point)[0]) == pytest.approx((count - 1) / count)
    assert float(complexity.normalised_entropy(point)[0]) == pytest.approx(0.0)
    assert float(complexity.gini_sparseness(uniform)[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(complexity.normalised_entropy(uniform)[0]) == pytest.approx(1.0)
    half = torch.zeros((1, count))
    half[0, : count // 2] = 1.0  # uniform on half the voxels: entropy ln(N/2) / ln N, Gini 1/2
    assert float(complexity.normalised_entropy(half)[0]) == pytest.approx(math.log(count / 2) / math.log(count))
    assert float(complexity.gini_sparseness(half)[0]) == pytest.approx(0.5)
    assert math.isnan(float(complexity.gini_sparseness(torch.zeros((1, 8)))[0]))


def test_steps_take_the_most_relevant_first_in_equal_shares():
    relevance = torch.arange(1000, dtype=torch.float32).reshape(10, 10, 10)
    steps, count = perturbation_steps(relevance, 0.1)
    assert count == 10
    assert torch.equal(torch.bincount(steps.reshape(-1))[1:], torch.full((10,), 100))
    assert int(steps.reshape(-1)[999]) == 1 and int(steps.reshape(-1)[0]) == 10
    # ties are taken in a seeded random order: the zeros of a ReLU map are not deleted in raster order
    flat = torch.zeros((20, 20, 20))
    flat[:2] = 1.0
    steps, _ = perturbation_steps(flat, 0.5)
    first = steps == 1
    assert first[:2].all() and 0.35 < float(first[2:].float().mean()) < 0.45  # 3200 of 7200 tied voxels, spread out
    assert float(first[2:10].float().mean()) == pytest.approx(float(first[10:].float().mean()), abs=0.05)


def test_block_steps_move_whole_blocks_ranked_by_mean():
    relevance = torch.zeros((8, 8, 6))
    relevance[4:8, 0:4, 3:6] = 5.0
    steps, count = perturbation_steps(relevance, 0.25, block=(4, 4, 3))
    assert count == 4  # 2 × 2 × 2 blocks, 25 % = 2 blocks per step
    for i in (0, 4):
        for j in (0, 4):
            for k in (0, 3):
                block = steps[i:i + 4, j:j + 4, k:k + 3]
                assert (block == block.flatten()[0]).all()
    assert (steps[4:8, 0:4, 3:6] == 1).all()


def test_blur_keeps_constants_and_the_mean_baseline_is_per_channel():
    x = torch.full((1, 2, 9, 8, 7), 3.0)
    x[:, 1] = -1.0
    np.testing.assert_allclose(gaussian_blur(x, (2.0, 1.0, 0.5)).numpy(), x.numpy(), atol=1e-5)
    x[0, 0, 4, 4, 3] = 100.0
    blurred = gaussian_blur(x, (2.0, 2.0, 2.0))
    assert float(blurred[0, 0, 4, 4, 3]) < 20 and float(blurred[0, 0].sum()) == pytest.approx(float(x[0, 0].sum()), rel=0.05)
    mean = baseline_input(x, "mean")
    assert torch.allclose(mean[0, 1], torch.full((9, 8, 7), -1.0)) and float(mean[0, 0, 0, 0, 0]) == pytest.approx(float(x[0, 0].mean()))


class _Linear(torch.nn.Module):
    """score = Σ w ⊙ x: the exact attribution of each voxel, against a zero baseline, is w ⊙ x."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x):
        score = (x[:, 0] * self.weight).flatten(1).sum(1, keepdim=True)
        return torch.cat([-score, score], dim=1)


def test_the_exact_attribution_deletes_fastest_and_inserts_fastest():
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn((10, 10, 10), generator=generator)
    x = torch.randn((1, 1, 10, 10, 10), generator=generator)
    model = LoadedModel(_Linear(weight), torch.device("cpu"), "classification", ["a", "b"], 1)
    target = Target(1, "b")
    exact = weight * x[0, 0]
    results = {}
    for name, relevance in (("exact", exact), ("reversed", -exact), ("random", torch.randn((10, 10, 10), generator=generator))):
        results[name] = deletion_insertion(model, x, relevance, target, baseline="zero", step_fraction=0.02, batch_size=16)
    deletion = {name: curves["deletion"].normalised_auc for name, curves in results.items()}
    insertion = {name: curves["insertion"].normalised_auc for name, curves in results.items()}
    assert deletion["exact"] < deletion["random"] < deletion["reversed"]
    assert insertion["exact"] > insertion["random"] > insertion["reversed"]
    # the ends of every curve are the original input and the baseline
    curve = results["exact"]["deletion"]
    assert curve.scores[0] == pytest.approx(float((weight * x[0, 0]).sum()), rel=1e-4)
    assert curve.scores[-1] == pytest.approx(0.0, abs=1e-5)
    assert curve.normalised_scores[0] == pytest.approx(1.0) and curve.normalised_scores[-1] == pytest.approx(0.0)


def test_linear_imputation_reproduces_a_harmonic_ramp_and_keeps_kept_voxels():
    from xaioverlay.metrics.road import linear_imputation, noisy_linear_imputation

    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in (20, 18, 16)], indexing="ij")
    ramp = (0.3 * axes[0] - 0.2 * axes[1] + 0.1 * axes[2] + 1.0)[None, None]  # linear: its own 6-neighbour mean
    removed = torch.zeros((2, 20, 18, 16), dtype=torch.bool)
    removed[0, 4:14, 5:12, 3:12] = True  # one interior hole
    removed[1, 2:18:3, 2:16:2, 2:14:2] = True  # scattered voxels
    filled = linear_imputation(ramp, removed, iterations=200, tolerance=1e-7)
    np.testing.assert_allclose(filled.numpy(), ramp.expand(2, -1, -1, -1, -1).numpy(), atol=1e-3)
    noisy = noisy_linear_imputation(ramp, removed, noise=0.1, generator=torch.Generator().manual_seed(0))
    change = (noisy - filled)[:, 0]
    assert torch.equal(change[~removed], torch.zeros_like(change[~removed]))
    assert float(change[removed].std()) == pytest.approx(0.1 * float(ramp.std()), rel=0.15)


def test_road_morf_falls_below_lerf_for_the_exact_attribution():
    from xaioverlay.metrics.road import road_curves

    generator = torch.Generator().manual_seed(6)
    weight = torch.randn((12, 12, 12), generator=generator)
    x = torch.randn((1, 1, 12, 12, 12), generator=generator)
    model = LoadedModel(_Linear(weight), torch.device("cpu"), "classification", ["a", "b"], 1)
    exact = weight * x[0, 0]
    curves = road_curves(model, x, exact, Target(1, "b"), fractions=(0.2, 0.5, 0.8), noise=0.0, batch_size=4)
    assert (curves["morf"].scores[1:] < curves["lerf"].scores[1:]).all()
    assert curves["morf"].scores[0] == curves["lerf"].scores[0] == pytest.approx(float(exact.sum()), rel=1e-4)
    assert model.passes.forward == 2 + 6


def test_best_values_follow_each_columns_direction_and_skip_nan_and_all_equal_columns():
    from xaioverlay.metrics.evaluate import Column, best_rows

    rows = [{"a": 0.2, "b": float("nan"), "c": 1.0}, {"a": 0.5, "b": 3.0, "c": 1.0}, {"a": 0.5, "b": 2.0, "c": 1.0}]
    assert best_rows(rows, Column("a", "a", +1)) == {1, 2}
    assert best_rows(rows, Column("a", "a", -1)) == {0}
    assert best_rows(rows, Column("b", "b", -1)) == {2}
    assert best_rows(rows, Column("c", "c", +1)) == set()
