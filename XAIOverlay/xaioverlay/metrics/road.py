"""ROAD in 3D (Rong et al. 2022): remove voxels by relevance, fill them by noisy linear imputation.

Deletion with a fixed baseline leaves the shape of the removed region visible to the model (and out of
its training distribution). ROAD instead fills each removed voxel with the average of its 6 face
neighbours — solved jointly for all removed voxels, so large holes fill smoothly from their rim — and
adds a little Gaussian noise so the fill carries no exact pattern. *MoRF* removes the most relevant
voxels first (the score should fall fast: lower is better), *LeRF* the least relevant first (the
score should hold: higher is better).

The imputation solves, for the removed voxels U, the discrete Laplace equation
Σ_{v ∈ N(u)} (x_u − x_v) = 0 with the kept voxels fixed (a sparse symmetric positive-definite system),
by conjugate gradients on the device, batched over fractions and channels, matrix-free: one
neighbour sum per iteration. A tiny pull (ε) towards the kept voxels' mean keeps the system definite
when a hole has no kept neighbour.

Scores are normalised as the deletion curves are: the original input scores 1 and the blurred input
0 (:mod:`.faithfulness`), and each curve is summarised by its mean normalised score over the
fractions (its area divided by the largest fraction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..models.base import LoadedModel
from ..progress import NO_PROGRESS, Progress
from ..targets import Target
from .faithfulness import area_under_curve, baseline_input, gaussian_blur, perturbation_steps, target_scores

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ORDERS = ("morf", "lerf")


def neighbour_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum of each voxel's 6 face neighbours (nothing beyond the edges). (B, C, X, Y, Z) → same."""
    total = torch.zeros_like(v)
    total[:, :, 1:] += v[:, :, :-1]
    total[:, :, :-1] += v[:, :, 1:]
    total[:, :, :, 1:] += v[:, :, :, :-1]
    total[:, :, :, :-1] += v[:, :, :, 1:]
    total[:, :, :, :, 1:] += v[:, :, :, :, :-1]
    total[:, :, :, :, :-1] += v[:, :, :, :, 1:]
    return total


def linear_imputation(
    x: torch.Tensor, removed: torch.Tensor, *, iterations: int = 60, tolerance: float = 1e-3, epsilon: float = 1e-6
) -> torch.Tensor:
    """Fill the removed voxels with the harmonic (6-neighbour average) interpolation of the kept ones.

    Args:
        x: (1, C, X, Y, Z) input.
        removed: (B, X, Y, Z) boolean, one removal pattern per batch item.
        iterations: conjugate-gradient iterations at most.
        tolerance: stop when every residual is below this share of its right-hand side.
    Returns:
        (B, C, X, Y, Z): kept voxels as in ``x``, removed voxels imputed.
    """
    batch = removed.shape[0]
    source = x.expand(batch, -1, -1, -1, -1)
    unknown = removed[:, None].to(x.dtype).expand_as(source)
    known = source * (1 - unknown)
    degree = neighbour_sum(torch.ones_like(x[:, :1]))
    kept = (1 - unknown).sum((2, 3, 4), keepdim=True).clamp_min(1)
    mean = known.sum((2, 3, 4), keepdim=True) / kept

    def apply(p: torch.Tensor) -> torch.Tensor:
        return unknown * ((degree + epsilon) * p - neighbour_sum(p))

    b = unknown * (neighbour_sum(known) + epsilon * mean)
    # warm start: a normalised Gaussian average of the kept voxels nearby (the mean where none is near)
    weight = gaussian_blur(1 - unknown, (2.0, 2.0, 2.0))
    guess = gaussian_blur(known, (2.0, 2.0, 2.0)) / weight.clamp_min(1e-6)
    u = unknown * torch.where(weight > 1e-3, guess, mean.expand_as(guess))
    r = b - apply(u)
    p = r.clone()
    rs = (r * r).sum((2, 3, 4), keepdim=True)
    limit = (tolerance ** 2) * (b * b).sum((2, 3, 4), keepdim=True).clamp_min(1e-30)
    for _ in range(iterations):
        if bool((rs <= limit).all()):
            break
        ap = apply(p)
        alpha = rs / (p * ap).sum((2, 3, 4), keepdim=True).clamp_min(1e-30)
        u = u + alpha * p
        r = r - alpha * ap
        rs_next = (r * r).sum((2, 3, 4), keepdim=True)
        p = r + (rs_next / rs.clamp_min(1e-30)) * p
        rs = rs_next
    return known + unknown * u


