"""Gradient × input and integrated gradients (Sundararajan et al. 2017).

Both are model-agnostic (no hooks: they also run on TorchScript models) and signed. IG integrates the
gradient along the straight path from a baseline ``b`` to the input ``x``:
``IG(x) = (x − b) ⊙ ∫₀¹ ∇T(b + α (x − b)) dα``, with Gauss–Legendre quadrature (as Captum's default),
the path points run through the network in batches that follow free memory. Completeness,
``Σ IG = T(x) − T(b)``, is checked on every run and recorded.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from .. import sliding
from ..baselines import baseline
from ..errors import InputError
from ..memory import batch_that_fits, run_in_batches, saved_for_backward
from ..models.base import LoadedModel
from ..progress import NO_PROGRESS, Progress
from ..targets import Target
from .base import NO_CONTEXT, Attribution, Context, Method, relative_error

log = logging.getLogger(__name__)

BASELINES = ("zero", "blurred", "mean")
#: Gaussian σ of the blurred baseline, in voxels of the model grid.
BLUR_SIGMA_VOXELS = 5.0


def gradient_times_input(model: LoadedModel, x: torch.Tensor, target: Target) -> torch.Tensor:
    """``x ⊙ ∂T/∂x`` for a batch: (B, C, X, Y, Z) → (B, C, X, Y, Z); one forward and one backward pass."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(target(model.forward(x)).sum(), x)
    return (x * grad).detach()


