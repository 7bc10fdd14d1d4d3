"""Volumes with their geometry: read, write, resample.

Conventions (one place, tested):

- Arrays are indexed ``[i, j, k]`` (IJK, the order Slicer and MONAI use; ``i`` runs fastest in the
  file). SimpleITK's numpy views are ``[k, j, i]``; we transpose at the boundary.
- :class:`Geometry` stores what ITK stores: ``spacing`` (mm), ``origin`` and ``direction`` in LPS.
- Affines exchanged with MONAI and shown to users are voxel → RAS millimetres:
  ``ijk_to_ras = diag(-1, -1, 1, 1) @ ijk_to_lps``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .integrity import check_dicom_folder, check_volume_file

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: File endings read as single files (DICOM is read from a folder).
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class Geometry:
    """A 3D voxel grid in physical space.

    Attributes:
        size: voxel counts ``(ni, nj, nk)``.
        spacing: voxel size in mm along i, j, k.
        origin: physical position of voxel (0, 0, 0), LPS mm.
        direction: 3×3 matrix (row-major tuple of 9) whose columns are the i, j, k axes in LPS.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def ijk_to_lps(self) -> np.ndarray:
        """4×4 affine mapping voxel index (i, j, k, 1) to LPS mm."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    def ijk_to_ras(self) -> np.ndarray:
        """4×4 affine mapping voxel index (i, j, k, 1) to RAS mm (what Slicer and MONAI use)."""
        return LPS_TO_RAS @ self.ijk_to_lps()

    @classmethod
    def from_ijk_to_ras(cls, affine: np.ndarray, size: Sequence[int]) -> "Geometry":
        """Inverse of :meth:`ijk_to_ras` for affines with orthogonal axes (no shear)."""
        lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)
        columns = lps[:3, :3]
        spacing = np.linalg.norm(columns, axis=0)
        direction = columns / spacing
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise InputError("the voxel axes are not orthogonal (sheared grid); resample the volume first")
        return cls(
            size=tuple(int(s) for s in size),
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(o) for o in lps[:3, 3]),
            direction=tuple(float(d) for d in direction.ravel()),
        )

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Geometry":
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def same_grid(self, other: "Geometry", tol: float = 1e-4) -> bool:
        """True when both describe the same voxels (size exact, the rest within ``tol`` mm)."""
        return self.size == other.size and np.allclose(self.ijk_to_lps(), other.ijk_to_lps(), atol=tol)

    def ras_to_ijk(self, points_ras: np.ndarray) -> np.ndarray:
        """Continuous voxel indices of RAS points. ``points_ras``: (N, 3) → (N, 3)."""
        points = np.atleast_2d(np.asarray(points_ras, dtype=float))
        homogeneous = np.c_[points, np.ones(len(points))]
        return (np.linalg.inv(self.ijk_to_ras()) @ homogeneous.T).T[:, :3]

    def ijk_to_ras_points(self, indices: np.ndarray) -> np.ndarray:
        """RAS mm of voxel indices. ``indices``: (N, 3) → (N, 3)."""
        idx = np.atleast_2d(np.asarray(indices, dtype=float))
        return (self.ijk_to_ras() @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]


@dataclass
class Volume:
    """A scalar volume: ``array[i, j, k]`` plus the :class:`Geometry` that places it in space."""

    array: np.ndarray
    geometry: Geometry
    name: str = ""

    def __post_init__(self) -> None:
        if tuple(self.array.shape) != tuple(self.geometry.size):
            raise ValueError(f"array shape {self.array.shape} does not match geometry size {self.geometry.size}")

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array.transpose(2, 1, 0)))
        return self.geometry.apply_to(image)

    @classmethod
    def from_sitk(cls, image: sitk.Image, name: str = "") -> "Volume":
        array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
        return cls(np.ascontiguousarray(array), Geometry.from_sitk(image), name)


def _volume_name(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    files = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in reader.GetGDCMSeriesIDs(str(folder))}
    chosen = max(files, key=lambda sid: len(files[sid])) if files else ""
    check_dicom_folder(folder, files.get(chosen, []), {name for names in files.values() for name in names})
    if not files:
        raise InputError(f"{folder}: folder holds no DICOM series; give a folder of DICOM slices or a volume file")
    if len(files) > 1:
        log.warning("%s holds %d DICOM series; reading the largest (%s)", folder, len(files), chosen)
    reader.SetFileNames(files[chosen])
    return reader.Execute()


def read_volume(path: str | os.PathLike, *, check_finite: bool = True) -> Volume:
    """Read a 3D scalar volume (NIfTI, NRRD, MetaImage, or a DICOM series folder).

    Raises :class:`InputError` with a one-line reason for anything that cannot be explained: missing or
    unreadable file, 2D image, multi-component pixels, NaN or infinite voxels.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the path")
    try:
        if path.is_dir():
            image = _read_dicom_series(path)
        else:
            if not path.name.lower().endswith(VOLUME_SUFFIXES + (".dcm",)):
                raise InputError(
                    f"{path}: unsupported file type; give a volume ending in {', '.join(VOLUME_SUFFIXES)} "
                    "or a folder holding a DICOM series"
                )
            check_volume_file(path)
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise InputError(f"{path}: cannot read the volume (unreadable or truncated file: {reason[:160]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "give each channel as a separate scalar volume"
        )
    size = image.GetSize()
    if image.GetDimension() != 3 or min(size) < 2:
        raise InputError(
            f"{path}: is a {'x'.join(map(str, size))} image, not a 3D volume; XAIOverlay explains 3D volumes"
        )
    volume = Volume.from_sitk(image, name=_volume_name(path))
    if check_finite and np.issubdtype(volume.array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(volume.array)))
        if bad:
            raise InputError(
                f"{path}: contains {bad} NaN or infinite voxels; replace them (for example with 0) before explaining"
            )
    return volume


