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
neighbour sum per iteration, at most 60 iterations from a coarse (4³-cell) warm start. A tiny pull (ε) towards the kept voxels' mean keeps the system definite
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
import torch.nn.functional as F

from ..models.base import LoadedModel
from ..progress import NO_PROGRESS, Progress
from ..targets import Target
from ..baselines import baseline
from .faithfulness import area_under_curve, perturbation_steps, target_scores

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
    unknown = removed[:, None].to(x.dtype).expand_as(source).contiguous()
    known = source * (1 - unknown)
    kept = (1 - unknown).sum((2, 3, 4), keepdim=True).clamp_min(1)
    mean = known.sum((2, 3, 4), keepdim=True) / kept
    diagonal = unknown * (neighbour_sum(torch.ones_like(x[:, :1])) + epsilon)

    def apply(p: torch.Tensor) -> torch.Tensor:  # p is zero outside the removed voxels
        return torch.addcmul(diagonal * p, unknown, neighbour_sum(p), value=-1)

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum((2, 3, 4), keepdim=True)

    b = unknown * (neighbour_sum(known) + epsilon * mean)
    # warm start: the kept voxels' average in 4³ cells, trilinearly interpolated (their mean where a cell keeps none)
    size = tuple(x.shape[2:])
    cells = F.avg_pool3d(known, 4, ceil_mode=True), F.avg_pool3d(1 - unknown, 4, ceil_mode=True)
    coarse = torch.where(cells[1] > 0, cells[0] / cells[1].clamp_min(1e-6), mean)
    u = unknown * F.interpolate(coarse, size=size, mode="trilinear", align_corners=False)
    del cells, coarse
    r = b - apply(u)
    p = r.clone()
    rs = dot(r, r)
    limit = (tolerance ** 2) * dot(b, b).clamp_min(1e-30)
    for _ in range(iterations):
        if bool((rs <= limit).all()):
            break
        ap = apply(p)
        alpha = rs / dot(p, ap).clamp_min(1e-30)
        u.addcmul_(alpha.expand_as(p), p)
        r.addcmul_(alpha.expand_as(ap), ap, value=-1)
        rs_next = dot(r, r)
        p.mul_(rs_next / rs.clamp_min(1e-30)).add_(r)
        rs = rs_next
    return known.add_(u)


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
    reference = baseline(x, "blur", blur_sigma_voxels)
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
