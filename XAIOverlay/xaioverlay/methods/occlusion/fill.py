"""What replaces the occluded voxels: zero, the input's mean, or the input blurred at the occluder's scale."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    """Normalised 1D Gaussian truncated at 3σ: (2r + 1,), r = ceil(3σ)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(x: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of each channel, borders replicated.

    Args:
        x: (B, C, X, Y, Z).
        sigma: standard deviation per axis, voxels.
    Returns:
        (B, C, X, Y, Z).
    """
    channels = x.shape[1]
    out = x.float()
    for axis, s in enumerate(sigma):
        if s <= 0:
            continue
        kernel = gaussian_kernel(float(s), x.device)
        radius = kernel.numel() // 2
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        weight = kernel.view(1, 1, *shape).repeat(channels, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), weight, groups=channels)
    return out.to(x.dtype)


def fill_values(x: torch.Tensor, fill: str, size: Sequence[int]) -> torch.Tensor:
    """The values an occluder pastes, for every voxel.

    Args:
        x: (1, C, X, Y, Z) the input.
        fill: ``zero``, ``mean`` (per-channel mean of ``x``) or ``blur`` (Gaussian, σ = half the
            occluder size per axis: detail at the occluder's scale is removed, the local mean kept).
        size: occluder size in voxels (for ``blur``).
    Returns:
        (1, C, X, Y, Z).
    """
    if fill == "zero":
        return torch.zeros_like(x)
    if fill == "mean":
        return x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x).contiguous()
    if fill == "blur":
        return gaussian_blur(x, [s / 2 for s in size])
    raise ValueError(f"unknown fill {fill!r}")
