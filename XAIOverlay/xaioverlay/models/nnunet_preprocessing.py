"""nnU-Net v2's preprocessing of one case, and the model grid it produces as a voxel → RAS affine.

nnU-Net reads a volume with SimpleITK, so its array axes are ITK's index axes reversed (k, j, i), then
applies the plans' ``transpose_forward``; it crops to the bounding box of the non-zero voxels (any
channel, holes filled), normalises each channel by the plans' scheme and resamples to the configuration's
spacing (cubic in-plane, nearest along a low-resolution axis when the spacing is anisotropic by more than
3×). Every step is a voxel-index map, so the model grid's affine is the input's affine composed with the
axis permutation, the crop offset and the resampling scale (corner-aligned: the grid keeps the field of
view). Mapping a map back onto the input's grid through that affine undoes all of it at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError, ModelError

#: nnU-Net's threshold above which the low-resolution axis is resampled separately (``ANISO_THRESHOLD``).
ANISOTROPY_THRESHOLD = 3.0
SCHEMES = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
           "RGBTo01Normalization")
RESAMPLING_FUNCTIONS = ("resample_data_or_seg_to_shape", "resample_data_or_seg_to_spacing")


@dataclass(frozen=True)
class Plan:
    """What nnU-Net's preprocessing reads from ``plans.json`` for one configuration."""

    transpose_forward: tuple[int, int, int]
    spacing: tuple[float, float, float]
    schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    intensity_properties: tuple[dict, ...]
    order: int = 3
    order_z: int = 0
    force_separate_z: bool | None = None