def read_volumes(paths: Sequence[str | os.PathLike]) -> list[Volume]:
    """Read co-registered volumes that form one multi-channel input, in the order given.

    Channels after the first are resampled (linearly) onto the first volume's grid when their grids
    differ; volumes that do not overlap the first at all are refused.
    """
    if not paths:
        raise InputError("no input volume given; pass at least one with --input")
    volumes = [read_volume(p) for p in paths]
    reference = volumes[0]
    for index, volume in enumerate(volumes[1:], start=1):
        if volume.geometry.same_grid(reference.geometry):
            continue
        log.info("resampling channel %d (%s) onto the grid of %s", index, volume.name, reference.name)
        array = resample_array(
            volume.array.astype(np.float32),
            volume.geometry.ijk_to_ras(),
            reference.geometry.size,
            reference.geometry.ijk_to_ras(),
            interpolation="linear",
        )
        inside = resample_array(
            np.ones(volume.geometry.size, np.float32),
            volume.geometry.ijk_to_ras(),
            reference.geometry.size,
            reference.geometry.ijk_to_ras(),
            interpolation="nearest",
        )
        if not inside.any():
            raise InputError(
                f"{paths[index]}: does not overlap {paths[0]} in physical space; give co-registered volumes"
            )
        volumes[index] = Volume(array, reference.geometry, volume.name)
    return volumes


