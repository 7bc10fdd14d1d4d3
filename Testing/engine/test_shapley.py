"""Shapley values, KernelSHAP, LIME and shap-guided against exact references: a model linear in the segments,
Shapley values by enumeration, and Captum's ShapleyValueSampling, KernelShap and Lime on a small MONAI network.

Sampling estimators are compared statistically: over independent seeds, the mean estimate must lie within
4 standard errors of the reference (the spread over seeds gives the standard error), and the standard
errors the estimators report must match the spread they actually have.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from captum.attr import KernelShap, Lime, ShapleyValueSampling
from captum._utils.models.linear_model import SkLearnLinearRegression
from monai.networks.nets import UNet

from support import blob_volume
from xaioverlay.methods import shapley
from xaioverlay.volumes import Geometry

SEEDS = 40


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_value(beta: torch.Tensor, offset: float = 3.0):
    return lambda keep: offset + keep.double() @ beta


def smooth_value(segments: int, seed: int = 0):
    """A model with interactions of every order: a squashed weighted sum plus pairwise products."""
    rng = torch.Generator().manual_seed(seed)
    weights = torch.randn(segments, dtype=torch.float64, generator=rng)
    pairs = torch.randn(segments, segments, dtype=torch.float64, generator=rng).triu(1) * 0.5

    def value(keep: torch.Tensor) -> torch.Tensor:
        z = keep.double()
        return 2 * torch.tanh(z @ weights / 2) + ((z @ pairs) * z).sum(1)

    return value


def exact_shapley(value, segments: int) -> torch.Tensor:
    """Shapley values by enumerating every coalition: φ_i = Σ_A |A|! (S−|A|−1)! / S! (v(A ∪ i) − v(A))."""
    coalitions = torch.tensor(list(itertools.product([False, True], repeat=segments)))
    scores = value(coalitions).double()
    index = {tuple(row.tolist()): n for n, row in enumerate(coalitions)}
    phi = torch.zeros(segments, dtype=torch.float64)
    for n, row in enumerate(coalitions):
        size = int(row.sum())
        for i in range(segments):
            if not row[i]:
                weight = math.factorial(size) * math.factorial(segments - size - 1) / math.factorial(segments)
                with_i = row.clone()
                with_i[i] = True
                phi[i] += weight * (scores[index[tuple(with_i.tolist())]] - scores[n])
    return phi


def assert_agrees_statistically(runs: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """``runs`` (seeds, S) independent estimates: their mean within 4 standard errors of ``reference`` (S,)."""
    mean = runs.mean(0)
    error = runs.std(0) / math.sqrt(len(runs))
    z = (mean - reference).abs() / error.clamp_min(1e-12)
    assert float(z.max()) < 4, f"{what}: mean off by {z.max():.1f} standard errors ({mean} vs {reference})"


def assert_errors_calibrated(runs: torch.Tensor, errors: torch.Tensor, what: str, low=0.6, high=1.8) -> None:
    """Reported standard errors (seeds, S) against the actual spread of the estimates over seeds."""
    ratio = float(errors.pow(2).mean(0).sum() / runs.var(0).sum())
    assert low < ratio < high, f"{what}: reported variance / observed variance = {ratio:.2f}"


@pytest.mark.parametrize("estimator", ["permutation", "kernel", "guided", "lime"])
def test_model_linear_in_segments_gives_each_segment_its_contribution(estimator):
    segments = 20
    rng = generator(3)
    signs = torch.randn(segments, generator=rng).sign()
    beta = (torch.rand(segments, dtype=torch.float64, generator=rng) + 0.5) * signs
    beta[[2, 7]] = 0.0  # segments with no effect
    value = linear_value(beta)
    run = {
        "permutation": lambda: shapley.permutation_shapley(value, segments, 4, generator(0)),
        "kernel": lambda: shapley.kernel_shapley(value, segments, 3 * segments, generator(0)),
        "guided": lambda: shapley.guided_shapley(value, segments, 8, generator(0), beta.flip(0)),
        "lime": lambda: shapley.lime_surrogate(value, segments, 200, generator(0)),
    }[estimator]
    estimate = run()
    torch.testing.assert_close(estimate.values, beta, rtol=0, atol=1e-9)
    if estimate.standard_errors is not None:
        assert float(estimate.standard_errors.max()) < 1e-9
    else:
        assert estimate.extras["r2"] == pytest.approx(1.0)


@pytest.mark.parametrize("permutations", range(2, 41, 2))
def test_antithetic_permutation_values_sum_to_score_difference_at_every_sample_count(permutations):
    segments = 9
    value = smooth_value(segments, seed=permutations)
    estimate = shapley.permutation_shapley(value, segments, permutations, generator(permutations))
    assert estimate.passes == 2 + max(permutations, 4) * (segments - 1)
    assert float(estimate.values.sum()) == pytest.approx(estimate.full - estimate.empty, rel=1e-12, abs=1e-12)


def test_kernel_values_also_sum_to_score_difference():
    segments = 11
    value = smooth_value(segments, seed=5)
    estimate = shapley.kernel_shapley(value, segments, 30, generator(1))
    assert float(estimate.values.sum()) == pytest.approx(estimate.full - estimate.empty, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("permutations", range(2, 41, 2))
def test_guided_values_sum_to_score_difference_at_every_sample_count(permutations):
    segments = 9
    value = smooth_value(segments, seed=permutations)
    guide = torch.randn(segments, dtype=torch.float64, generator=generator(permutations))
    estimate = shapley.guided_shapley(value, segments, permutations, generator(permutations), guide)
    assert estimate.passes == 2 + max(permutations, 4) * (segments - 1)  # the passes of shap:N, no more
    assert float(estimate.values.sum()) == pytest.approx(estimate.full - estimate.empty, rel=1e-12, abs=1e-12)


def cubic_game(guide: torch.Tensor, beta: torch.Tensor, scale: float):
    """3 + β·z + scale · (a·z − Σa/2)³: the surrogate game of shap-guided plus a linear part."""
    return lambda keep: 3 + keep.double() @ beta + scale * (keep.double() @ guide - float(guide.sum()) / 2) ** 3


def test_cubic_surrogate_shapley_values_match_enumeration():
    guide = torch.randn(9, dtype=torch.float64, generator=generator(2))
    exact = exact_shapley(cubic_game(guide, torch.zeros(9, dtype=torch.float64), 1.0), 9)
    torch.testing.assert_close(shapley.cubic_surrogate_shapley(guide), exact, rtol=1e-10, atol=1e-10)


def test_guided_is_exact_with_zero_error_when_the_model_is_its_surrogate():
    """A model that is the guide's cubic surrogate plus a linear part: the control variate removes all variance
    (plain permutation sampling does not)."""
    segments = 10
    guide = torch.randn(segments, dtype=torch.float64, generator=generator(4))
    beta = torch.randn(segments, dtype=torch.float64, generator=generator(5))
    value = cubic_game(guide, beta, 0.3)
    exact = exact_shapley(value, segments)
    estimate = shapley.guided_shapley(value, segments, 8, generator(0), 7 * guide)  # any scale of the guide
    torch.testing.assert_close(estimate.values, exact, rtol=0, atol=1e-8)
    assert float(estimate.standard_errors.max()) < 1e-8
    plain = shapley.permutation_shapley(value, segments, 8, generator(0))
    assert float(plain.standard_errors.max()) > 1e-2


@pytest.mark.parametrize("estimator", ["permutation", "kernel", "guided-good", "guided-wrong"])
def test_estimates_agree_with_shapley_values_by_enumeration(estimator):
    segments = 10
    value = smooth_value(segments, seed=11)
    weights = torch.randn(segments, dtype=torch.float64, generator=generator(11))  # the game's own weights
    exact = exact_shapley(value, segments)
    run = {
        "permutation": lambda g: shapley.permutation_shapley(value, segments, 8, g),
        "kernel": lambda g: shapley.kernel_shapley(value, segments, 200, g),
        # the guide shapes the control variate only: a guide pointing the wrong way costs precision, not bias
        "guided-good": lambda g: shapley.guided_shapley(value, segments, 8, g, weights),
        "guided-wrong": lambda g: shapley.guided_shapley(value, segments, 8, g, -weights.flip(0).abs()),
    }[estimator]
    estimates = [run(generator(1000 + seed)) for seed in range(SEEDS)]
    values = torch.stack([e.values for e in estimates])
    errors = torch.stack([e.standard_errors for e in estimates])
    assert_agrees_statistically(values, exact, estimator)
    assert_errors_calibrated(values, errors, estimator)


def test_good_guide_needs_fewer_passes_than_permutation_sampling_for_a_few_strong_segments():
    segments = 48
    weights = torch.zeros(segments, dtype=torch.float64)
    weights[:4] = torch.tensor([3.0, -2.0, 1.5, 1.0])

    def value(keep):
        z = keep.double()
        return torch.tanh(z @ weights / 2) + 0.01 * z[:, 4:].sum(1)

    guide = weights + 0.01
    plain = torch.stack([shapley.permutation_shapley(value, segments, 40, generator(s)).values for s in range(SEEDS)])
    guided = [shapley.guided_shapley(value, segments, 40, generator(s), guide) for s in range(SEEDS)]
    assert guided[0].passes == 2 + 40 * (segments - 1)  # the same passes as plain
    # the same passes, a third of the variance or less: a third of the passes for the same error
    assert float(torch.stack([g.values for g in guided]).var(0).sum()) < float(plain.var(0).sum()) / 3


def unet_problem():
    """A small MONAI UNet on a 16³ blob phantom; 8 segments (2×2×2 cubes of 8³); the target is the mean
    foreground probability in the central 6³ region; hidden segments are set to 0."""
    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1)
    network.eval()
    geometry = Geometry((16, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    centre = geometry.ijk_to_ras_points(np.array([[8.0, 8.0, 8.0]]))[0]
    x = torch.from_numpy(blob_volume(geometry, centre, 5.0, value=2.0, noise=0.3).array)[None, None]
    index = torch.arange(16) // 8
    mask = (index.view(-1, 1, 1) * 4 + index.view(1, -1, 1) * 2 + index.view(1, 1, -1))[None, None]

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return network(inputs).softmax(1)[:, 1, 5:11, 5:11, 5:11].mean((1, 2, 3)).double()

    def value(keep: torch.Tensor) -> torch.Tensor:
        chosen = keep[:, mask[0, 0]].unsqueeze(1)  # (B, 1, X, Y, Z)
        return forward(torch.where(chosen, x, torch.zeros(())))

    return forward, value, x, mask


def segment_values(attribution: torch.Tensor, mask: torch.Tensor, segments: int) -> torch.Tensor:
    """Captum paints each feature's value on its voxels: read one voxel per segment."""
    flat, labels = attribution.reshape(-1).double(), mask.reshape(-1)
    return torch.stack([flat[(labels == s).nonzero()[0, 0]] for s in range(segments)])


