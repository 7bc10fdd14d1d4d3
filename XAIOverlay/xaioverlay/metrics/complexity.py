"""How concentrated a map is: Gini sparseness and normalised entropy of |relevance|.

Both look at magnitudes only. A map with all its relevance on one voxel has sparseness → 1 and entropy
0; a uniform map has sparseness 0 and normalised entropy 1. An all-zero map has neither (NaN).
"""

from __future__ import annotations

import math

import torch

from . import precise
from .precise import sum64


def gini_sparseness(relevance: torch.Tensor) -> torch.Tensor:
    """Gini index of |relevance| (Chalasani et al. 2020), per batch item.

    G = Σ_i (2i − N − 1) a_(i) / (N Σ_i a_(i)), with a_(1) ≤ … ≤ a_(N) the sorted magnitudes.

    Args:
        relevance: (B, *S) maps.
    Returns:
        (B,) float64 in [0, 1); NaN for an all-zero map.
    """
    magnitude = relevance.reshape(relevance.shape[0], -1).abs().float()
    count = magnitude.shape[1]
    ordered, _ = torch.sort(magnitude, dim=1)
    total = sum64(ordered)
    weighted = torch.zeros_like(total)
    for start in range(0, count, precise.CHUNK):
        stop = min(start + precise.CHUNK, count)
        weights = 2 * torch.arange(start + 1, stop + 1, device=magnitude.device, dtype=torch.float64) - count - 1
        weighted += (ordered[:, start:stop].double() * weights).sum(1)
    gini = weighted / (count * total)
    return torch.where(total > 0, gini, torch.full_like(gini, math.nan))


def normalised_entropy(relevance: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of p = |relevance| / Σ|relevance|, divided by ln N (Bhatt et al. 2020's complexity).

    Args:
        relevance: (B, *S) maps of N voxels each.
    Returns:
        (B,) float64 in [0, 1]; NaN for an all-zero map.
    """
    magnitude = relevance.reshape(relevance.shape[0], -1).abs().float()
    total = sum64(magnitude)[:, None]
    entropy = torch.zeros(magnitude.shape[0], dtype=torch.float64, device=magnitude.device)
    for start in range(0, magnitude.shape[1], precise.CHUNK):
        p = magnitude[:, start:start + precise.CHUNK].double() / total.clamp_min(1e-300)
        entropy -= torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(1)
    normalised = entropy / math.log(magnitude.shape[1])
    return torch.where(total[:, 0] > 0, normalised, torch.full_like(normalised, math.nan))