def make_baseline(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The IG baseline for ``x`` (B, C, X, Y, Z): zeros, a Gaussian-blurred copy, or each channel's mean."""
    if kind not in BASELINES:
        raise InputError(f"unknown IG baseline {kind!r}; use one of: {', '.join(BASELINES)}")
    return baseline(x, "blur" if kind == "blurred" else kind, BLUR_SIGMA_VOXELS)


def gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes α ∈ (0, 1) and weights (summing to 1) of ``steps``-point Gauss–Legendre quadrature."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (nodes + 1) / 2, weights / 2


#: Most path points per batch: on a CPU more gain nothing (one 96³ window of a UNet(16…256), measured here:
#: 2 output channels 1.24, 1.01, 1.36 s per point at 1, 2, 4 points; 105 channels 31 and 90 s at 1 and 2);
#: on a GPU, as many as memory allows.
MOST_PATH_POINTS = {"cpu": 4, "cuda": 64}
#: A path point's memory over what autograd saves for its backward pass: the output and the backward
#: pass's gradients come on top (peak resident memory over saved bytes, one 96³ window of a UNet(16…256)
#: on CPU, measured here: 2.3× with 105 output channels, 2.7× with 2).
ITEM_OVER_SAVED = 3.0


def path_gradients(model: LoadedModel, points: torch.Tensor, target: Target) -> torch.Tensor:
    """``∂T/∂x`` at each of a batch of path points: (N, C, X, Y, Z) → (N, C, X, Y, Z)."""
    with torch.enable_grad():
        points = points.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(target(model.forward(points)).sum(), points)
    return grad


def path_batch(device: torch.device, saved_bytes: int, point: torch.Tensor) -> int:
    """Path points per batch after one point's backward pass saved ``saved_bytes``: as many as fit in free
    memory (see :func:`~xaioverlay.memory.batch_that_fits`), at most :data:`MOST_PATH_POINTS`."""
    item = max(saved_bytes * ITEM_OVER_SAVED, 3 * point.numel() * point.element_size())
    return batch_that_fits(device, int(item), MOST_PATH_POINTS.get(device.type, 8))


def integrated_gradients(
    model: LoadedModel, x: torch.Tensor, target: Target, baseline: torch.Tensor, steps: int = 64,
    batch_size: int | None = None, progress: Progress = NO_PROGRESS,
) -> tuple[torch.Tensor, dict]:
    """IG of ``target`` for one input ``x`` (1, C, X, Y, Z) from ``baseline`` (same shape).

    Args:
        batch_size: path points per forward+backward pass; None: the first point alone, measuring what its
            backward pass holds, then as many as fit in free memory (:func:`path_batch`). Either way a
            batch that runs out of memory is halved. The map does not depend on it (up to float rounding).
    Returns:
        (attributions (1, C, X, Y, Z), completeness record: Σ attributions against T(x) − T(b)).
    """
    alphas, weights = gauss_legendre(steps)
    difference = (x - baseline).detach()
    total = torch.zeros_like(x)
    size = batch_size

    def run(start: int, stop: int) -> None:
        nonlocal size
        alpha = torch.as_tensor(alphas[start:stop], dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1, 1)
        weight = torch.as_tensor(weights[start:stop], dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1, 1)
        with saved_for_backward() if size is None else contextlib.nullcontext({}) as saved:
            grad = path_gradients(model, baseline + alpha * difference, target)
        if size is None:
            size = path_batch(x.device, sum(saved.values()), x)
            log.info("integrated gradients: %d path points per batch", size)
        total.add_((weight * grad).sum(0, keepdim=True))
        progress(stop, steps, unit="steps")

    run_in_batches(steps, run, lambda: size or 1, "integrated gradients")
    attributions = difference * total
    with torch.no_grad():  # one item at a time: no more memory than a path point
        change = float(target(model.forward(x))[0] - target(model.forward(baseline))[0])
    summed = float(attributions.sum())
    completeness = {
        "sum_attributions": summed,
        "score_difference": change,
        "relative_error": relative_error(summed, change),
    }
    return attributions.detach(), completeness


class GradientTimesInput(Method):
    name = "gxi"
    label = "Gradient × input"
    signed = True
    additive = True
    summary = "gradient × input: x ⊙ ∂score/∂x, one backward pass (no option)"

    def attribute(self, model: LoadedModel, x: torch.Tensor, target: Target, progress: Progress = NO_PROGRESS,
                  context: Context = NO_CONTEXT) -> Attribution:
        result = gradient_times_input(model, x, target)
        progress(1, 1, unit="passes")
        return Attribution(result[0].sum(0), signed=True, parameters={})


class IntegratedGradients(Method):
    """Option ``STEPS``, ``BASELINE`` or ``STEPS/BASELINE``, e.g. ``ig:128/blurred``."""

    name = "ig"
    label = "Integrated gradients"
    signed = True
    additive = True
    summary = f"integrated gradients (option: STEPS and/or BASELINE {'|'.join(BASELINES)}, e.g. ig:64/blurred; default 64/zero)"
    demo_spec = "ig:16"

    def __init__(self, steps: int = 64, baseline: str = "zero", batch_size: int | None = None) -> None:
        if steps < 1:
            raise InputError(f"IG needs at least 1 step (got {steps}); e.g. ig:64")
        if baseline not in BASELINES:
            raise InputError(f"unknown IG baseline {baseline!r}; use one of: {', '.join(BASELINES)} (e.g. ig:64/blurred)")
        self.steps, self.baseline, self.batch_size = steps, baseline, batch_size

    @classmethod
    def from_option(cls, option: str | None, *, layer: str | None = None) -> "IntegratedGradients":
        steps, baseline = 64, "zero"
        for part in (option or "").split("/"):
            part = part.strip().lower()
            if not part:
                continue
            if part.isdigit():
                steps = int(part)
            elif part in BASELINES:
                baseline = part
            else:
                raise InputError(f"cannot read IG option {option!r}; use STEPS, BASELINE or STEPS/BASELINE with BASELINE one of {', '.join(BASELINES)}")
        return cls(steps, baseline)

    @property
    def spec(self) -> str:
        parts = ([str(self.steps)] if self.steps != 64 else []) + ([self.baseline] if self.baseline != "zero" else [])
        return f"{self.name}:{'/'.join(parts)}" if parts else self.name

    def begin_windows(self, x: torch.Tensor, pads) -> torch.Tensor:
        # one baseline for the whole volume, padded as the windows are: a window's own mean or blur differs
        return sliding.pad(make_baseline(x, self.baseline), pads)

    def attribute(self, model: LoadedModel, x: torch.Tensor, target: Target, progress: Progress = NO_PROGRESS,
                  context: Context = NO_CONTEXT) -> Attribution:
        if context.window is not None and context.whole_volume is not None:
            baseline = context.whole_volume[(slice(None), slice(None), *context.window)]
        else:
            baseline = make_baseline(x, self.baseline)
        attributions, completeness = integrated_gradients(model, x, target, baseline, self.steps, self.batch_size, progress)
        parameters = {"steps": self.steps, "baseline": self.baseline, "quadrature": "gauss-legendre"}
        if self.baseline == "blurred":
            parameters["blur_sigma_voxels"] = BLUR_SIGMA_VOXELS
        return Attribution(attributions[0].sum(0), signed=True, parameters=parameters, extras={"completeness": completeness})

    @classmethod
    def combine_extras(cls, extras: list[dict]) -> dict:
        """Window by window: sums and score differences add up."""
        summed = sum(e["completeness"]["sum_attributions"] for e in extras)
        change = sum(e["completeness"]["score_difference"] for e in extras)
        return {"completeness": {"sum_attributions": summed, "score_difference": change, "relative_error": relative_error(summed, change)}}