def atomic_path(path: Path) -> Path:
    """A temporary sibling of ``path`` with the same suffixes (writers pick the format from them).

    Created with the permissions a plain ``open()`` would give (umask respected), not mkstemp's 0600.
    """
    suffix = "".join(path.suffixes)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def write_volume(volume: Volume, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write ``volume`` atomically: to a temporary sibling first, then renamed onto ``path``.

    A header with a separate data file (``.nhdr``, ``.mhd``) is written with its final names in a
    temporary sibling folder; the data file is moved into place first, the header last.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.lower().endswith((".nhdr", ".mhd")):
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            sitk.WriteImage(volume.to_sitk(), str(staging / path.name), compress)
            for item in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
                os.replace(item, path.parent / item.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path
    temporary = atomic_path(path)
    try:
        sitk.WriteImage(volume.to_sitk(), str(temporary), compress)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def resample_array(
    source: np.ndarray,
    source_ijk_to_ras: np.ndarray,
    target_size: Sequence[int],
    target_ijk_to_ras: np.ndarray,
    *,
    interpolation: str = "linear",
    default: float = 0.0,
) -> np.ndarray:
    """Resample ``source`` (indexed [i, j, k]) onto another voxel grid of the same physical space.

    Args:
        source: (ni, nj, nk) array.
        source_ijk_to_ras: 4×4 voxel → RAS mm affine of ``source`` (any orientation, oblique allowed).
        target_size: (mi, mj, mk) voxel counts of the target grid.
        target_ijk_to_ras: 4×4 voxel → RAS mm affine of the target grid.
        interpolation: ``"linear"`` (maps, images) or ``"nearest"`` (masks, labels).
        default: value where the target grid lies outside ``source``.

    Returns:
        (mi, mj, mk) array of ``source``'s dtype (float32 for linear interpolation of integers).
    """
    # Both grids are put in index space; one affine maps target index → source index.
    index_map = np.linalg.inv(np.asarray(source_ijk_to_ras, float)) @ np.asarray(target_ijk_to_ras, float)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(index_map[:3, :3].ravel()))
    transform.SetTranslation(tuple(index_map[:3, 3]))
    if interpolation == "linear" and not np.issubdtype(source.dtype, np.floating):
        source = source.astype(np.float32)
    moving = sitk.GetImageFromArray(np.ascontiguousarray(source.transpose(2, 1, 0)))
    reference = sitk.Image([int(s) for s in target_size], moving.GetPixelID())
    interpolator = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolation]
    result = sitk.Resample(moving, reference, transform, interpolator, float(default), moving.GetPixelID())
    return sitk.GetArrayFromImage(result).transpose(2, 1, 0)


def resample_volume(volume: Volume, target: Geometry, *, interpolation: str = "linear") -> Volume:
    """``volume`` resampled onto ``target``'s grid (see :func:`resample_array`)."""
    array = resample_array(
        volume.array, volume.geometry.ijk_to_ras(), target.size, target.ijk_to_ras(), interpolation=interpolation
    )
    return Volume(array, target, volume.name)


#: Working memory (bytes) one slab of :func:`resample_additive` may use.
_SLAB_BYTES = 64 * 2**20


def _axis_permutation(linear: np.ndarray, source_size: Sequence[int]) -> list[int] | None:
    """Which source axis each target axis follows when the grids differ only by axis order, flips and
    scale (the usual reorient + respace preprocessing); None when they are rotated against each other.

    ``linear``: 3×3 source index → target index. An entry counts as zero when it moves no point of the
    source grid by more than 0.01 target voxel.
    """
    significant = np.abs(linear) * np.asarray(source_size, float)[None, :] > 0.01
    if not (significant.sum(0) == 1).all() or not (significant.sum(1) == 1).all():
        return None
    return [int(np.flatnonzero(row)[0]) for row in significant]


def overlap_weights(scale: float, offset: float, source_count: int, target_count: int) -> np.ndarray:
    """1D share of each source cell that lies in each target cell.

    Source cell ``j`` spans ``[j − ½, j + ½]`` and lands on ``[scale·(j ∓ ½) + offset]`` in target
    index units; target cell ``i`` spans ``[i − ½, i + ½]``. Returns (target_count, source_count)
    float32 whose columns sum to 1 where the source cell lies wholly inside the target range.
    """
    ends = scale * (np.arange(source_count)[:, None] + np.array([-0.5, 0.5])) + offset
    low, high = ends.min(1), ends.max(1)
    centres = np.arange(target_count)[:, None]
    overlap = np.minimum(centres + 0.5, high[None, :]) - np.maximum(centres - 0.5, low[None, :])
    return (np.clip(overlap, 0.0, None) / abs(scale)).astype(np.float32)


