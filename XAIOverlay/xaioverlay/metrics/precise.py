"""Float64 sums over float32 maps, a slice at a time: never a float64 copy of a whole map.

A map on a CT-sized grid has 20–80 million voxels; a float64 copy of it is 0.2–0.6 GB per map and per
step. Sums need float64 to be exact at that length; the values do not.
"""

from __future__ import annotations

import torch

#: Voxels converted to float64 at a time.
CHUNK = 1 << 20


def sum64(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ values (· weights) along the last axis, accumulated in float64.

    Args:
        values: (B, N); weights: None, or (N,) or (B, N), anything that converts to float64.
    Returns:
        (B,) float64.
    """
    total = torch.zeros(values.shape[:-1], dtype=torch.float64, device=values.device)
    for start in range(0, values.shape[-1], CHUNK):
        part = values[..., start:start + CHUNK].double()
        if weights is not None:
            part = part * weights[..., start:start + CHUNK].double()
        total += part.sum(-1)
    return total


def gram64(rows: torch.Tensor) -> torch.Tensor:
    """(M, N) → (M, M) matrix of dot products between rows, accumulated in float64."""
    gram = torch.zeros((rows.shape[0], rows.shape[0]), dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[1], CHUNK):
        part = rows[:, start:start + CHUNK].double()
        gram += part @ part.T
    return gram
