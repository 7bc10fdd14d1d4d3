"""What "removed" input becomes: the values occlusion pastes, deletion/insertion and ROAD perturb
towards, and integrated gradients start from — zeros, each channel's mean, or the input blurred."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import InputError

KINDS = ("zero", "mean", "blur")


def gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    """Normalised 1D Gaussian truncated at 3σ: (2r + 1,), r = max(1, ceil(3σ)), float32."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(x: torch.Tensor, sigma_voxels: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of each channel along the spatial axes, borders replicated.

    Args:
        x: (B, C, X, Y, Z).
        sigma_voxels: standard deviation in voxels, one for all axes or one per axis (0: leave the axis).
    Returns:
        (B, C, X, Y, Z) in ``x``'s dtype (computed in float32).
    """
    sigmas = [float(sigma_voxels)] * 3 if isinstance(sigma_voxels, (int, float)) else [float(s) for s in sigma_voxels]
    channels = x.shape[1]
    out = x.float()
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        kernel = gaussian_kernel(sigma, x.device)
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        weight = kernel.view(1, 1, *shape).repeat(channels, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = kernel.numel() // 2
        out = F.conv3d(F.pad(out, pad, mode="replicate"), weight, groups=channels)
    return out.to(x.dtype)


def baseline(x: torch.Tensor, kind: str, blur_sigma_voxels: float | Sequence[float] = 4.0) -> torch.Tensor:
    """The baseline of ``x`` for every voxel.

    Args:
        x: (B, C, X, Y, Z).
        kind: ``zero``, ``mean`` (each channel's mean over the volume) or ``blur`` (Gaussian, σ =
            ``blur_sigma_voxels``: detail below that scale removed, the local mean kept).
    Returns:
        (B, C, X, Y, Z), a new tensor.
    """
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        return gaussian_blur(x, blur_sigma_voxels)
    raise InputError(f"unknown baseline {kind!r}; use one of: {', '.join(KINDS)}")