def nnunet_axes(transpose_forward: Sequence[int]) -> np.ndarray:
    """3×3 permutation P with ``ijk = P @ a`` for nnU-Net's axes ``a`` (SimpleITK's array order, then
    ``transpose_forward``): nnU-Net's axis ``n`` is the volume's axis ``2 − transpose_forward[n]``."""
    permutation = np.zeros((3, 3))
    for axis, original in enumerate(transpose_forward):
        permutation[2 - int(original), axis] = 1.0
    return permutation


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels non-zero in any channel, holes filled (nnU-Net's crop and normalisation mask).
    ``data``: (C, X, Y, Z) → (X, Y, Z) bool."""
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes((data != 0).any(0))


def mask_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box of ``mask``; the whole volume when it is empty (as nnU-Net)."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def normalise(channel: np.ndarray, scheme: str, mask: np.ndarray | None, properties: dict) -> np.ndarray:
    """One channel (X, Y, Z) normalised by nnU-Net's ``scheme``; ``mask`` (the non-zero region) when the
    plans set ``use_mask_for_norm`` (z-score then uses and changes only voxels inside it)."""
    image = channel.astype(np.float32)
    if scheme == "CTNormalization":
        image = np.clip(image, properties["percentile_00_5"], properties["percentile_99_5"])
        return (image - properties["mean"]) / max(properties["std"], 1e-8)
    if scheme == "ZScoreNormalization":
        if mask is None:
            return (image - image.mean()) / max(float(image.std()), 1e-8)
        inside = image[mask]
        image[mask] = (inside - inside.mean()) / max(float(inside.std()), 1e-8)
        return image
    if scheme == "RescaleTo01Normalization":
        image = image - image.min()
        return image / max(float(image.max()), 1e-8)
    if scheme == "RGBTo01Normalization":
        return image / 255.0
    return image


def low_resolution_axis(spacing: Sequence[float]) -> int | None:
    """The one axis coarser than the others by more than :data:`ANISOTROPY_THRESHOLD`, else None."""
    spacing = np.asarray(spacing, float)
    coarsest = np.flatnonzero(spacing == spacing.max())
    if spacing.max() / spacing.min() <= ANISOTROPY_THRESHOLD or len(coarsest) != 1:
        return None
    return int(coarsest[0])


def separate_axis(current: Sequence[float], target: Sequence[float], force: bool | None) -> int | None:
    """nnU-Net's choice of the axis resampled on its own: from the current spacing, else the target's."""
    if force is False:
        return None
    if force:
        axes = np.flatnonzero(np.asarray(current) == max(current))
        return int(axes[0]) if len(axes) == 1 else None
    axis = low_resolution_axis(current)
    return axis if axis is not None else low_resolution_axis(target)


def resample(data: np.ndarray, shape: Sequence[int], axis: int | None, order: int, order_z: int) -> np.ndarray:
    """(C, X, Y, Z) → (C, *shape), corner-aligned (voxel n's centre lands at ``(n + ½)·old/new − ½``).

    Without ``axis``: spline of ``order`` over the volume. With it: each slice across ``axis`` in-plane
    with ``order``, then along ``axis`` with ``order_z`` (clamped at the border).
    """
    from scipy.ndimage import map_coordinates
    from skimage.transform import resize

    shape = tuple(int(s) for s in shape)
    if tuple(data.shape[1:]) == shape:
        return data
    data = data.astype(float)
    out = np.zeros((data.shape[0], *shape), np.float32)
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = resize(data[c], shape, order, mode="edge", anti_aliasing=False)
            continue
        plane = [s for a, s in enumerate(shape) if a != axis]
        slices = np.moveaxis(data[c], axis, 0)
        inplane = np.stack([resize(s, plane, order, mode="edge", anti_aliasing=False) for s in slices])
        inplane = np.moveaxis(inplane, 0, axis)
        if inplane.shape[axis] == shape[axis]:
            out[c] = inplane
            continue
        grid = np.meshgrid(*[(np.arange(n) + 0.5) * (m / n) - 0.5 for n, m in zip(shape, inplane.shape)],
                           indexing="ij")
        out[c] = map_coordinates(inplane, np.stack(grid), order=order_z, mode="nearest")
    return out


def model_grid_affine(ijk_to_ras: np.ndarray, transpose_forward: Sequence[int], box: Sequence[slice],
                      cropped_shape: Sequence[int], model_shape: Sequence[int]) -> np.ndarray:
    """4×4 voxel → RAS affine of the model grid.

    ``ijk_to_ras`` is the input's; the model voxel ``m`` lies at nnU-Net index
    ``box.start + (m + ½)·cropped/model − ½`` (corner-aligned resampling), permuted back by
    :func:`nnunet_axes`.
    """
    scale = np.asarray(cropped_shape, float) / np.asarray(model_shape, float)
    to_cropped = np.eye(4)
    to_cropped[:3, :3] = np.diag(scale)
    to_cropped[:3, 3] = [b.start for b in box] + 0.5 * scale - 0.5
    permute = np.eye(4)
    permute[:3, :3] = nnunet_axes(transpose_forward)
    return np.asarray(ijk_to_ras, float) @ permute @ to_cropped


def preprocess_array(array: np.ndarray, ijk_to_ras: np.ndarray, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's preprocessing of one case.

    Args:
        array: (C, I, J, K) input channels indexed as the volumes (see :mod:`xaioverlay.volumes`).
        ijk_to_ras: the input's 4×4 voxel → RAS affine.
    Returns:
        (C, X, Y, Z) float32 on the model grid, and the model grid's 4×4 voxel → RAS affine.
    """
    if array.shape[0] != len(plan.schemes):
        raise InputError(f"the nnU-Net plans normalise {len(plan.schemes)} channel(s) but got {array.shape[0]}")
    spacing_ijk = np.linalg.norm(np.asarray(ijk_to_ras, float)[:3, :3], axis=0)
    order = [2 - int(t) for t in plan.transpose_forward]  # nnU-Net axis n = volume axis order[n]
    data = np.transpose(array, (0, *[1 + o for o in order])).astype(np.float32)
    spacing = spacing_ijk[order]
    mask = nonzero_mask(data)
    box = mask_box(mask)
    data, mask = data[(slice(None), *box)], mask[box]
    data = np.stack([
        normalise(data[c], plan.schemes[c], mask if plan.use_mask_for_norm[c] else None, plan.intensity_properties[c])
        for c in range(data.shape[0])
    ])
    cropped = data.shape[1:]
    new_shape = [int(round(s / t * n)) for s, t, n in zip(spacing, plan.spacing, cropped)]
    if min(new_shape) < 1:
        raise InputError(f"the input's non-zero region {tuple(cropped)} is smaller than one voxel at the model's "
                         f"spacing {plan.spacing} mm; give a larger volume")
    axis = separate_axis(spacing, plan.spacing, plan.force_separate_z)
    data = resample(data, new_shape, axis, plan.order, plan.order_z)
    return data.astype(np.float32), model_grid_affine(ijk_to_ras, plan.transpose_forward, box, cropped, new_shape)


class NNUNetPreprocessing:
    """The model's preprocessing as :class:`~xaioverlay.models.base.LoadedModel` runs it: a callable on
    ``{key: MetaTensor (C, I, J, K)}`` returning the model-grid MetaTensor with its affine."""

    def __init__(self, plan: Plan, key: str = "image") -> None:
        self.plan, self.key = plan, key

    def __call__(self, data: dict) -> dict:
        from monai.data import MetaTensor

        image = data[self.key]
        array, affine = preprocess_array(np.asarray(image.detach().cpu()), np.asarray(image.affine), self.plan)
        return {**data, self.key: MetaTensor(torch.from_numpy(array), affine=torch.as_tensor(affine))}


def plan_from(plans: dict, configuration: dict, source: object) -> Plan:
    """A :class:`Plan` from ``plans.json`` and one of its (inheritance-resolved) configurations."""
    schemes = tuple(configuration.get("normalization_schemes") or ())
    unknown = [s for s in schemes if s not in SCHEMES]
    if not schemes or unknown:
        raise ModelError(f"{source}: normalisation scheme(s) {unknown or schemes} are not nnU-Net's built-in ones "
                         f"({', '.join(SCHEMES)}); XAIOverlay cannot reproduce custom preprocessing")
    properties = plans.get("foreground_intensity_properties_per_channel") or {}
    if "CTNormalization" in schemes and any(str(c) not in properties for c, s in enumerate(schemes)
                                            if s == "CTNormalization"):
        raise ModelError(f"{source}: CTNormalization needs foreground_intensity_properties_per_channel in plans.json")
    name = configuration.get("resampling_fn_data", RESAMPLING_FUNCTIONS[0])
    if name not in RESAMPLING_FUNCTIONS:
        raise ModelError(f"{source}: resampling function {name!r} is not nnU-Net's default; "
                         "XAIOverlay reproduces only resample_data_or_seg_to_shape")
    kwargs = configuration.get("resampling_fn_data_kwargs") or {}
    return Plan(
        transpose_forward=tuple(int(t) for t in plans.get("transpose_forward", (0, 1, 2))),
        spacing=tuple(float(s) for s in configuration["spacing"]),
        schemes=schemes,
        use_mask_for_norm=tuple(bool(u) for u in configuration.get("use_mask_for_norm") or [False] * len(schemes)),
        intensity_properties=tuple(properties.get(str(c), {}) for c in range(len(schemes))),
        order=int(kwargs.get("order", 3)),
        order_z=int(kwargs.get("order_z", 0)),
        force_separate_z=kwargs.get("force_separate_z", False),
    )
