"""Boxes on voxel grids, one per batch item: how a layer moves them, and reading a box out of a tensor.

A box is a pair of (B, 3) long tensors ``low``, ``high`` (exclusive): one box per batch item, on
each of the three spatial axes. A box is empty where ``high <= low`` on some axis.

Local layers are described per axis by (k, s, p): the extent of the kernel in voxels (dilation
included: ``d·(kernel − 1) + 1``), the stride and the padding. Output voxel ``o`` of a convolution or
pooling reads input voxels ``[o·s − p, o·s − p + k)``; input voxel ``i`` of a transposed convolution
writes output voxels ``[i·s − p, i·s − p + k)``.
"""

from __future__ import annotations

from typing import Sequence

import torch

Box = tuple[torch.Tensor, torch.Tensor]


def _t(values: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long, device=like.device)


def floor_div(a: torch.Tensor, b) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def ceil_div(a: torch.Tensor, b) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def empty(box: Box) -> torch.Tensor:
    """(B,) True where the box holds no voxel."""
    low, high = box
    return (high <= low).any(-1)


def clip(box: Box, shape: Sequence[int]) -> Box:
    """Clip to ``[0, shape)``; empty boxes become ``[0, 0)``."""
    low, high = box
    low = torch.maximum(low, torch.zeros_like(low))
    high = torch.minimum(high, _t(shape, high))
    gone = (high <= low).any(-1, keepdim=True)
    return torch.where(gone, 0, low), torch.where(gone, 0, high)


def intersect(a: Box, b: Box) -> Box:
    return clip((torch.maximum(a[0], b[0]), torch.minimum(a[1], b[1])), [2**62] * 3)


def union(a: Box, b: Box) -> Box:
    """Bounding box of both (an empty operand is ignored)."""
    a_empty, b_empty = empty(a)[:, None], empty(b)[:, None]
    low = torch.where(a_empty, b[0], torch.where(b_empty, a[0], torch.minimum(a[0], b[0])))
    high = torch.where(a_empty, b[1], torch.where(b_empty, a[1], torch.maximum(a[1], b[1])))
    return low, high


def whole(shape: Sequence[int], batch: int, device) -> Box:
    low = torch.zeros((batch, 3), dtype=torch.long, device=device)
    return low, low + torch.as_tensor(shape, dtype=torch.long, device=device)


def window_forward(box: Box, k, s, p, out_shape) -> Box:
    """Input voxels that changed → output voxels of a convolution/pooling that change."""
    low, high = box
    out = (floor_div(low + _t(p, low) - _t(k, low), _t(s, low)) + 1, ceil_div(high + _t(p, high), _t(s, high)))
    return clip(_keep_empty(box, out), out_shape)


def window_backward(box: Box, k, s, p, in_shape) -> Box:
    """Output voxels needed → input voxels a convolution/pooling reads for them."""
    low, high = box
    out = (low * _t(s, low) - _t(p, low), (high - 1) * _t(s, high) - _t(p, high) + _t(k, high))
    return clip(_keep_empty(box, out), in_shape)


def transposed_forward(box: Box, k, s, p, out_shape) -> Box:
    """Input voxels that changed → output voxels of a transposed convolution that change."""
    low, high = box
    out = (low * _t(s, low) - _t(p, low), (high - 1) * _t(s, high) - _t(p, high) + _t(k, high))
    return clip(_keep_empty(box, out), out_shape)


def transposed_backward(box: Box, k, s, p, in_shape) -> Box:
    """Output voxels needed → input voxels of a transposed convolution that write to them."""
    low, high = box
    out = (ceil_div(low + _t(p, low) - _t(k, low) + 1, _t(s, low)), floor_div(high - 1 + _t(p, high), _t(s, high)) + 1)
    return clip(_keep_empty(box, out), in_shape)


def _keep_empty(before: Box, after: Box) -> Box:
    gone = empty(before)[:, None]
    return torch.where(gone, 0, after[0]), torch.where(gone, 0, after[1])


def fit(box: Box, shape: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int, int], torch.Tensor]:
    """One box size for the whole batch: the largest, each box moved to fit inside ``[0, shape)``.

    Returns:
        (low (B, 3), size, valid (B,)): every non-empty box lies inside ``[low, low + size)``;
        ``valid`` is False for empty boxes (their ``low`` is 0).
    """
    low, high = box
    valid = ~empty(box)
    if not bool(valid.any()):
        return torch.zeros_like(low), (0, 0, 0), valid
    size = torch.where(valid[:, None], high - low, 0).amax(0)
    low = torch.where(valid[:, None], low, 0)
    low = torch.minimum(low, _t(shape, low) - size)
    return low, tuple(int(v) for v in size), valid


def read_box(source: torch.Tensor, low: torch.Tensor, size: Sequence[int], fill: float = 0.0) -> torch.Tensor:
    """Read one box per batch item; voxels outside the tensor read as ``fill``.

    On CUDA one gather does the whole batch; on CPU copying each item's slab is several times
    faster than a gather (contiguous rows), so items are copied one by one.

    Args:
        source: (1, C, X, Y, Z) read for every item, or (B, C, X, Y, Z) read per item.
        low: (B, 3) box corners (may lie partly outside the tensor).
        size: box size, shared by all items.
    Returns:
        (B, C, *size).
    """
    if low.device.type == "cpu" and not VECTORISED_ON_CPU:
        return _read_each(source, low, size, fill)
    index, inside = box_index(low, size, source.shape[2:])
    batch, channels = low.shape[0], source.shape[1]
    if source.shape[0] == 1:
        values = source.reshape(channels, -1)[:, index.view(-1)].view(channels, batch, -1).transpose(0, 1)
    else:
        values = source.reshape(batch, channels, -1).gather(2, index.view(batch, 1, -1).expand(-1, channels, -1))
    values = values.reshape(batch, channels, *size)
    if inside is not None:
        values = torch.where(inside[:, None], values, torch.full((), fill, dtype=values.dtype, device=values.device))
    return values


