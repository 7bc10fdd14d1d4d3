"""Agreement between maps: Spearman rank correlation, tie-aware, on the device.

Maps are compared by the order of their values (positive = evidence for the target first), so two
methods that rank voxels alike agree whatever their scales. Ties (e.g. the zeros a ReLU leaves in a
CAM) get the average of the ranks they span, as in :func:`scipy.stats.spearmanr`.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .precise import gram64


def centred_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N along the last axis, ties sharing their average rank, minus their mean (N + 1) / 2.

    Args:
        values: (B, N).
    Returns:
        (B, N) float32 (computed in integers, exact to float32's precision).
    """
    ranks = torch.empty(values.shape, dtype=torch.float32, device=values.device)
    count = values.shape[-1]
    for row, line in enumerate(values):
        ordered, order = torch.sort(line)
        _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
        ends = torch.cumsum(counts, 0)  # last rank of each run of equal values
        # twice (mean rank of the run − (N + 1) / 2), an integer: 2·end − (count − 1) − (N + 1)
        ranks[row, order] = (2 * ends - counts - count).float()[inverse] / 2
    return ranks


def rank_correlations(flat: torch.Tensor) -> torch.Tensor:
    """(M, N) values → (M, M) Spearman correlations, float64; rows constant over N correlate 0 with others."""
    ranks = centred_ranks(flat)
    gram = gram64(ranks)
    norms = gram.diagonal().sqrt()
    matrix = gram / torch.outer(norms, norms).clamp_min(1e-300)
    matrix[norms == 0] = 0.0
    matrix[:, norms == 0] = 0.0
    return matrix


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
        correlations[row] = rank_correlations(torch.stack([x.float(), y.float()]))[0, 1]
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
    flat = torch.stack([maps[name].reshape(-1).float() for name in names])
    if mask is not None:
        flat = flat[:, mask.reshape(-1).to(flat.device)]
    matrix = rank_correlations(flat)
    matrix.fill_diagonal_(1.0)
    return names, matrix