def _resample_additive_separable(source: np.ndarray, index_map: np.ndarray, order: list[int],
                                 target_size: Sequence[int]) -> np.ndarray:
    """Exact overlap weighting, one axis at a time, in slabs of the target's first axis."""
    src = np.transpose(source, order)
    w0, w1, w2 = (
        overlap_weights(index_map[axis, order[axis]], index_map[axis, 3], src.shape[axis], target_size[axis])
        for axis in range(3)
    )
    out = np.zeros(tuple(target_size), np.float32)
    rows = max(1, _SLAB_BYTES // (4 * target_size[1] * max(src.shape[2], target_size[2]) * 2))
    for start in range(0, target_size[0], rows):
        weights = w0[start:start + rows]
        used = np.flatnonzero(weights.any(0))
        if not used.size:
            continue
        low, high = used[0], used[-1] + 1
        part = np.tensordot(weights[:, low:high], src[low:high].astype(np.float32, copy=False), axes=(1, 0))
        out[start:start + rows] = np.matmul(w1, part) @ w2.T
    return out


def _resample_additive_splat(source: np.ndarray, index_map: np.ndarray, target_size: Sequence[int]) -> np.ndarray:
    """Overlap weighting for rotated grids: each non-zero source voxel is cut into S sub-points at most
    half a target voxel apart, and each sub-point's share (value / S) is spread trilinearly over the 8
    target voxels around it (weights summing to 1), a bounded number of source voxels at a time."""
    linear, offset = index_map[:3, :3], index_map[:3, 3]
    counts = [max(1, int(np.ceil(np.abs(linear[:, axis]).max() / 0.5))) for axis in range(3)]
    steps = np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in counts], indexing="ij")
    sub_points = np.stack([s.ravel() for s in steps], -1) @ linear.T  # (S, 3) target index units
    size = np.asarray(target_size)
    out = np.zeros(tuple(int(n) for n in target_size), np.float32)
    flat_out, flat = out.reshape(-1), source.reshape(-1)
    strides = (out.shape[1] * out.shape[2], out.shape[2])
    per_chunk = max(1, _SLAB_BYTES // (256 * len(sub_points)))
    for start in range(0, flat.size, per_chunk):
        values = flat[start:start + per_chunk]
        keep = np.flatnonzero(values)
        if not keep.size:
            continue
        centres = np.stack(np.unravel_index(start + keep, source.shape), -1) @ linear.T + offset
        points = (centres[:, None, :] + sub_points[None]).reshape(-1, 3)
        shares = np.repeat(values[keep].astype(np.float32) / len(sub_points), len(sub_points))
        floor = np.floor(points)
        fraction = (points - floor).astype(np.float32).T
        floor = floor.astype(np.int64).T
        weights = [(1.0 - f, f) for f in fraction]
        inside = [((f >= 0) & (f < n), (f >= -1) & (f < n - 1)) for f, n in zip(floor, size)]
        base = floor[0] * strides[0] + floor[1] * strides[1] + floor[2]
        for a, b, c in np.ndindex(2, 2, 2):
            keep_corner = inside[0][a] & inside[1][b] & inside[2][c]
            weight = weights[0][a] * weights[1][b] * weights[2][c] * shares
            np.add.at(flat_out, base[keep_corner] + (a * strides[0] + b * strides[1] + c), weight[keep_corner])
    return out


def resample_additive(
    source: np.ndarray,
    source_ijk_to_ras: np.ndarray,
    target_size: Sequence[int],
    target_ijk_to_ras: np.ndarray,
) -> np.ndarray:
    """Resample an additive map (each voxel holds a share of a total, e.g. LRP relevance) so that its sum
    over any region is kept: each source voxel's value is split over the target voxels it overlaps in
    proportion to the overlap volume (then each target voxel holds the sum of its shares).

    Grids that differ by axis order, flips, scale and shift (reorienting and respacing) get the exact
    overlap weights, axis by axis; rotated grids get sub-voxel sampling spread trilinearly (region sums
    kept to within one target voxel's blur at the region's border; zero voxels cost nothing). What falls
    outside the target grid is dropped: compare the sums to know how much.

    Args and shapes as :func:`resample_array`; returns a (mi, mj, mk) float32 array. A NaN or infinite
    source voxel makes the target voxels it overlaps NaN, and no others.
    """
    index_map = np.linalg.inv(np.asarray(target_ijk_to_ras, float)) @ np.asarray(source_ijk_to_ras, float)
    order = _axis_permutation(index_map[:3, :3], source.shape)

    def resample(values: np.ndarray) -> np.ndarray:
        if order is not None:
            return _resample_additive_separable(values, index_map, order, target_size)
        return _resample_additive_splat(values, index_map, target_size)

    bad = ~np.isfinite(source)
    if not bad.any():
        return resample(source)
    result = resample(np.where(bad, 0.0, source).astype(np.float32))
    result[resample(bad.astype(np.float32)) > 0] = np.nan
    return result
