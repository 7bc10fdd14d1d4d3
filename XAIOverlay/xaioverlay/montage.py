"""``montage.png``: axial, coronal and sagittal planes through each map's peak, over the anatomy.

Planes are cut from an RAS-aligned resampling of the volume, so an oblique acquisition still shows
true axial/coronal/sagittal planes. Axial and coronal views are radiological (patient right on the
image's left); edges are labelled with their anatomical direction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .volumes import Volume, resample_array

SEQUENTIAL_CMAP = "inferno"
DIVERGING_CMAP = "RdBu_r"


def display_grid(volume: Volume, max_voxels_per_axis: int = 192) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An RAS-aligned grid covering ``volume``: (ijk→RAS affine with +R, +A, +S axes, size)."""
    geometry = volume.geometry
    corners = np.array([[i, j, k] for i in (0, geometry.size[0] - 1) for j in (0, geometry.size[1] - 1) for k in (0, geometry.size[2] - 1)], float)
    ras = geometry.ijk_to_ras_points(corners)
    low, high = ras.min(0), ras.max(0)
    spacing = max(min(geometry.spacing), float((high - low).max()) / max_voxels_per_axis)
    size = tuple(int(np.floor((h - l) / spacing)) + 1 for l, h in zip(low, high))
    affine = np.eye(4)
    affine[:3, :3] = np.diag([spacing] * 3)
    affine[:3, 3] = low
    return affine, size


def overlay_threshold(values: np.ndarray, signed: bool, top_fraction: float = 0.05) -> float:
    """Smallest |value| shown: the (1 − top_fraction) quantile of the non-zero magnitudes."""
    magnitude = np.abs(values) if signed else np.clip(values, 0, None)
    nonzero = magnitude[magnitude > 0]
    return float(np.quantile(nonzero, 1 - top_fraction)) if nonzero.size else np.inf


def peak_index(values: np.ndarray) -> tuple[int, int, int]:
    """Voxel of the largest value (the most positive evidence)."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(values)), values.shape))


def _planes(array: np.ndarray, index: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal 2D planes of an [R, A, S] array through ``index``, as image rows × columns."""
    r, a, s = index
    axial = array[:, :, s].T[::-1, ::-1]      # rows: A (top) → P; columns: R (left) → L
    coronal = array[:, a, :].T[::-1, ::-1]    # rows: S (top) → I; columns: R (left) → L
    sagittal = array[r, :, :].T[::-1, ::-1]   # rows: S (top) → I; columns: A (left) → P
    return [axial, coronal, sagittal]


_EDGES = [("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I")]
_TITLES = ("axial", "coronal", "sagittal")


def render_montage(anatomy: Volume, maps: Sequence[tuple[str, Volume, bool]], path: str | Path, top_fraction: float = 0.05) -> Path:
    """Write a PNG: one row per map (label, volume on the anatomy's grid, signed?), three planes each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    affine, size = display_grid(anatomy)
    source = anatomy.geometry.ijk_to_ras()
    background = resample_array(anatomy.array.astype(np.float32), source, size, affine)
    low, high = np.percentile(background, [1, 99.5])
    rows = max(len(maps), 1)
    figure = Figure(figsize=(10.5, 3.3 * rows), dpi=90)
    FigureCanvasAgg(figure)
    # margins first: colour bars are placed beside their row's axes as they stand, and stay there
    figure.subplots_adjust(left=0.06, right=0.9, top=0.95, bottom=0.03, wspace=0.05, hspace=0.2)
    for row, (label, volume, signed) in enumerate(maps):
        values = resample_array(volume.array.astype(np.float32), source, size, affine)
        peak = peak_index(values)
        peak_ras = affine[:3, :3] @ np.array(peak) + affine[:3, 3]
        limit = float(np.abs(values).max()) or 1.0
        norm = Normalize(-limit, limit) if signed else Normalize(0.0, limit)
        cmap = DIVERGING_CMAP if signed else SEQUENTIAL_CMAP
        threshold = overlay_threshold(values, signed, top_fraction)
        shown = np.abs(values) if signed else values
        image, row_axes = None, []
        for column, (anatomy_plane, value_plane, shown_plane) in enumerate(
            zip(_planes(background, peak), _planes(values, peak), _planes(shown, peak))
        ):
            axes = figure.add_subplot(rows, 3, row * 3 + column + 1)
            row_axes.append(axes)
            axes.imshow(anatomy_plane, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            overlay = np.ma.masked_where(shown_plane < threshold, value_plane)
            # a diverging map is near-white around zero: fade weak values in so that they do not hide the anatomy
            alpha = np.clip(np.abs(value_plane) / (0.25 * limit), 0.15, 1.0) * 0.75 if signed else 0.75
            image = axes.imshow(overlay, cmap=cmap, norm=norm, alpha=alpha, interpolation="nearest")
            left, right, top, bottom = _EDGES[column]
            for text, xy in ((left, (0.01, 0.5)), (right, (0.95, 0.5)), (top, (0.5, 0.93)), (bottom, (0.5, 0.01))):
                axes.text(*xy, text, color="yellow", fontsize=8, transform=axes.transAxes)
            coordinate = ("S", peak_ras[2]) if column == 0 else ("A", peak_ras[1]) if column == 1 else ("R", peak_ras[0])
            axes.set_title(f"{_TITLES[column]} · {coordinate[0]} {coordinate[1]:.1f} mm", fontsize=9)
            axes.set_xticks([])
            axes.set_yticks([])
            if column == 0:
                axes.set_ylabel(label, fontsize=10, fontweight="bold")
        bar = figure.colorbar(image, ax=row_axes, fraction=0.025, pad=0.01)
        bar.set_label("relevance (signed)" if signed else "relevance", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    figure.savefig(str(path), format="png")
    return Path(path)
