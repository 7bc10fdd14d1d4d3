"""Is the map faithful to the model? Deletion and insertion curves (Petsiuk et al. 2018), in 3D.

The model input is perturbed in the order the map gives, most relevant first (highest value first;
negative relevance last), a fixed fraction of voxels — or of occluder-sized blocks — per step (default
1 % → 100 steps). *Deletion* replaces the chosen voxels by a baseline and watches the target score
fall; *insertion* starts from the baseline and puts the chosen voxels back, watching it rise.

Baselines: ``zero`` (0 in the model's normalised input space), ``mean`` (each channel's mean) and
``blur`` (the input under a Gaussian blur: the least out-of-distribution of the three). Voxels of
equal relevance are taken in a seeded random order, so ties (a ReLU's zeros) add no spatial pattern.

AUC is the trapezoidal area under the score against the fraction of voxels perturbed (0 → 1). The
*normalised* AUC rescales scores so the original input scores 1 and the baseline 0, which makes
cases and models comparable: deletion, lower is better; insertion, higher is better.

All perturbed inputs of one curve are built on the model's device from a (X, Y, Z) map of step
numbers and scored in batches as the model's own inferer scores them (every pass counted), a
sliding-window model window by window: never its whole multi-channel output (see :func:`target_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import sliding
from ..baselines import KINDS as BASELINES  # noqa: F401  (the metric options name them)
from ..baselines import baseline as baseline_input
from ..errors import InputError
from ..models.base import LoadedModel
from ..progress import NO_PROGRESS, Progress
from ..targets import Target

KINDS = ("deletion", "insertion")


def perturbation_steps(
    relevance: torch.Tensor, step_fraction: float = 0.01, block: Sequence[int] | None = None, seed: int = 0
) -> tuple[torch.Tensor, int]:
    """The step (1..S) at which each voxel is perturbed: most relevant first, equal shares per step.

    Args:
        relevance: (X, Y, Z) map.
        step_fraction: share of voxels (or of blocks) per step; S = round(1 / step_fraction), at most
            the number of voxels (blocks).
        block: None for voxels; (bx, by, bz) to move whole blocks, tiled from voxel (0, 0, 0) and ranked
            by their mean relevance (edge blocks may be smaller).
        seed: order among equal values.
    Returns:
        ((X, Y, Z) int64 step map, S).
    """
    if not 0 < step_fraction <= 1:
        raise InputError(f"step fraction {step_fraction} must lie in (0, 1]; e.g. 0.01 for 1 % per step")
    shape = tuple(relevance.shape)
    values = relevance.detach().float()
    if block is not None:
        sizes = tuple(int(b) for b in block)
        padding = [(-n) % b for n, b in zip(shape, sizes)]
        flat_pad = [p for axis in reversed(padding) for p in (0, axis)]
        sums = F.pad(values, flat_pad).reshape(-1)
        counts = F.pad(torch.ones_like(values), flat_pad).reshape(-1)
        padded = tuple(n + p for n, p in zip(shape, padding))
        grid = tuple(n // b for n, b in zip(padded, sizes))
        view = (grid[0], sizes[0], grid[1], sizes[1], grid[2], sizes[2])
        values = sums.reshape(view).sum((1, 3, 5)) / counts.reshape(view).sum((1, 3, 5))
    units = values.numel()
    steps = max(1, min(int(round(1 / step_fraction)), units))
    generator = torch.Generator().manual_seed(seed)
    shuffle = torch.randperm(units, generator=generator).to(values.device)
    _, order = torch.sort(values.reshape(-1)[shuffle], descending=True, stable=True)
    order = shuffle[order]
    step_of_unit = torch.empty(units, dtype=torch.long, device=values.device)
    step_of_unit[order] = torch.arange(units, device=values.device) * steps // units + 1
    step_map = step_of_unit.reshape(values.shape)
    if block is not None:
        for axis, size in enumerate(sizes):
            step_map = step_map.repeat_interleave(size, dim=axis)
        step_map = step_map[: shape[0], : shape[1], : shape[2]]
    return step_map, steps


def perturbed_inputs(x: torch.Tensor, baseline: torch.Tensor, step_map: torch.Tensor, steps: torch.Tensor, kind: str) -> torch.Tensor:
    """A batch of perturbed inputs, one per step count.

    Deletion at step k: voxels with step ≤ k take the baseline, the others keep ``x``. Insertion at
    step k: voxels with step ≤ k keep ``x``, the others take the baseline.

    Args:
        x, baseline: (1, C, X, Y, Z).
        step_map: (X, Y, Z) int64 from :func:`perturbation_steps`.
        steps: (B,) int64 step counts k.
    Returns:
        (B, C, X, Y, Z).
    """
    chosen = (step_map[None] <= steps.to(step_map.device)[:, None, None, None])[:, None]
    if kind == "deletion":
        return torch.where(chosen, baseline, x)
    if kind == "insertion":
        return torch.where(chosen, x, baseline)
    raise ValueError(f"unknown curve kind {kind!r}")


def target_scores(model: LoadedModel, target: Target, inputs: torch.Tensor) -> torch.Tensor:
    """Target score of each input, as the model's own inferer computes it: (B, C, X, Y, Z) → (B,) on CPU.

    Never the whole multi-channel output of a sliding-window model: a region target whose score adds up
    over windows (a logit) is scored window by window, as the methods explain it, and only in the
    windows that hold a share of the region (see :func:`~xaioverlay.sliding.region_shares`); any other
    target block by block as the inferer blends the output. Each forward pass takes the B inputs at once.
    """
    total = torch.zeros(len(inputs), dtype=torch.float64)
    window = model.sliding_window
    with torch.no_grad():
        if window is not None and window.needed(inputs.shape[2:]) and target.splits_over_windows:
            shares = sliding.region_shares(window, target.weights.to(inputs.device))
            padded = sliding.pad(inputs, shares.pads)
            for part in shares.active:
                output = model.forward(padded[(slice(None), slice(None), *part)])
                total += target.restricted(shares.weights(part))(output).double().cpu()
            return total.float()
        for part, block in model.output_blocks(inputs):
            scored = target if target.weights is None else target.restricted(target.weights[part])
            total += scored(block).double().cpu()
    return total.float()


def area_under_curve(fractions: np.ndarray, scores: np.ndarray) -> float:
    """Trapezoidal area under ``scores`` (N,) against ``fractions`` (N,) increasing from 0 to 1."""
    return float(np.sum((scores[1:] + scores[:-1]) * np.diff(fractions)) / 2)


@dataclass
class Curve:
    """One deletion or insertion curve.

    Attributes:
        fractions: (S + 1,) share of voxels perturbed (deleted, or inserted), 0 → 1.
        scores: (S + 1,) target score at each fraction.
    """

    kind: str
    baseline: str
    fractions: np.ndarray
    scores: np.ndarray

    @property
    def original(self) -> float:
        return float(self.scores[0] if self.kind == "deletion" else self.scores[-1])

    @property
    def baseline_score(self) -> float:
        return float(self.scores[-1] if self.kind == "deletion" else self.scores[0])

    @property
    def auc(self) -> float:
        return area_under_curve(self.fractions, self.scores)

    @property
    def normalised_scores(self) -> np.ndarray:
        """Scores with the original input at 1 and the baseline at 0 (NaN when they score alike)."""
        span = self.original - self.baseline_score
        if span == 0:
            return np.full_like(self.scores, np.nan)
        return (self.scores - self.baseline_score) / span

    @property
    def normalised_auc(self) -> float:
        return area_under_curve(self.fractions, self.normalised_scores)

    def record(self) -> dict:
        return {
            "kind": self.kind, "baseline": self.baseline, "auc": self.auc, "normalised_auc": self.normalised_auc,
            "original_score": self.original, "baseline_score": self.baseline_score,
            "fractions": [round(float(v), 6) for v in self.fractions], "scores": [float(v) for v in self.scores],
        }


def deletion_insertion(
    model: LoadedModel,
    x: torch.Tensor,
    relevance: torch.Tensor,
    target: Target,
    *,
    baseline: str = "blur",
    kinds: Sequence[str] = KINDS,
    step_fraction: float = 0.01,
    block: Sequence[int] | None = None,
    blur_sigma_voxels: Sequence[float] = (4.0, 4.0, 4.0),
    batch_size: int = 8,
    seed: int = 0,
    progress: Progress = NO_PROGRESS,
) -> dict[str, Curve]:
    """Deletion and/or insertion curves of one map; 2 + (S − 1) forward passes per curve.

    Args:
        x: (1, C, X, Y, Z) model input on the model's device.
        relevance: (X, Y, Z) map on the model grid.
        target: what is scored (the target the map explains).
    Returns:
        kind → :class:`Curve`.
    """
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown curve kind {kind!r}")
    device = x.device
    step_map, steps = perturbation_steps(relevance.to(device), step_fraction, block, seed)
    per_step = torch.bincount(step_map.reshape(-1), minlength=steps + 1).double().cpu()
    fractions = (torch.cumsum(per_step, 0) / step_map.numel()).numpy()
    fractions[0], fractions[-1] = 0.0, 1.0
    reference = baseline_input(x, baseline, blur_sigma_voxels)
    jobs = [("original", 0), ("baseline", 0)] + [(kind, k) for kind in kinds for k in range(1, steps)]
    scores: dict[tuple[str, int], float] = {}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        parts = []
        for kind in dict.fromkeys(kind for kind, _ in chunk):
            ks = torch.tensor([k for name, k in chunk if name == kind], device=device)
            if kind == "original":
                parts.append(x)
            elif kind == "baseline":
                parts.append(reference)
            else:
                parts.append(perturbed_inputs(x, reference, step_map, ks, kind))
        values = target_scores(model, target, torch.cat(parts))
        ordered = [job for kind in dict.fromkeys(kind for kind, _ in chunk) for job in chunk if job[0] == kind]
        scores.update({job: float(v) for job, v in zip(ordered, values)})
        progress(min(start + batch_size, len(jobs)), len(jobs), unit="passes")
    curves = {}
    for kind in kinds:
        inner = [scores[(kind, k)] for k in range(1, steps)]
        ends = (scores[("original", 0)], scores[("baseline", 0)])
        first, last = ends if kind == "deletion" else ends[::-1]
        curves[kind] = Curve(kind, baseline, fractions, np.array([first, *inner, last], dtype=np.float64))
    return curves
