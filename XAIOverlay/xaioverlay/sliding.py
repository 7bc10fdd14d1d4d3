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

:func:`blended_blocks` runs the same inference but hands out the blended output block by block, as
soon as every window covering a block has been run, so that no caller needs the whole multi-channel
output at once (105 channels on a CT-sized grid are 9.5 GB of float32).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

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


@dataclass
class RegionShares:
    """A region target split over sliding windows: T = Σ_region w · y_c = Σ_window T_window, where
    T_window = Σ (g · w / Σ g) · y_{window, c} over the window depends on that window's output only.

    Attributes:
        pads: the padding the windows are cut from (see :func:`window_padding`).
        windows: every window's slices of the padded grid, in the inferer's order.
        active: the windows whose share is not zero (the others cannot change the target).
        share: (X, Y, Z) w / Σ g on the padded grid; importance: (*roi) g of one window.
    """

    pads: list[tuple[int, int]]
    windows: list[tuple[slice, slice, slice]]
    active: list[tuple[slice, slice, slice]]
    share: torch.Tensor
    importance: torch.Tensor

    def weights(self, part: tuple[slice, slice, slice]) -> torch.Tensor:
        """(*roi) weights of the window at ``part``: its target is Σ weights · y_{window, c}."""
        return self.share[part] * self.importance


def region_shares(window: SlidingWindow, weights: torch.Tensor) -> RegionShares:
    """Split a region target with (X, Y, Z) ``weights`` on the unpadded grid over ``window``'s windows."""
    pads = window_padding(weights.shape, window.roi_size)
    padded = pad(weights, pads)
    importance, total, slices = blend_weights(window, padded.shape, weights.device)
    share = torch.where(total > 0, padded / total.clamp_min(1e-12), torch.zeros_like(total))
    active = [part for part in slices if bool((share[part] != 0).any())]
    return RegionShares(pads, slices, active, share, importance)


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


def assemble(blocks: Iterable[tuple[tuple[slice, ...], torch.Tensor]], spatial_shape: Sequence[int]) -> torch.Tensor:
    """Blocks of an output (see :func:`blended_blocks`) put together: (B, K, X, Y, Z); one whole block as it is.

    Holds every channel at every voxel: for small volumes and tests; the engine's paths use the blocks."""
    out = None
    for part, block in blocks:
        if part == (slice(None),) * 3:
            return block
        if out is None:
            out = block.new_empty((block.shape[0], block.shape[1], *spatial_shape))
        out[(slice(None), slice(None), *part)] = block
    return out


def blended_output(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, window: SlidingWindow
) -> torch.Tensor:
    """Whole-volume output (1, K, X, Y, Z) blended from windows as :func:`blend_weights` places and weighs them;
    differentiable when ``forward`` is. ``forward``: (B, C, *roi) → (B, K, *roi)."""
    return assemble(blended_blocks(window, x, forward), x.shape[2:])


def _cells(size: int, parts: list[slice]) -> list[tuple[int, int]]:
    """An axis cut at every window start and stop: [(low, high)] cells, each covered by a fixed set of windows."""
    cuts = sorted({0, size, *(p.start for p in parts), *(p.stop for p in parts)})
    return list(zip(cuts[:-1], cuts[1:]))


def blended_blocks(
    window: SlidingWindow, x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
    on_window: Callable[[int, int], None] = lambda done, total: None,
) -> Iterator[tuple[tuple[slice, slice, slice], torch.Tensor]]:
    """The model's sliding-window inference of ``forward`` on ``x`` (MONAI's or nnU-Net's layout, see
    :func:`blend_weights`), yielded block by block.

    The volume is cut into cells at every window start and stop; a cell's blended output
    (Σ_w g_w · y_w / Σ_w g_w, summed in MONAI's window order, so equal to ``sliding_window_inference``)
    is yielded once the last window covering it has run, and then forgotten. Only the cells that have
    some but not all of their windows are held: about one slab of windows' overlap, not the volume.

    Args:
        x: (B, C, X, Y, Z) input.
        forward: (N, C, *roi) → (N, K, *roi) network output.
        on_window: called with (windows done, total) after every batch of windows.
    Yields:
        (slices of the unpadded (X, Y, Z) grid, (B, K, *block) float32 blended output).
    """
    pads = window_padding(x.shape[2:], window.roi_size)
    padded = pad(x, pads)
    importance, total, slices = blend_weights(window, padded.shape[2:], x.device)
    cells = [_cells(n, [part[axis] for part in slices]) for axis, n in enumerate(padded.shape[2:])]
    covering: dict[tuple[int, int, int], int] = {}
    window_cells = []
    for part in slices:
        ranges = [[i for i, (low, high) in enumerate(cells[a]) if low >= part[a].start and high <= part[a].stop]
                  for a in range(3)]
        inside = list(itertools.product(*ranges))
        window_cells.append(inside)
        for cell in inside:
            covering[cell] = covering.get(cell, 0) + 1
    held: dict[tuple[int, int, int], torch.Tensor] = {}
    batch = max(int(window.sw_batch_size), 1)
    for first in range(0, len(slices), batch):
        group = slices[first:first + batch]
        out = forward(torch.cat([padded[(slice(None), slice(None), *part)] for part in group]))
        for number, part in enumerate(group):
            weighted = out[number * x.shape[0]:(number + 1) * x.shape[0]] * importance
            for cell in window_cells[first + number]:
                bounds = [cells[a][cell[a]] for a in range(3)]
                local = tuple(slice(low - part[a].start, high - part[a].start) for a, (low, high) in enumerate(bounds))
                if cell in held:
                    held[cell] += weighted[(slice(None), slice(None), *local)]
                else:
                    held[cell] = weighted[(slice(None), slice(None), *local)].clone()
                covering[cell] -= 1
                if covering[cell] == 0:
                    block = _unpadded(bounds, pads, padded.shape[2:])
                    if block is not None:
                        grid = tuple(slice(low, high) for low, high in bounds)
                        inner = tuple(slice(b.start - low + before, b.stop - low + before)
                                      for b, (low, _), (before, _) in zip(block, bounds, pads))
                        yield block, (held[cell] / total[grid])[(slice(None), slice(None), *inner)]
                    del held[cell]
            del weighted
        del out
        on_window(min(first + batch, len(slices)), len(slices))


def _unpadded(bounds: list[tuple[int, int]], pads: list[tuple[int, int]],
              padded: Sequence[int]) -> tuple[slice, slice, slice] | None:
    """A cell [low, high) of the padded grid as slices of the unpadded grid; None when it is all padding."""
    block = tuple(slice(max(low - before, 0), min(high - before, n - before - after))
                  for (low, high), (before, after), n in zip(bounds, pads, padded))
    return block if all(b.stop > b.start for b in block) else None
