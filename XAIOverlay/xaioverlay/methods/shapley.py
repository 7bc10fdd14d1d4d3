"""Shapley values and local linear surrogates over segments, from any value function.

Every estimator here is a pure function of a *value function* ``value(keep) -> scores``: ``keep`` is a
(B, S) bool tensor (row b keeps the segments where it is True and replaces the others by the fill
baseline), the result a (B,) tensor of target scores. The masked scorer of the perturbation methods is
one such function; the reference tests use closed-form ones. Estimators build all their coalitions first
and hand them to ``value`` in large blocks (:func:`evaluate`), so the scorer batches them as it likes.

Notation: ``v(A)`` is the score with the segments of ``A`` kept; ``N = {0..S-1}``; ``Δ = v(N) − v(∅)``.
The Shapley value of segment ``i`` is ``φ_i = E_π[v(P_i^π ∪ {i}) − v(P_i^π)]`` over uniformly random
orders ``π``, ``P_i^π`` the segments before ``i``; ``Σ φ_i = Δ`` (efficiency).

- :func:`permutation_shapley` — antithetic permutation sampling (each order and its reverse).
- :func:`kernel_shapley` — Lundberg & Lee's KernelSHAP: a regression on coalitions drawn from the
  Shapley kernel, with ``Σ φ = Δ`` imposed exactly.
- :func:`lime_surrogate` — LIME: a sparse weighted linear surrogate on random coalitions, with R².
- :func:`guided_shapley` — Shapley values by per-segment stratified sampling, the samples allocated by a
  cheap gradient map; unbiased whatever the guide (the argument is in its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

ValueFunction = Callable[[torch.Tensor], torch.Tensor]

#: Rows handed to the value function per call (the scorer splits them into its own batches).
BLOCK_ROWS = 4096
#: LIME's kernel width on the cosine distance between a coalition and the whole input (LIME's image default).
LIME_KERNEL_WIDTH = 0.25
#: LIME's Lasso penalty, relative: α = LIME_ALPHA × (weighted standard deviation of the scores) / √S. On a
#: model linear in the segments this zeroes the segments whose effect is under about a tenth of the
#: root-mean-square effect (a coalition's segment is kept with probability ½: variance ¼).
LIME_ALPHA = 0.05
#: Below this weighted R² the LIME surrogate does not explain the model (a warning is shown).
LIME_MIN_R2 = 0.5
#: shap-guided: every segment's weight is at least this share of the mean absolute guide value.
GUIDE_FLOOR = 0.1


@dataclass
class Estimate:
    """What an estimator returns.

    Attributes:
        values: (S,) float64 per-segment values (Shapley values, or surrogate coefficients for LIME).
        standard_errors: (S,) float64 standard error of each value (None for LIME).
        passes: coalitions evaluated (rows given to the value function), v(N) and v(∅) included.
        full: v(N), the score with every segment kept.
        empty: v(∅), the score with every segment filled in.
        extras: estimator-specific facts (LIME's R², intercept, ...).
        unit_variances: (S,) float64 variance of one sample of each value (an antithetic pair's mean), for
            comparing estimators at equal cost; None where it does not apply.
    """

    values: torch.Tensor
    standard_errors: torch.Tensor | None
    passes: int
    full: float
    empty: float
    extras: dict = field(default_factory=dict)
    unit_variances: torch.Tensor | None = None

    def record(self) -> dict:
        """The JSON-ready summary (explanation.json's extras)."""
        record = {"passes": self.passes, "full_score": self.full, "empty_score": self.empty,
                  "sum_values": float(self.values.sum()), "score_difference": self.full - self.empty, **self.extras}
        if self.standard_errors is not None:
            finite = self.standard_errors[torch.isfinite(self.standard_errors)]
            record["standard_errors"] = [round(float(s), 8) for s in self.standard_errors]
            record["max_standard_error"] = float(finite.max()) if len(finite) else None
        return record


def evaluate(value: ValueFunction, keep: torch.Tensor, block: int = BLOCK_ROWS) -> torch.Tensor:
    """``value`` on every row of ``keep`` (B, S) bool, ``block`` rows per call: (B,) float64."""
    parts = [value(keep[start:start + block]).detach().double().cpu() for start in range(0, len(keep), block)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def ends(value: ValueFunction, segments: int) -> tuple[float, float]:
    """(v(N), v(∅)) in one call."""
    keep = torch.zeros(2, segments, dtype=torch.bool)
    keep[0] = True
    full, empty = evaluate(value, keep).tolist()
    return full, empty


def random_ranks(rows: int, segments: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, S) long: each row a uniformly random permutation's rank of every segment."""
    return torch.rand(rows, segments, generator=generator).argsort(1).argsort(1)


def permutation_shapley(value: ValueFunction, segments: int, permutations: int,
                        generator: torch.Generator) -> Estimate:
    """Antithetic permutation sampling.

    ``permutations`` orders (rounded up to an even number, at least 4) in pairs: a uniformly random
    order and its reverse. Along an order the kept set grows one segment at a time; each segment's
    marginal contribution is the difference of two consecutive scores, so one order costs S − 1
    passes besides the shared v(N) and v(∅). The contributions along one order telescope to Δ, hence
    ``Σ φ = Δ`` for every sample count (efficiency, exact up to rounding). A pair's mean is one sample;
    the standard error is the pairs' standard deviation / √pairs (the pairs are independent).

    Returns:
        :class:`Estimate` with values (S,) and standard errors (S,).
    """
    pairs = max(2, math.ceil(permutations / 2))
    full, empty = ends(value, segments)
    per_call = max(1, BLOCK_ROWS // max(segments - 1, 1) // 2)
    samples = []
    for start in range(0, pairs, per_call):
        count = min(per_call, pairs - start)
        ranks = random_ranks(count, segments, generator)
        ranks = torch.stack([ranks, segments - 1 - ranks], 1).reshape(2 * count, segments)  # order, reverse
        steps = torch.arange(1, segments).view(1, -1, 1)
        keep = ranks.unsqueeze(1) < steps  # (2·count, S − 1, S): the first j segments of the order
        scores = evaluate(value, keep.reshape(-1, segments)).view(2 * count, segments - 1)
        chain = torch.cat([torch.full((2 * count, 1), empty, dtype=torch.float64), scores,
                           torch.full((2 * count, 1), full, dtype=torch.float64)], 1)  # (2·count, S + 1)
        # the segment of rank j adds chain[j + 1] − chain[j]
        contributions = (chain[:, 1:] - chain[:, :-1]).gather(1, ranks)
        samples.append(contributions.view(count, 2, segments).mean(1))
    samples = torch.cat(samples)
    return Estimate(samples.mean(0), samples.std(0) / math.sqrt(pairs), 2 + 2 * pairs * (segments - 1), full, empty,
                    {"permutations": 2 * pairs, "estimator": "antithetic permutation sampling"}, samples.var(0))


def shapley_kernel_sizes(segments: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(count,) coalition sizes k ∈ [1, S − 1] with probability ∝ (S − 1) / (k (S − k)): the Shapley
    kernel's total weight on each size."""
    sizes = torch.arange(1, segments, dtype=torch.float64)
    weights = (segments - 1) / (sizes * (segments - sizes))
    return torch.multinomial(weights, count, replacement=True, generator=generator) + 1


def constrained_least_squares(z: torch.Tensor, y: torch.Tensor, total: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``argmin ‖y − z φ‖²`` subject to ``Σ φ = total``, through the KKT system.

    Args:
        z: (n, S) float64 coalitions; y: (n,) float64 scores minus v(∅).
    Returns:
        (φ (S,), C (S, S)): the solution and the top-left block of the KKT matrix's (pseudo-)inverse, which
        maps ``zᵀy / n`` to φ on the constraint's plane (``φ = C zᵀy / n + c total``).
    """
    n, segments = z.shape
    kkt = torch.zeros(segments + 1, segments + 1, dtype=torch.float64)
    kkt[:segments, :segments] = z.T @ z / n
    kkt[:segments, segments] = 1
    kkt[segments, :segments] = 1
    inverse = torch.linalg.pinv(kkt)
    right = torch.cat([z.T @ y / n, torch.tensor([total], dtype=torch.float64)])
    return (inverse @ right)[:segments], inverse[:segments, :segments]


def kernel_shapley(value: ValueFunction, segments: int, samples: int, generator: torch.Generator) -> Estimate:
    """KernelSHAP (Lundberg & Lee 2017) with the efficiency constraint imposed exactly.

    Shapley values solve ``min Σ_z w(z) (v(z) − v(∅) − zᵀφ)²`` over all coalitions ``z`` ∉ {∅, N}, with
    the Shapley kernel ``w(z) = (S − 1) / (C(S, |z|) |z| (S − |z|))``, subject to ``Σ φ = Δ``. Drawing
    ``z`` with probability ∝ ``w(z)`` (a size from :func:`shapley_kernel_sizes`, then a uniform subset)
    turns the weighted sum into a plain mean over the samples; each coalition comes with its complement
    (paired sampling, Covert & Lee 2021), which has the same weight. ``samples`` coalitions (rounded up to
    an even number) plus v(N) and v(∅).

    Standard errors: the solution is linear in ``b = zᵀ(y)/n`` given the sampled Gram matrix, ``φ = C b +
    c Δ``; with the residuals ``r = y − zφ`` the sandwich (heteroskedasticity-robust) covariance is
    ``C (Σ_p g_p g_pᵀ) Cᵀ / n²`` with ``g_p = Σ_{z ∈ pair p} z r_z`` over the independent pairs, scaled by
    ``pairs / (pairs − S + 1)`` for the S − 1 free parameters. On a model linear in the segments the
    residuals vanish: the values are exact and the errors 0.
    """
    pairs = max(1, math.ceil(samples / 2))
    full, empty = ends(value, segments)
    sizes = shapley_kernel_sizes(segments, pairs, generator)
    half = random_ranks(pairs, segments, generator) < sizes.unsqueeze(1)
    keep = torch.stack([half, ~half], 1).reshape(2 * pairs, segments)
    y = evaluate(value, keep) - empty
    z = keep.double()
    values, c = constrained_least_squares(z, y, full - empty)
    residual = y - z @ values
    scores = (z * residual.unsqueeze(1)).view(pairs, 2, segments).sum(1)  # (pairs, S)
    n = 2 * pairs
    covariance = c @ (scores.T @ scores) @ c.T / n**2 * (pairs / max(pairs - segments + 1, 1))
    errors = covariance.diagonal().clamp_min(0).sqrt()
    return Estimate(values, errors, n + 2, full, empty,
                    {"coalitions": n, "estimator": "KernelSHAP, paired sampling, exact efficiency constraint"})


def cosine_distance_to_whole(keep: torch.Tensor) -> torch.Tensor:
    """(B,) cosine distance between each coalition (B, S) and the all-kept vector: 1 − √(|z| / S)."""
    return 1 - (keep.double().sum(1) / keep.shape[1]).sqrt()


def lime_kernel(keep: torch.Tensor, width: float = LIME_KERNEL_WIDTH) -> torch.Tensor:
    """(B,) LIME's exponential kernel ``exp(−d² / width²)`` on :func:`cosine_distance_to_whole`."""
    return torch.exp(-cosine_distance_to_whole(keep) ** 2 / width**2)


def weighted_lasso(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: float, iterations: int = 5000,
                   tolerance: float = 1e-10) -> tuple[torch.Tensor, float]:
    """``argmin (1 / 2Σw) Σ w (y − c − xβ)² + α ‖β‖₁`` (scikit-learn's weighted Lasso) by FISTA.

    Args:
        x: (n, S) float64; y: (n,) float64; w: (n,) float64 ≥ 0.
    Returns:
        (β (S,), intercept c). α = 0 is weighted least squares.
    """
    w = w / w.sum()
    x_mean, y_mean = w @ x, w @ y
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ (w.unsqueeze(1) * xc)
    moment = xc.T @ (w * yc)
    if alpha == 0:
        beta = torch.linalg.lstsq(gram, moment.unsqueeze(1), driver="gelsd").solution.flatten()
        return beta, float(y_mean - x_mean @ beta)
    step = 1 / float(torch.linalg.eigvalsh(gram)[-1].clamp_min(1e-300))
    beta = torch.zeros(x.shape[1], dtype=torch.float64)
    previous, momentum = beta, 1.0
    for _ in range(iterations):
        moved = beta - step * (gram @ beta - moment)
        new = moved.sign() * (moved.abs() - step * alpha).clamp_min(0)
        next_momentum = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
        beta, previous = new + (momentum - 1) / next_momentum * (new - previous), new
        momentum = next_momentum
        if float((beta - previous).abs().max()) <= tolerance * max(float(previous.abs().max()), 1e-300):
            break
    return previous, float(y_mean - x_mean @ previous)


def weighted_r2(y: torch.Tensor, fitted: torch.Tensor, w: torch.Tensor) -> float:
    """Weighted coefficient of determination of ``fitted`` against ``y`` (n,)."""
    mean = (w @ y) / w.sum()
    spread = float(w @ (y - mean) ** 2)
    return 1 - float(w @ (y - fitted) ** 2) / spread if spread > 0 else 1.0


def lime_surrogate(value: ValueFunction, segments: int, samples: int, generator: torch.Generator,
                   alpha: float | None = None, width: float = LIME_KERNEL_WIDTH) -> Estimate:
    """LIME (Ribeiro et al. 2016) over segments: a sparse weighted linear surrogate of the model near the input.

    ``samples`` coalitions, each segment kept with probability ½ (as Captum's ``Lime``), weighted by
    :func:`lime_kernel` (cosine distance to the whole input, width ``width``). Sparsity: a weighted Lasso
    (penalty ``alpha``; None → ``LIME_ALPHA × weighted std of the scores / √S``, in score units) selects
    the segments, then weighted least squares on the selected ones removes the Lasso's shrinkage (a
    model linear in the segments is recovered exactly); ``alpha = 0`` is plain weighted least squares.
    The weighted R² of the surrogate on its samples is reported; below :data:`LIME_MIN_R2` the surrogate
    does not explain the model.

    Returns:
        :class:`Estimate`: values (S,) the surrogate's coefficients (a segment's effect of being kept),
        no standard errors, extras ``r2``, ``intercept``, ``selected``, ``alpha``.
    """
    full, empty = ends(value, segments)
    keep = torch.rand(samples, segments, generator=generator) < 0.5
    y = evaluate(value, keep)
    x, w = keep.double(), lime_kernel(keep, width)
    if alpha is None:
        spread = float((w @ (y - (w @ y) / w.sum()) ** 2 / w.sum()).sqrt())
        alpha = LIME_ALPHA * spread / math.sqrt(segments)
    beta, intercept = weighted_lasso(x, y, w, alpha)
    selected = beta != 0
    if alpha > 0 and bool(selected.any()):
        refit, intercept = weighted_lasso(x[:, selected], y, w, 0.0)
        beta = torch.zeros_like(beta)
        beta[selected] = refit
    r2 = weighted_r2(y, x @ beta + intercept, w)
    extras = {"coalitions": samples, "r2": round(r2, 6), "intercept": intercept, "selected": int(selected.sum()),
              "alpha": alpha, "kernel_width": width, "estimator": "LIME, weighted Lasso then least squares"}
    return Estimate(beta, None, samples + 2, full, empty, extras)


def lime_warning(label: str, r2: float) -> str | None:
    """One line when a LIME surrogate's R² is below :data:`LIME_MIN_R2`, else None."""
    if r2 >= LIME_MIN_R2:
        return None
    return (f"{label}: the linear surrogate explains little of the model (R² {r2:.2f} < {LIME_MIN_R2}); "
            "its map is not a faithful explanation — use fewer, larger segments or more samples, or prefer shap")


def allocate(weights: torch.Tensor, total: int, minimum: int = 2) -> torch.Tensor:
    """(S,) whole sample counts ∝ ``weights`` (S,) ≥ 0 summing to ``max(total, minimum S)``, each ≥ ``minimum``
    (largest remainders)."""
    segments = len(weights)
    spare = max(total, minimum * segments) - minimum * segments
    share = weights / weights.sum() * spare
    counts = share.floor().long()
    left = spare - int(counts.sum())
    if left > 0:
        counts[(share - counts).argsort(descending=True)[:left]] += 1
    return counts + minimum


def guide_weights(guide: torch.Tensor) -> torch.Tensor:
    """(S,) sampling weights from a guide map summed per segment (S,): ``|g| + GUIDE_FLOOR · mean |g|``
    (every segment gets weight, so none is left to chance alone; uniform when the guide is all zero)."""
    magnitude = guide.double().abs()
    mean = float(magnitude.mean())
    return magnitude + GUIDE_FLOOR * mean if mean > 0 else torch.ones_like(magnitude)


def guided_shapley(value: ValueFunction, segments: int, passes: int, generator: torch.Generator,
                   guide: torch.Tensor) -> Estimate:
    """Shapley values sampled where a cheap guide (e.g. gradient × input summed per segment) says they matter.

    Unbiasedness. ``φ_i = (1/S) Σ_{k=0}^{S−1} E[v(P ∪ {i}) − v(P)]``, ``P`` a uniform subset of size ``k``
    of the other segments (a random order puts ``k`` segments before ``i`` with probability 1/S each).
    Segment ``i`` gets ``n_i ≥ 2`` samples; sample ``j`` uses size ``k_j = ⌊(j + u_i) S / n_i⌋`` with one
    ``u_i ~ U[0, 1)`` (systematic sampling of the sizes) and a uniform subset ``P`` of that size, and
    also its complement ``P̄`` among the other segments (size ``S − 1 − k_j``: the antithetic partner, as
    an order and its reverse). Each ``k_j`` is uniform over the sizes ``⌊t S / n_i⌋``, t ∈ [j, j + 1),
    so ``E[(1/n_i) Σ_j f(k_j)] = ∫_0^{n_i} f(⌊t S / n_i⌋) dt / n_i = (1/S) Σ_k f(k)``, and ``P̄`` is a
    uniform subset of a uniformly distributed size too: the mean of segment ``i``'s marginal
    contributions is unbiased for ``φ_i`` whatever ``n_i``. The guide only sets the *fixed* counts
    ``n_i ∝ w_i`` (:func:`guide_weights`, :func:`allocate`), so a wrong guide costs variance, never bias.

    Efficiency. The gap ``Δ − Σ φ̂`` (expectation 0) is shared out with fixed shares ``a_i ∝ w_i² / n_i``
    (each estimate's variance if its spread were ∝ its weight): ``φ̃ = φ̂ + a (Δ − Σ φ̂)`` has the same
    expectation, sums exactly to Δ, and ``Var φ̃_i = (1 − 2a_i) Var φ̂_i + a_i² Σ_k Var φ̂_k``.

    Cost: 4 passes per sample (``P``, ``P ∪ {i}``, ``P̄``, ``P̄ ∪ {i}``) plus v(N), v(∅); ``passes`` is the
    budget, at least 8 S + 2. Standard errors: each segment's sample standard deviation of its pair means
    / √n_i (conservative for systematic sampling when the contributions trend with the size), carried
    through the correction.
    """
    full, empty = ends(value, segments)
    weights = guide_weights(guide)
    counts = allocate(weights, (passes - 2) // 4)
    owner = torch.repeat_interleave(torch.arange(segments), counts)  # (n,) segment of each sample
    first = torch.cumsum(counts, 0) - counts
    index = torch.arange(len(owner)) - first[owner]  # j within its segment
    offset = torch.rand(segments, generator=generator, dtype=torch.float64)[owner]
    sizes = ((index + offset) * segments / counts[owner]).floor().long().clamp(max=segments - 1)
    # a uniform subset of size k among the other segments: rank them at random, the segment itself last
    ranks = random_ranks(len(owner), segments, generator)
    ranks = torch.where(ranks > ranks.gather(1, owner.unsqueeze(1)), ranks - 1, ranks)
    ranks.scatter_(1, owner.unsqueeze(1), segments - 1)
    subset = ranks < sizes.unsqueeze(1)
    partner = ranks < segments - 1  # the other segments...
    partner &= ~subset  # ...not in the subset
    rows = []
    for without in (subset, partner):
        with_segment = without.clone()
        with_segment.scatter_(1, owner.unsqueeze(1), True)
        rows += [with_segment, without]
    scores = evaluate(value, torch.stack(rows, 1).reshape(-1, segments)).view(-1, 4)
    contributions = (scores[:, 0] - scores[:, 1] + scores[:, 2] - scores[:, 3]) / 2
    n = counts.double()
    means = torch.zeros(segments, dtype=torch.float64).index_add_(0, owner, contributions) / n
    squares = torch.zeros(segments, dtype=torch.float64).index_add_(0, owner, (contributions - means[owner]) ** 2)
    unit = squares / (n - 1)
    variances = unit / n
    shares = weights**2 / n
    shares = shares / shares.sum()
    values = means + shares * ((full - empty) - means.sum())
    variances = (1 - 2 * shares) * variances + shares**2 * variances.sum()
    return Estimate(values, variances.clamp_min(0).sqrt(), 2 + 4 * len(owner), full, empty,
                    {"samples_per_segment_min": int(counts.min()), "samples_per_segment_max": int(counts.max()),
                     "estimator": "guided stratified antithetic Shapley sampling"}, unit)
