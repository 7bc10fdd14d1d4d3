"""Where occluders go, and how their score drops become a map.

Occluders are boxes of ``size`` voxels placed every ``stride`` voxels along each axis, as MONAI's
sliding windows are: starting at 0, with the last box moved back to end at the border, so every voxel
is occluded at least once. (Captum's ``Occlusion`` instead cuts the last box short at the border; the
two agree whenever ``(length − size)`` is a multiple of ``stride``.)

The map at a voxel is the mean drop of the occluders that cover it. Because the grid is a product of
three 1D placements, that mean is a separable sum (see :func:`mean_drop_map`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch


def axis_starts(length: int, size: int, stride: int) -> list[int]:
    """Start indices of the boxes along one axis (``size`` is clipped to ``length``)."""
    size = min(size, length)
    count = -(-(length - size) // stride) + 1  # ceil
    return [min(i * stride, length - size) for i in range(count)]


@dataclass(frozen=True)
class OccluderGrid:
    """A product grid of equal boxes over a volume of ``shape`` voxels."""

    shape: tuple[int, int, int]
    size: tuple[int, int, int]
    stride: tuple[int, int, int]

    @property
    def box_size(self) -> tuple[int, int, int]:
        return tuple(min(s, n) for s, n in zip(self.size, self.shape))

    @property
    def starts(self) -> tuple[list[int], list[int], list[int]]:
        return tuple(axis_starts(n, s, t) for n, s, t in zip(self.shape, self.size, self.stride))

    @property
    def counts(self) -> tuple[int, int, int]:
        return tuple(len(s) for s in self.starts)

    def __len__(self) -> int:
        x, y, z = self.counts
        return x * y * z

    def boxes(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """All boxes, x slowest: (N, 2, 3) long tensor of [low, high) corners."""
        low = torch.tensor(list(itertools.product(*self.starts)), dtype=torch.long, device=device).view(-1, 3)
        size = torch.tensor(self.box_size, dtype=torch.long, device=device)
        return torch.stack([low, low + size], dim=1)

    def axis_masks(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Per axis a (n_boxes, length) 0/1 float tensor: which voxels each box position covers."""
        masks = []
        for starts, size, length in zip(self.starts, self.box_size, self.shape):
            index = torch.arange(length, device=device)
            low = torch.tensor(starts, device=device)[:, None]
            masks.append(((index >= low) & (index < low + size)).float())
        return masks


def mean_drop_map(drops: torch.Tensor, masks: Sequence[torch.Tensor], evaluated: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean drop of the covering occluders at every voxel.

    Args:
        drops: (nx, ny, nz) score drop of each box of the grid.
        masks: the grid's :meth:`OccluderGrid.axis_masks`, (nx, X), (ny, Y), (nz, Z).
        evaluated: optional (nx, ny, nz) 0/1: only these boxes count (adaptive occlusion).
    Returns:
        (map, coverage), each (X, Y, Z): map = Σ covering drops / coverage (0 where coverage is 0),
        coverage = number of counted boxes covering the voxel.
    """
    weight = torch.ones_like(drops) if evaluated is None else evaluated.to(drops.dtype)
    mx, my, mz = (m.to(drops.dtype) for m in masks)
    total = torch.einsum("abc,ax,by,cz->xyz", drops * weight, mx, my, mz)
    coverage = torch.einsum("abc,ax,by,cz->xyz", weight, mx, my, mz)
    return torch.where(coverage > 0, total / coverage.clamp_min(1), torch.zeros_like(total)), coverage
