"""Our metrics equal the reference implementations: Quantus (localisation, complexity), SciPy (Spearman),
and a straightforward loop written here (deletion/insertion AUC).

Quantus accepts batched 1D/2D inputs only (it rejects 5-D volumes), so 3D maps reach it reshaped to
(B, 1, X, Y·Z): the metrics compared here do not depend on where a voxel lies, only on its value and
mask membership, so the reshape changes nothing they measure.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import quantus
import torch
from scipy import stats

from xaioverlay.metrics import agreement, complexity, localisation
from xaioverlay.metrics.faithfulness import deletion_insertion
from xaioverlay.models import LoadedModel
from xaioverlay.targets import Target

SHAPES = [(4, 9, 11), (3, 6, 7, 5)]  # 2D and 3D maps, with the batch first


def _batch(shape, seed):
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal(shape).astype(np.float32)  # distinct values: no ties
    masks = rng.random(shape) > 0.75
    for item in masks:  # never empty
        item.flat[rng.integers(item.size)] = True
    return maps, masks


def _to_quantus(array: np.ndarray) -> np.ndarray:
    """(B, *S) → (B, 1, H, W) as Quantus wants it (3D volumes flattened to 2D)."""
    batch = array.shape[0]
    return array.reshape(batch, 1, array.shape[1], -1)


def _quantus(metric, maps: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    a = _to_quantus(maps).astype(np.float64)
    s = None if masks is None else _to_quantus(masks).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = metric(model=None, x_batch=np.zeros_like(a), y_batch=np.zeros(len(a), int), a_batch=a.copy(), s_batch=s)
    return np.asarray(scores, dtype=np.float64)


@pytest.mark.parametrize("shape", SHAPES)
def test_pointing_game_equals_quantus(shape):
    maps, masks = _batch(shape, 1)
    # make some hits certain: put the maximum of every other map inside its mask
    for index in range(0, shape[0], 2):
        inside = np.flatnonzero(masks[index])
        maps[index].flat[inside[0]] = maps[index].max() + 1
    ours = localisation.pointing_game(torch.from_numpy(maps), torch.from_numpy(masks)).numpy()
    reference = _quantus(quantus.PointingGame(disable_warnings=True), maps, masks)
    np.testing.assert_array_equal(ours, reference)
    assert ours[0] == 1 and ours[2 % shape[0]] == 1


@pytest.mark.parametrize("shape", SHAPES)
def test_size_weighted_pointing_game_is_quantus_hit_times_one_minus_mask_share(shape):
    """Quantus 0.6.0's ``weighted=True`` path raises (it assigns a 2-D array into a boolean index), so its
    documented definition — hit × (1 − |mask| / N) — is applied to its unweighted hits."""
    maps, masks = _batch(shape, 2)
    maps[0].flat[np.flatnonzero(masks[0])[0]] = maps[0].max() + 1
    hits = _quantus(quantus.PointingGame(disable_warnings=True), maps, masks)
    share = masks.reshape(len(masks), -1).mean(1)
    ours = localisation.size_weighted_pointing_game(torch.from_numpy(maps), torch.from_numpy(masks)).numpy()
    np.testing.assert_allclose(ours, hits * (1 - share), rtol=1e-12)
    assert ours[0] > 0


@pytest.mark.parametrize("shape", SHAPES)
def test_relevance_mass_equals_quantus_on_positive_relevance(shape):
    maps, masks = _batch(shape, 3)
    positive = np.abs(maps)
    ours = localisation.relevance_mass_accuracy(torch.from_numpy(positive), torch.from_numpy(masks)).numpy()
    np.testing.assert_allclose(ours, _quantus(quantus.RelevanceMassAccuracy(disable_warnings=True), positive, masks), rtol=1e-6)
    # signed maps: ours counts positive relevance only, i.e. Quantus on max(R, 0)
    signed = localisation.relevance_mass_accuracy(torch.from_numpy(maps), torch.from_numpy(masks)).numpy()
    clipped = np.clip(maps, 0, None)
    np.testing.assert_allclose(signed, _quantus(quantus.RelevanceMassAccuracy(disable_warnings=True), clipped, masks), rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_relevance_rank_equals_quantus(shape):
    maps, masks = _batch(shape, 4)
    ours = localisation.relevance_rank_accuracy(torch.from_numpy(maps), torch.from_numpy(masks)).numpy()
    reference = _quantus(quantus.RelevanceRankAccuracy(disable_warnings=True), maps, masks)
    np.testing.assert_allclose(ours, reference, rtol=1e-12)
    assert len(set(np.round(ours, 6))) > 1  # not a degenerate constant


@pytest.mark.parametrize("shape", SHAPES)
def test_gini_sparseness_equals_quantus(shape):
    maps, _ = _batch(shape, 5)
    maps[1] = np.where(np.abs(maps[1]) > 1.5, maps[1], 0)  # a sparser map in the batch
    ours = complexity.gini_sparseness(torch.from_numpy(maps)).numpy()
    # Quantus adds 1e-7 to every |a| before sorting; at these magnitudes that moves the index by < 1e-6
    np.testing.assert_allclose(ours, _quantus(quantus.Sparseness(disable_warnings=True), maps), rtol=1e-5)
    assert ours[1] > ours[0] + 0.2


@pytest.mark.parametrize("shape", SHAPES)
def test_normalised_entropy_is_quantus_complexity_over_log_n(shape):
    maps, _ = _batch(shape, 6)
    maps[1] = np.where(np.abs(maps[1]) > 1.5, maps[1], 0)
    ours = complexity.normalised_entropy(torch.from_numpy(maps)).numpy()
    count = math.prod(shape[1:])
    reference = _quantus(quantus.Complexity(disable_warnings=True), maps) / math.log(count)
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    assert ours[1] < ours[0]


def test_spearman_equals_scipy_with_ties_and_mask():
    rng = np.random.default_rng(7)
    a = np.round(rng.standard_normal((3, 8, 7, 6)), 1)  # rounding makes many ties
    b = a + rng.standard_normal(a.shape)
    a[2] = np.clip(a[2], 0, None)  # a ReLU-like map: a large tie at zero
    mask = rng.random((8, 7, 6)) > 0.3
    ours = agreement.spearman(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(mask)).numpy()
    expected = [stats.spearmanr(a[i][mask], b[i][mask]).statistic for i in range(3)]
    np.testing.assert_allclose(ours, expected, rtol=1e-10)
    names, matrix = agreement.agreement_matrix({"a": torch.from_numpy(a[0]), "b": torch.from_numpy(b[0]), "c": torch.from_numpy(a[2])})
    assert names == ["a", "b", "c"]
    np.testing.assert_allclose(matrix[0, 1], stats.spearmanr(a[0].ravel(), b[0].ravel()).statistic, rtol=1e-10)
    np.testing.assert_allclose(matrix[2, 1], stats.spearmanr(a[2].ravel(), b[0].ravel()).statistic, rtol=1e-10)


# ------------------------------------------------------------------------- deletion / insertion AUC


def _small_classifier() -> LoadedModel:
    """A real (seeded) MONAI DenseNet, wrapped as the engine wraps any loaded network."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(3)
    network = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=4, growth_rate=2, block_config=(1, 1))
    return LoadedModel(network, torch.device("cpu"), "classification", ["no", "yes"], 1, activation="softmax")


