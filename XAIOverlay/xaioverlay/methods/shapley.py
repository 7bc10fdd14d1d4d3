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
- :func:`guided_shapley` — permutation sampling with a surrogate game built on a cheap gradient map as
  control variate; unbiased whatever the guide, exact efficiency (the argument is in its docstring).
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


def antithetic_contributions(value: ValueFunction, segments: int, pairs: int, generator: torch.Generator,
                              full: float, empty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginal contributions along ``pairs`` random orders and their reverses.

    Returns:
        (contributions (2·pairs, S) float64, ranks (2·pairs, S) long): rows 2p and 2p + 1 are an order and its
        reverse; ``ranks[r, i]`` is segment ``i``'s place in order ``r``, ``contributions[r, i]`` what it adds there.
        Each row sums to ``full − empty``. Costs ``2·pairs·(S − 1)`` passes.
    """
    per_call = max(1, BLOCK_ROWS // max(segments - 1, 1) // 2)
    contributions, all_ranks = [], []
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
        contributions.append((chain[:, 1:] - chain[:, :-1]).gather(1, ranks))
        all_ranks.append(ranks)
    return torch.cat(contributions), torch.cat(all_ranks)


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
    contributions, _ = antithetic_contributions(value, segments, pairs, generator, full, empty)
    samples = contributions.view(pairs, 2, segments).mean(1)
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


def cubic_surrogate_shapley(guide: torch.Tensor) -> torch.Tensor:
    """Exact Shapley values (S,) float64 of the game ``g(z) = (a·z − T/2)³``, ``a`` = ``guide`` (S,), ``T = Σ a``.

    Segment ``i``'s contribution after the segments ``P`` is ``(d + a_i)³ − d³``, ``d = Σ_{j∈P} a_j − T/2``.
    Over uniform orders each other segment precedes ``i`` with probability ½ and two of them both do with
    probability ⅓, so with ``T' = T − a_i``, ``Q' = Σ_{j≠i} a_j²``: ``E d = −a_i/2``,
    ``E d² = Q'/6 + T'²/12 + a_i²/4``, and ``φ_i = 3 a_i E d² + 3 a_i² E d + a_i³ = 3 a_i E d² − a_i³/2``.
    They sum to ``g(N) − g(∅) = T³/4``.
    """
    a = guide.double()
    others = a.sum() - a
    squares = (a**2).sum() - a**2
    return 3 * a * (squares / 6 + others**2 / 12 + a**2 / 4) - a**3 / 2


def cubic_surrogate_contributions(guide: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """What each segment adds to ``g(z) = (a·z − T/2)³`` along orders ``ranks`` (R, S) long: (R, S) float64."""
    a = guide.double()
    by_rank = a[ranks.argsort(1)]  # (R, S): the guide value of the segment at each place
    before = torch.cat([torch.zeros(len(ranks), 1, dtype=torch.float64), by_rank.cumsum(1)], 1).gather(1, ranks)
    d = before - float(a.sum()) / 2
    return (d + a) ** 3 - d**3


def cross_fitted(samples: torch.Tensor, control: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """``samples − c · control`` (P, S), ``control`` (P, S) with mean 0, ``c`` fitted on the other half of the rows.

    The rows split into even and odd; each half gets the ``c`` that minimises the summed variance of
    ``samples − c · control`` on the other half (the least-squares slope pooled over the segments), so ``c`` is
    independent of the rows it adjusts and the result keeps the expectation of ``samples``. A half under 2 rows
    gets c = 0.
    """
    adjusted, scales = samples.clone(), []
    halves = torch.arange(len(samples)) % 2 == 0
    for fit, use in ((halves, ~halves), (~halves, halves)):
        scale = 0.0
        if int(fit.sum()) >= 2:
            centred = samples[fit] - samples[fit].mean(0)
            control_centred = control[fit] - control[fit].mean(0)
            spread = float((control_centred**2).sum())
            scale = float((centred * control_centred).sum()) / spread if spread > 0 else 0.0
        adjusted[use] -= scale * control[use]
        scales.append(scale)
    return adjusted, scales


def guided_shapley(value: ValueFunction, segments: int, permutations: int, generator: torch.Generator,
                   guide: torch.Tensor) -> Estimate:
    """Antithetic permutation sampling with a surrogate game built on a cheap map (e.g. gradient × input per
    segment) as control variate: the same orders and passes as :func:`permutation_shapley`, less variance.

    Why not a linear surrogate: ``g(z) = Σ_j a_j z_j`` adds exactly ``a_i`` to every contribution of segment
    ``i``, so ``a_i + Shapley_perm(f − g)_i`` *is* plain permutation sampling, draw for draw, whatever ``a``. A
    quadratic ``(a·z)²`` adds ``a_i (2 s + a_i)`` (``s`` = the guide summed over the segments before ``i``), and
    an order and its reverse have ``s + s' = T − a_i``: the antithetic pair already cancels it. What is left
    in a pair's mean is even in ``s − E s``, like the saturation of a model whose output levels off as
    segments come back. The cubic ``g(z) = (a·z − T/2)³`` has that shape and exact Shapley values
    (:func:`cubic_surrogate_shapley`).

    Estimator. Along the same orders as plain sampling, ``G_i`` = what segment ``i`` adds to ``g``
    (:func:`cubic_surrogate_contributions`; no model pass), and per antithetic pair
    ``φ̂_i = m_i − c (G_i − φ_i(g))``, ``m_i`` the model's contributions, averaged over the pairs. ``c`` is
    fitted by least squares on the other half of the pairs (:func:`cross_fitted`): independent of the pairs
    it adjusts, and ``E[G_i] = φ_i(g)`` exactly, so the estimate is unbiased for any guide — a wrong guide
    gives ``c ≈ 0`` and plain sampling's variance, never bias. Efficiency stays exact at every sample count:
    along any order ``Σ_i m_i = Δ`` and ``Σ_i G_i = g(N) − g(∅) = Σ_i φ_i(g)``. Needs at least 4 pairs (8
    permutations) for a ``c`` on each half; fewer gives plain sampling. Standard errors: the adjusted pairs'
    standard deviation / √pairs. The guide is scaled to ``max |a| = 1`` (``c`` absorbs any scale).
    """
    pairs = max(2, math.ceil(permutations / 2))
    full, empty = ends(value, segments)
    contributions, ranks = antithetic_contributions(value, segments, pairs, generator, full, empty)
    a = guide.double().cpu()
    a = a / a.abs().max() if float(a.abs().max()) > 0 else a
    control = (cubic_surrogate_contributions(a, ranks).view(pairs, 2, segments).mean(1)
               - cubic_surrogate_shapley(a))
    samples, scales = cross_fitted(contributions.view(pairs, 2, segments).mean(1), control)
    return Estimate(samples.mean(0), samples.std(0) / math.sqrt(pairs), 2 + 2 * pairs * (segments - 1), full, empty,
                    {"permutations": 2 * pairs, "control_scales": scales,
                     "estimator": "antithetic permutation sampling, cubic gradient surrogate as control variate"},
                    samples.var(0))
