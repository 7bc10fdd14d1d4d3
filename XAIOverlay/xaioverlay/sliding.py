"""Sliding windows as MONAI's ``SlidingWindowInferer`` (or nnU-Net's predictor) places and blends them.

A segmenter run window by window outputs y = Σ_w g_w · y_w / Σ_w g_w (g_w: the window's importance
map). A region target T = Σ_region y_c is therefore a sum of per-window targets
T_w = Σ (g_w / Σ g) · y_{w,c} over the window, and each T_w depends only on that window's input. So
a map that is linear in the target (gradients, LRP, gradient×input) is the sum of per-window maps,
and windows that do not touch the region are skipped. CAMs, which are not linear, are summed the
same way (an approximation, documented).

Two layouts: ``monai`` (MONAI's tile placement and importance map) and ``nnunet`` (nnU-Net v2's:
tiles spread evenly between the first and the last position, Gaussian of σ = tile/8 made by filtering
a unit impulse at the tile's centre, always tiled, even a volume no larger than one tile).
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np
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


def monai_starts(size: int, window: int, overlap: float) -> list[int]:
    """MONAI's window starts along one axis: step ``int(roi · (1 − overlap))`` (at least 1; a full window
    when roi equals the size); the last window is moved back to end at the border."""
    step = window if window == size else max(int(window * (1 - overlap)), 1)
    count = next(d for d in range(size + 1) if d * step + window >= size) + 1
    return [min(d * step, size - window) for d in range(count)]


def nnunet_starts(size: int, window: int, overlap: float) -> list[int]:
    """nnU-Net's tile starts along one axis: as few tiles as a step of ``window · (1 − overlap)`` needs,
    spread evenly from 0 to ``size − window`` (rounded to whole voxels)."""
    room = size - window
    count = int(np.ceil(room / (window * (1 - overlap)))) + 1
    if count == 1:
        return [0]
    return [int(np.round(room / (count - 1) * d)) for d in range(count)]


def window_slices(
    spatial: Sequence[int], roi: Sequence[int], overlap: float, layout: str = "monai"
) -> list[tuple[slice, slice, slice]]:
    """Window positions over a (padded) volume, x slowest (the order both MONAI and nnU-Net use)."""
    starts_of = nnunet_starts if layout == "nnunet" else monai_starts
    starts_per_axis = [starts_of(size, window, overlap) for size, window in zip(spatial, roi)]
    return [
        tuple(slice(s, s + w) for s, w in zip(starts, roi))
        for starts in itertools.product(*starts_per_axis)
    ]


def blend_weights(window: SlidingWindow, spatial: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Importance map of one window (roi), its sum over all windows (spatial), and the window slices."""
    if window.layout == "nnunet":
        importance = nnunet_gaussian(window.roi_size, window.sigma_scale).to(device)
    else:
        from monai.data.utils import compute_importance_map

        importance = compute_importance_map(
            window.roi_size, mode=window.mode, sigma_scale=window.sigma_scale, device=device, dtype=torch.float32
        ).float()
    slices = window_slices(spatial, window.roi_size, window.overlap, window.layout)
    total = torch.zeros(tuple(spatial), device=device)
    for part in slices:
        total[part] += importance
    return importance, total, slices


def nnunet_gaussian(roi: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """nnU-Net's importance map, shape ``roi``: a unit impulse at voxel ``roi // 2`` filtered by a Gaussian of
    σ = ``roi · sigma_scale`` (zero outside the tile), scaled to a maximum of 1, zeros raised to the smallest
    positive value so every voxel counts. (nnU-Net holds it and the blended sum in float16; float32 here.)"""
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(tuple(roi))
    impulse[tuple(r // 2 for r in roi)] = 1.0
    smooth = gaussian_filter(impulse, [r * sigma_scale for r in roi], 0, mode="constant", cval=0)
    smooth /= smooth.max()
    smooth[smooth == 0] = smooth[smooth > 0].min()
    return torch.from_numpy(smooth).float()


def blended_output(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, window: SlidingWindow
) -> torch.Tensor:
    """Whole-volume output blended from windows as :func:`blend_weights` places and weighs them.

    Args:
        forward: (B, C, *roi) → (B, K, *roi).
        x: (1, C, X, Y, Z).
    Returns:
        (1, K, X, Y, Z).
    """
    pads = window_padding(x.shape[2:], window.roi_size)
    padded = pad(x, pads)
    importance, total, slices = blend_weights(window, padded.shape[2:], x.device)
    result = None
    for first in range(0, len(slices), window.sw_batch_size):
        group = slices[first:first + window.sw_batch_size]
        out = forward(torch.cat([padded[(slice(None), slice(None), *part)] for part in group]))
        if result is None:
            result = out.new_zeros((1, out.shape[1], *padded.shape[2:]))
        for number, part in enumerate(group):
            result[(slice(None), slice(None), *part)] += out[number:number + 1] * importance
    return unpad(result / total, pads)