def _reference_curves(model, x, relevance, target, baseline, steps, block=None):
    """Deletion/insertion the plain way: sort, then for k = 0..S perturb the first ceil(k·N/S) units, one input at a time."""
    values = relevance.numpy()
    if block is None:
        order = np.argsort(-values.ravel(), kind="stable")
        units = [np.unravel_index(i, values.shape) for i in order]
        masks = []
        for index in units:
            m = np.zeros(values.shape, bool)
            m[index] = True
            masks.append(m)
    else:
        masks, means = [], []
        for i in range(0, values.shape[0], block):
            for j in range(0, values.shape[1], block):
                for k in range(0, values.shape[2], block):
                    m = np.zeros(values.shape, bool)
                    m[i:i + block, j:j + block, k:k + block] = True
                    masks.append(m)
                    means.append(values[m].mean())
        masks = [masks[i] for i in np.argsort(-np.array(means), kind="stable")]
    count = len(masks)
    fractions, deletion, insertion = [], [], []
    source = x[0].numpy()
    fill = baseline[0].numpy()
    for k in range(steps + 1):
        chosen = np.zeros(values.shape, bool)
        for m in masks[: math.ceil(k * count / steps)]:
            chosen |= m
        fractions.append(chosen.mean())
        deleted = np.where(chosen[None], fill, source)
        inserted = np.where(chosen[None], source, fill)
        with torch.no_grad():
            deletion.append(float(target(model.network(torch.from_numpy(deleted)[None]))[0]))
            insertion.append(float(target(model.network(torch.from_numpy(inserted)[None]))[0]))
    return np.array(fractions), np.array(deletion), np.array(insertion)


@pytest.mark.parametrize("block", [None, 2])
@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_deletion_insertion_auc_equals_a_plain_loop(baseline, block):
    model = _small_classifier()
    generator = torch.Generator().manual_seed(11)
    x = torch.randn((1, 1, 8, 8, 6), generator=generator)
    relevance = torch.randn((8, 8, 6), generator=generator)  # distinct values: the order has no ties
    target = Target(1, "yes")
    steps = 10
    curves = deletion_insertion(model, x, relevance, target, baseline=baseline, step_fraction=1 / steps,
                                block=None if block is None else (block,) * 3, batch_size=3)
    fill = torch.zeros_like(x) if baseline == "zero" else x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x)
    fractions, deletion, insertion = _reference_curves(model, x, relevance, target, fill, steps, block)
    np.testing.assert_allclose(curves["deletion"].fractions, fractions, atol=1e-12)
    np.testing.assert_allclose(curves["deletion"].scores, deletion, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(curves["insertion"].scores, insertion, rtol=1e-5, atol=1e-6)
    assert curves["deletion"].auc == pytest.approx(np.trapezoid(deletion, fractions), rel=1e-5, abs=1e-7)
    assert curves["insertion"].auc == pytest.approx(np.trapezoid(insertion, fractions), rel=1e-5, abs=1e-7)
    normalised = (deletion - deletion[-1]) / (deletion[0] - deletion[-1])
    assert curves["deletion"].normalised_auc == pytest.approx(np.trapezoid(normalised, fractions), rel=1e-4, abs=1e-6)
    assert model.passes.forward == 2 * steps  # 2 + (S − 1) per curve
