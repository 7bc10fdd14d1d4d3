"""Does the map point at the finding? Localisation against a reference mask, each beside its chance level.

- *Pointing game* (Zhang et al. 2018): a hit when the map's maximum lies in the mask, or within a
  tolerance in millimetres of it (the mask grown by that distance, measured in physical space on the
  map's grid). Ties at the maximum count as a hit when any of them hits. *Size-weighted* variant:
  hit × (1 − |region| / N), so a hit on a large region earns less.
- *Relevance mass accuracy* (Arras et al. 2022): the share of positive relevance inside the mask.
- *Relevance rank accuracy* (Arras et al. 2022): of the K = |mask| highest-valued voxels, the share
  inside the mask.

Chance levels, for a map that puts its values at random: |region| / N for the pointing game,
p (1 − p) for the size-weighted game (p = |region| / N), and |mask| / N for mass and rank accuracy
(N: voxels of the grid).
"""

from __future__ import annotations

import numpy as np
import torch

from .precise import sum64


def distance_to_mask_mm(mask: np.ndarray, spacing_mm) -> np.ndarray:
    """Euclidean distance (mm) from every voxel centre to the nearest mask voxel; 0 inside the mask.

    Args:
        mask: (X, Y, Z) boolean, not empty.
        spacing_mm: voxel size along X, Y, Z (the grid's axes must be orthogonal, as every
            :class:`~xaioverlay.volumes.Geometry` is).
    Returns:
        (X, Y, Z) float32.
    """
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(mask.astype(np.uint8).transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing_mm))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    array = sitk.GetArrayFromImage(distance).transpose(2, 1, 0)
    return np.clip(array, 0.0, None).astype(np.float32)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _flat_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(*S) or (B, *S) mask → (B, N) boolean matching ``like`` (B, N)."""
    return mask.to(like.device).bool().reshape(-1, like.shape[1]).expand(like.shape[0], -1)


def pointing_game(relevance: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """1 when a voxel holding the map's maximum lies in ``region``, else 0.

    Args:
        relevance: (B, *S) maps.
        region: (*S) or (B, *S) boolean: the reference mask, grown by the tolerance if any.
    Returns:
        (B,) float64 of 0/1.
    """
    values = _flat(relevance)
    inside = _flat_mask(region, values)
    at_maximum = values == values.max(dim=1, keepdim=True).values
    return (at_maximum & inside).any(dim=1).double()


def size_weighted_pointing_game(relevance: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Pointing game hit × (1 − |region| / N). Shapes as :func:`pointing_game`."""
    values = _flat(relevance)
    inside = _flat_mask(region, values)
    return pointing_game(relevance, region) * (1 - inside.sum(1).double() / inside.shape[1])


def relevance_mass_accuracy(relevance: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_mask R⁺ / Σ R⁺ (R⁺ = max(R, 0)).

    Args:
        relevance: (B, *S) maps.
        mask: (*S) or (B, *S) boolean.
    Returns:
        (B,) float64 in [0, 1]; NaN where the map has no positive value.
    """
    positive = _flat(relevance).clamp_min(0)
    inside = _flat_mask(mask, positive)
    total = sum64(positive)
    share = sum64(positive, inside) / total.clamp_min(1e-300)
    return torch.where(total > 0, share, torch.full_like(share, float("nan")))


def relevance_rank_accuracy(relevance: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|top-K voxels ∩ mask| / K with K = |mask| (the top K by value, largest first).

    Args:
        relevance: (B, *S) maps.
        mask: (*S) or (B, *S) boolean, not empty.
    Returns:
        (B,) float64 in [0, 1].
    """
    values = _flat(relevance)
    inside = _flat_mask(mask, values)
    scores = torch.empty(values.shape[0], dtype=torch.float64, device=values.device)
    for row in range(values.shape[0]):
        k = int(inside[row].sum())
        top = torch.topk(values[row], k, sorted=False).indices
        scores[row] = int(inside[row, top].sum()) / k if k else float("nan")
    return scores


def chance_levels(mask: torch.Tensor, region: torch.Tensor) -> dict[str, float]:
    """Expected scores of a random map: see the module docstring.

    Args:
        mask: (*S) boolean reference mask.
        region: (*S) boolean mask grown by the pointing-game tolerance.
    """
    p_mask = int(mask.sum()) / mask.numel()  # counts, not a float64 copy of the mask
    p_region = int(region.sum()) / region.numel()
    return {
        "pointing_game": p_region,
        "pointing_game_size_weighted": p_region * (1 - p_region),
        "relevance_mass": p_mask,
        "relevance_rank": p_mask,
    }
