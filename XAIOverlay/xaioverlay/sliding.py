"""Sliding windows as MONAI's ``SlidingWindowInferer`` places and blends them, for explanations.

A segmenter run window by window outputs y = Σ_w g_w · y_w / Σ_w g_w (g_w: the window's importance
map). A region target T = Σ_region y_c is therefore a sum of per-window targets
T_w = Σ (g_w / Σ g) · y_{w,c} over the window, and each T_w depends only on that window's input. So
a map that is linear in the target (gradients, LRP, gradient×input) is the sum of per-window maps,
and windows that do not touch the region are skipped. CAMs, which are not linear, are summed the
same way (an approximation, documented).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F

from .models.base import SlidingWindow


def window_padding(spatial: Sequence[int], roi: Sequence[int]) -> list[tuple[int, int]]:
    """Per axis (before, after) zero padding that makes the volume at least one window large."""
    pads = []
    for size, window in zip(spatial, roi):
        missing = max(window - size, 0)
        pads.append((missing // 2, missing - missing // 2))
    return pads


def pad(x: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    """Zero-pad the last three axes of ``x`` by ``pads`` (see :func:`window_padding`)."""
    flat = [p for before_after in reversed(pads) for p in before_after]
    return F.pad(x, flat) if any(flat) else x


def unpad(x: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    """Inverse of :func:`pad` on the last three axes."""
    index = tuple(slice(before, x.shape[-3 + axis] - after) for axis, (before, after) in enumerate(pads))
    return x[(..., *index)]


def window_slices(spatial: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[slice, slice, slice]]:
    """Window positions over a (padded) volume, in MONAI's order.

    Step along an axis: ``int(roi · (1 − overlap))`` (at least 1; a full window when roi equals the
    size); the last window is moved back to end at the border.
    """
    starts_per_axis = []
    for size, window in zip(spatial, roi):
        step = window if window == size else max(int(window * (1 - overlap)), 1)
        count = next(d for d in range(size + 1) if d * step + window >= size) + 1
        starts_per_axis.append([min(d * step, size - window) for d in range(count)])
    return [
        tuple(slice(s, s + w) for s, w in zip(starts, roi))
        for starts in itertools.product(*starts_per_axis)
    ]


def blend_weights(window: SlidingWindow, spatial: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Importance map of one window (roi), its sum over all windows (spatial), and the window slices."""
    from monai.data.utils import compute_importance_map

    importance = compute_importance_map(
        window.roi_size, mode=window.mode, sigma_scale=window.sigma_scale, device=device, dtype=torch.float32
    ).float()
    slices = window_slices(spatial, window.roi_size, window.overlap)
    total = torch.zeros(tuple(spatial), device=device)
    for part in slices:
        total[part] += importance
    return importance, total, slices
