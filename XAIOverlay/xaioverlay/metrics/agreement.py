"""Agreement between maps: Spearman rank correlation, tie-aware, on the device.

Maps are compared by the order of their values (positive = evidence for the target first), so two
methods that rank voxels alike agree whatever their scales. Ties (e.g. the zeros a ReLU leaves in a
CAM) get the average of the ranks they span, as in :func:`scipy.stats.spearmanr`.
"""

from __future__ import annotations

from typing import Mapping

import torch


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N along the last axis, ties sharing their average rank.

    Args:
        values: (B, N).
    Returns:
        (B, N) float64.
    """
    ranks = torch.empty(values.shape, dtype=torch.float64, device=values.device)
    for row, line in enumerate(values):
        ordered, order = torch.sort(line)
        _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
        ends = torch.cumsum(counts, 0).double()  # last rank of each run of equal values
        mean_rank = ends - (counts.double() - 1) / 2
        ranks[row, order] = mean_rank[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Spearman rank correlation of ``a`` and ``b`` per batch item, over the voxels in ``mask``.

    Args:
        a, b: (B, *S) maps (any spatial shape S).
        mask: None, or a boolean (*S) or (B, *S) region; only its voxels are compared.
    Returns:
        (B,) float64 in [-1, 1]; 0 where either map is constant over the region (it orders nothing).
    """
    batch = a.shape[0]
    a = a.reshape(batch, -1)
    b = b.reshape(batch, -1)
    if mask is not None:
        mask = mask.to(a.device).bool().reshape(-1, a.shape[1]).expand(batch, -1)
    correlations = torch.zeros(batch, dtype=torch.float64, device=a.device)
    for row in range(batch):
        x, y = a[row], b[row]
        if mask is not None:
            x, y = x[mask[row]], y[mask[row]]
        rx, ry = average_ranks(torch.stack([x, y]))
        rx, ry = rx - rx.mean(), ry - ry.mean()
        denominator = torch.sqrt((rx * rx).sum() * (ry * ry).sum())
        if denominator > 0:
            correlations[row] = (rx * ry).sum() / denominator
    return correlations


def agreement_matrix(maps: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None) -> tuple[list[str], torch.Tensor]:
    """Pairwise Spearman correlation between methods' maps.

    Args:
        maps: method spec → (X, Y, Z) map, all on one grid.
        mask: optional (X, Y, Z) boolean region (body or brain) to compare inside.
    Returns:
        (names, (M, M) float64 matrix with ones on the diagonal).
    """
    names = list(maps)
    flat = torch.stack([maps[name].reshape(-1).double() for name in names])
    if mask is not None:
        flat = flat[:, mask.reshape(-1).to(flat.device)]
    ranks = average_ranks(flat)
    ranks = ranks - ranks.mean(1, keepdim=True)
    norms = ranks.norm(dim=1)
    matrix = (ranks @ ranks.T) / torch.outer(norms, norms).clamp_min(1e-300)
    matrix[norms == 0] = 0.0
    matrix[:, norms == 0] = 0.0
    matrix.fill_diagonal_(1.0)
    return names, matrix