def noisy_linear_imputation(
    x: torch.Tensor, removed: torch.Tensor, noise: float = 0.01, generator: torch.Generator | None = None, **solver
) -> torch.Tensor:
    """:func:`linear_imputation` plus Gaussian noise of ``noise`` × each channel's std on the removed voxels."""
    filled = linear_imputation(x, removed, **solver)
    scale = x.std(dim=(2, 3, 4), keepdim=True) * noise
    draw = torch.randn(filled.shape, generator=generator, device="cpu").to(filled.device)
    return filled + removed[:, None].to(x.dtype) * scale * draw


@dataclass
class RoadCurve:
    """Scores after removing each fraction of voxels (``fractions`` starts at 0: the original input)."""

    order: str
    fractions: np.ndarray
    scores: np.ndarray
    reference_score: float  # the blurred input's score: 0 on the normalised scale

    @property
    def normalised_scores(self) -> np.ndarray:
        span = self.scores[0] - self.reference_score
        return np.full_like(self.scores, np.nan) if span == 0 else (self.scores - self.reference_score) / span

    @property
    def mean_normalised(self) -> float:
        return area_under_curve(self.fractions, self.normalised_scores) / float(self.fractions[-1])

    def record(self) -> dict:
        return {"order": self.order, "fractions": [float(f) for f in self.fractions], "scores": [float(s) for s in self.scores],
                "reference_score": self.reference_score, "mean_normalised_score": self.mean_normalised}


def road_curves(
    model: LoadedModel,
    x: torch.Tensor,
    relevance: torch.Tensor,
    target: Target,
    *,
    fractions: Sequence[float] = FRACTIONS,
    orders: Sequence[str] = ORDERS,
    noise: float = 0.01,
    blur_sigma_voxels: Sequence[float] = (4.0, 4.0, 4.0),
    batch_size: int = 8,
    seed: int = 0,
    progress: Progress = NO_PROGRESS,
) -> dict[str, RoadCurve]:
    """MoRF and LeRF curves of one map: 2 + len(orders) × len(fractions) forward passes.

    Args:
        x: (1, C, X, Y, Z) model input; relevance: (X, Y, Z) map on the model grid.
    """
    device = x.device
    steps_map, steps = perturbation_steps(relevance.to(device), 1 / 1000, None, seed)  # rank in permille
    rank = (steps_map.float() - 0.5) / steps  # 0 = most relevant, 1 = least
    generator = torch.Generator().manual_seed(seed)
    jobs = [(order, f) for order in orders for f in fractions]
    reference = baseline_input(x, "blur", blur_sigma_voxels)
    values = target_scores(model, target, torch.cat([x, reference]))
    original, reference_score = float(values[0]), float(values[1])
    scores: dict[tuple[str, float], float] = {}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        removed = torch.stack([rank < f if order == "morf" else rank > 1 - f for order, f in chunk])
        filled = noisy_linear_imputation(x, removed, noise, generator)
        for job, value in zip(chunk, target_scores(model, target, filled)):
            scores[job] = float(value)
        progress(min(start + batch_size, len(jobs)), len(jobs), unit="imputations")
    axis = np.array([0.0, *fractions])
    return {
        order: RoadCurve(order, axis, np.array([original, *(scores[(order, f)] for f in fractions)]), reference_score)
        for order in orders
    }