def test_shap_and_kernelshap_agree_with_captum_and_enumeration_on_a_monai_unet():
    forward, value, x, mask = unet_problem()
    segments = 8
    exact = exact_shapley(value, segments)
    ours_perm = torch.stack([shapley.permutation_shapley(value, segments, 6, generator(s)).values for s in range(20)])
    ours_kernel = torch.stack([shapley.kernel_shapley(value, segments, 64, generator(s)).values for s in range(20)])
    theirs_perm, theirs_kernel = [], []
    for seed in range(500, 520):  # Captum draws from torch's global generator: other seeds than ours
        torch.manual_seed(seed)
        attribution = ShapleyValueSampling(forward).attribute(x, feature_mask=mask, baselines=0.0, n_samples=6,
                                                               perturbations_per_eval=32)
        theirs_perm.append(segment_values(attribution, mask, segments))
        torch.manual_seed(seed)
        attribution = KernelShap(forward).attribute(x, feature_mask=mask, baselines=0.0, n_samples=64,
                                                     perturbations_per_eval=32)
        theirs_kernel.append(segment_values(attribution, mask, segments))
    theirs_perm, theirs_kernel = torch.stack(theirs_perm), torch.stack(theirs_kernel)
    for name, runs in [("shap", ours_perm), ("kernelshap", ours_kernel), ("Captum ShapleyValueSampling", theirs_perm),
                       ("Captum KernelShap", theirs_kernel)]:
        assert_agrees_statistically(runs, exact, name)
    for name, ours, theirs in [("shap", ours_perm, theirs_perm), ("kernelshap", ours_kernel, theirs_kernel)]:
        difference = (ours.mean(0) - theirs.mean(0)).abs()
        error = (ours.var(0) / len(ours) + theirs.var(0) / len(theirs)).sqrt()
        assert float((difference / error.clamp_min(1e-12)).max()) < 4, f"{name} differs from Captum's"
    # antithetic pairs at the same number of permutations: no more spread than Captum's independent orders
    assert float(ours_perm.var(0).sum()) < float(theirs_perm.var(0).sum())


