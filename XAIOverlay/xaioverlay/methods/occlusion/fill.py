"""What replaces the occluded voxels: zero, the input's mean, or the input blurred at the occluder's scale."""

from __future__ import annotations

from typing import Sequence

import torch

from ...baselines import baseline


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
    return baseline(x, fill, [s / 2 for s in size])