#: Tests set this to check the CUDA code path on CPU.
VECTORISED_ON_CPU = False


def _overlap(a_low: Sequence[int], a_size: Sequence[int], b_low: Sequence[int], b_size: Sequence[int]):
    """Slices of box a and of box b covering their intersection, or None when they do not meet."""
    into, out_of = [], []
    for al, asz, bl, bsz in zip(a_low, a_size, b_low, b_size):
        start, stop = max(al, bl), min(al + asz, bl + bsz)
        if stop <= start:
            return None
        into.append(slice(start - al, stop - al))
        out_of.append(slice(start - bl, stop - bl))
    return tuple(into), tuple(out_of)


def _read_each(source: torch.Tensor, low: torch.Tensor, size: Sequence[int], fill: float) -> torch.Tensor:
    batch, channels, shape = low.shape[0], source.shape[1], tuple(source.shape[2:])
    lows = low.tolist()
    inside = all(0 <= l and l + n <= m for corner in lows for l, n, m in zip(corner, size, shape))
    if inside:
        return torch.stack([source[0 if source.shape[0] == 1 else b, :, x:x + size[0], y:y + size[1], z:z + size[2]]
                            for b, (x, y, z) in enumerate(lows)])
    out = torch.full((batch, channels, *size), fill, dtype=source.dtype, device=source.device)
    for b, corner in enumerate(lows):
        overlap = _overlap(corner, size, (0, 0, 0), shape)
        if overlap is not None:
            out[(b, slice(None), *overlap[0])] = source[(0 if source.shape[0] == 1 else b, slice(None), *overlap[1])]
    return out


def paste(out: torch.Tensor, low: torch.Tensor, patch: torch.Tensor, patch_low: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Boxes ``out`` (B, C, *size) at ``low`` with each valid item's ``patch`` (B, C, *psize) at
    ``patch_low`` written over the part where they meet. Returns ``out`` (changed in place on CPU)."""
    size, patch_size = tuple(out.shape[2:]), tuple(patch.shape[2:])
    if low.device.type == "cpu" and not VECTORISED_ON_CPU:
        for b, (corner, patch_corner, ok) in enumerate(zip(low.tolist(), patch_low.tolist(), valid.tolist())):
            overlap = _overlap(corner, size, patch_corner, patch_size) if ok else None
            if overlap is not None:
                out[(b, slice(None), *overlap[0])] = patch[(b, slice(None), *overlap[1])]
        return out
    inside = in_box(low, size, (patch_low, patch_low + torch.as_tensor(patch_size, device=low.device)))
    inside &= valid[:, None, None, None]
    return torch.where(inside[:, None], read_box(patch, low - patch_low, size).to(out.dtype), out)


def paste_fill(out: torch.Tensor, low: torch.Tensor, fill: torch.Tensor, box: Box) -> torch.Tensor:
    """Boxes ``out`` (B, C, *size) at ``low`` with ``fill`` (1, C, X, Y, Z) written inside ``box``."""
    size = tuple(out.shape[2:])
    if low.device.type == "cpu" and not VECTORISED_ON_CPU:
        for b, (corner, box_low, box_high) in enumerate(zip(low.tolist(), box[0].tolist(), box[1].tolist())):
            overlap = _overlap(corner, size, box_low, [h - l for l, h in zip(box_low, box_high)])
            if overlap is not None:
                region = tuple(slice(c + s.start, c + s.stop) for c, s in zip(corner, overlap[0]))
                out[(b, slice(None), *overlap[0])] = fill[(0, slice(None), *region)]
        return out
    inside = in_box(low, size, box)[:, None]
    return torch.where(inside, read_box(fill, low, size), out)


def box_index(low: torch.Tensor, size: Sequence[int], shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat indices into a (X, Y, Z) grid of each voxel of each box, and which lie inside it.

    Returns:
        index (B, *size) long (clamped inside), inside (B, *size) bool, or None when all lie inside.
    """
    axes, masks = [], []
    for axis in range(3):
        position = low[:, axis, None] + torch.arange(size[axis], device=low.device)
        masks.append((position >= 0) & (position < shape[axis]))
        axes.append(position.clamp(0, shape[axis] - 1))
    x, y, z = axes
    index = (x[:, :, None, None] * shape[1] + y[:, None, :, None]) * shape[2] + z[:, None, None, :]
    if all(bool(m.all()) for m in masks):
        return index, None
    return index, masks[0][:, :, None, None] & masks[1][:, None, :, None] & masks[2][:, None, None, :]


def in_box(low: torch.Tensor, size: Sequence[int], box: Box) -> torch.Tensor:
    """Which voxels of the boxes ``[low, low + size)`` lie inside ``box``: (B, *size) bool."""
    masks = []
    for axis in range(3):
        position = low[:, axis, None] + torch.arange(size[axis], device=low.device)
        masks.append((position >= box[0][:, axis, None]) & (position < box[1][:, axis, None]))
    return masks[0][:, :, None, None] & masks[1][:, None, :, None] & masks[2][:, None, None, :]