def test_lime_agrees_with_captum_lime_given_the_same_kernel_and_samples_on_a_monai_unet():
    forward, value, x, mask = unet_problem()
    segments, samples = 8, 80

    def same_kernel(original, perturbed, interpretable, **kwargs):
        return shapley.lime_kernel(interpretable.bool()).float()

    ours = torch.stack([shapley.lime_surrogate(value, segments, samples, generator(s), alpha=0.0).values
                        for s in range(20)])
    theirs = []
    for seed in range(700, 720):
        torch.manual_seed(seed)
        lime = Lime(forward, interpretable_model=SkLearnLinearRegression(), similarity_func=same_kernel)
        attribution = lime.attribute(x, feature_mask=mask, baselines=0.0, n_samples=samples, perturbations_per_eval=40)
        theirs.append(segment_values(attribution, mask, segments))
    theirs = torch.stack(theirs)
    difference = (ours.mean(0) - theirs.mean(0)).abs()
    error = (ours.var(0) / len(ours) + theirs.var(0) / len(theirs)).sqrt()
    z = float((difference / error.clamp_min(1e-12)).max())
    assert z < 4, f"LIME differs from Captum's by {z:.1f} standard errors: {ours.mean(0)} vs {theirs.mean(0)}"


def test_low_lime_r2_becomes_a_warning():
    segments = 12

    def parity(keep):  # no linear structure at all
        return (keep.sum(1) % 2).double()

    estimate = shapley.lime_surrogate(parity, segments, 300, generator(0))
    assert estimate.extras["r2"] < shapley.LIME_MIN_R2
    assert "R²" in shapley.lime_warning("LIME", estimate.extras["r2"])
    assert shapley.lime_warning("LIME", 0.9) is None
