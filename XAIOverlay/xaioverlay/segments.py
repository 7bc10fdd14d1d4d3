"""Segments: the features perturbation methods keep or fill — regular cubes, SLIC supervoxels, or a label volume.

Specs (CLI ``--segments``):

- ``cubes:SIZE`` — a regular grid of cubes, SIZE in voxels (``16``), millimetres (``12mm``) or one per
  axis (``16x16x8``, ``20x20x30mm``), on the model grid; the last cube along an axis may be cut short.
- ``slic:COUNT[,compactness=C]`` — about COUNT 3D SLIC supervoxels (scikit-image's ``slic``) of the
  preprocessed intensities, with the model grid's voxel spacing, so supervoxels are round in mm.
  *Compactness.* SLIC trades intensity distance against spatial distance; the intensity distance is in
  the image's own units, so one compactness would mean different things for CT in Hounsfield units
  (a span of ~2,000) and for z-scored MRI (a span of a few units). Each channel is therefore first
  scaled so that its 1st–99th percentile span is 1, and the default ``compactness=0.1`` then means the
  same for CT and MRI: a distance of one supervoxel spacing weighs as much as an intensity difference of
  a tenth of the volume's contrast span. Raise it (e.g. 1) for nearly cubic supervoxels, lower it (0.01) for ones
  that hug edges (noisy CT: prefer raising it, or edges of noise are followed).
- ``labels:PATH`` — a label volume (any format SimpleITK reads: NIfTI, NRRD, a Slicer segmentation
  exported as a labelmap, a TotalSegmentator output): one segment per label value present, label 0
  (background) included as its own segment ("everything else"). A volume on another grid is
  resampled nearest-neighbour onto the input grid and then onto the model grid.

Segments are (X, Y, Z) long tensors on the model grid with ids 0..S-1, contiguous.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .models.base import ModelInput
from .volumes import read_volume, resample_array

KINDS = ("cubes", "slic", "labels")
USAGE = "use --segments cubes:SIZE (e.g. cubes:16 or cubes:12mm), slic:COUNT[,compactness=C] or labels:PATH"
DEFAULT_COMPACTNESS = 0.1
#: Runs estimated to take longer than this are refused before any work (see :func:`check_duration`).
LONGEST_RUN_S = 2 * 3600


@dataclass(frozen=True)
class SegmentSpec:
    """What segments to make: ``kind`` and its one parameter (``size``, ``count`` or ``path``)."""

    kind: str
    size: "Lengths | None" = None  # xaioverlay.methods.occlusion.options.Lengths
    count: int | None = None
    compactness: float = DEFAULT_COMPACTNESS
    path: str | None = None

    def text(self) -> str:
        if self.kind == "cubes":
            return f"cubes:{self.size.text()}"
        if self.kind == "slic":
            extra = f",compactness={self.compactness:g}" if self.compactness != DEFAULT_COMPACTNESS else ""
            return f"slic:{self.count}{extra}"
        return f"labels:{self.path}"


def parse_segments(text: str) -> SegmentSpec:
    """``cubes:16`` / ``cubes:12mm`` / ``slic:256[,compactness=0.1]`` / ``labels:PATH`` → :class:`SegmentSpec`."""
    kind, colon, rest = (text or "").strip().partition(":")
    kind = kind.strip().lower()
    if not colon or not rest.strip() or kind not in KINDS:
        raise InputError(f"cannot read segments {text!r}; {USAGE}")
    rest = rest.strip()
    if kind == "labels":
        return SegmentSpec("labels", path=rest)
    if kind == "cubes":
        # imported here: methods build on this module, so it must not import the methods package when loaded
        from .methods.occlusion.options import parse_lengths

        return SegmentSpec("cubes", size=parse_lengths(rest, f"segments {text}", USAGE))
    count_text, *options = [part.strip() for part in rest.split(",")]
    if not re.fullmatch(r"\d+", count_text) or int(count_text) < 2:
        raise InputError(f"segments {text}: the supervoxel count must be a whole number ≥ 2; {USAGE}")
    compactness = DEFAULT_COMPACTNESS
    for option in options:
        name, _, value = option.partition("=")
        try:
            compactness = float(value) if name.strip().lower() == "compactness" else math.nan
        except ValueError:
            compactness = math.nan
        if not compactness > 0:
            raise InputError(f"segments {text}: cannot read {option!r}; give compactness=C with C > 0 "
                             f"(default {DEFAULT_COMPACTNESS:g})")
    return SegmentSpec("slic", count=int(count_text), compactness=compactness)


def relabel(ids: np.ndarray) -> np.ndarray:
    """Ids renumbered 0..S-1 in increasing order of the values present: (X, Y, Z) int64."""
    _, inverse = np.unique(ids, return_inverse=True)
    return inverse.reshape(ids.shape).astype(np.int64)


def cube_ids(shape: tuple[int, int, int], size: tuple[int, int, int]) -> torch.Tensor:
    """(X, Y, Z) long: the index of the cube of ``size`` voxels holding each voxel, x slowest."""
    counts = [-(-n // s) for n, s in zip(shape, size)]
    axes = [torch.arange(n) // s for n, s in zip(shape, size)]
    return (axes[0][:, None, None] * counts[1] + axes[1][None, :, None]) * counts[2] + axes[2][None, None, :]


def scaled_intensities(x: np.ndarray) -> np.ndarray:
    """Each channel of (C, X, Y, Z) scaled so its 1st–99th percentile span is 1 → (X, Y, Z, C) float32."""
    low, high = np.percentile(x.reshape(x.shape[0], -1), [1, 99], axis=1)
    span = np.where(high > low, high - low, 1.0)
    return np.moveaxis((x - low[:, None, None, None]) / span[:, None, None, None], 0, -1).astype(np.float32)


def slic_ids(x: np.ndarray, count: int, compactness: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """3D SLIC supervoxels of ``x`` (C, X, Y, Z) (see the module notes on compactness) → (X, Y, Z) int64."""
    from skimage.segmentation import slic

    image = scaled_intensities(x)
    labels = slic(image, n_segments=count, compactness=compactness, spacing=np.asarray(spacing, float),
                  channel_axis=-1, start_label=0, enforce_connectivity=True)
    return relabel(labels)


def label_ids(path: str, model_input: ModelInput) -> np.ndarray:
    """A label volume's values on the input grid and then the model grid (nearest neighbour) → (X, Y, Z)."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"label volume {path} not found; give --segments labels:PATH with an existing file")
    try:
        volume = read_volume(file)
    except Exception as error:
        raise InputError(f"cannot read label volume {path} ({str(error).splitlines()[0][:120]}); "
                         "give a NIfTI, NRRD or other SimpleITK-readable label volume") from None
    labels = np.rint(np.asarray(volume.array)).astype(np.int64)
    reference = model_input.reference
    on_input = resample_array(labels, volume.geometry.ijk_to_ras(), reference.size, reference.ijk_to_ras(),
                              interpolation="nearest")
    return resample_array(on_input, reference.ijk_to_ras(), model_input.spatial_shape, model_input.ijk_to_ras,
                          interpolation="nearest")


def make_segments(spec: SegmentSpec, model_input: ModelInput) -> torch.Tensor:
    """The segments of ``spec`` on the model grid: (X, Y, Z) long ids 0..S-1 on the input tensor's device.

    Raises :class:`InputError` (before any model work) when fewer than two segments lie inside the volume.
    """
    shape = model_input.spatial_shape
    spacing = tuple(float(s) for s in model_input.model_geometry.spacing)
    if spec.kind == "cubes":
        ids = cube_ids(shape, spec.size.voxels(spacing, "segment cube"))
    elif spec.kind == "slic":
        x = model_input.tensor[0].detach().float().cpu().numpy()
        ids = torch.from_numpy(slic_ids(x, spec.count, spec.compactness, spacing))
    else:
        ids = torch.from_numpy(relabel(label_ids(spec.path, model_input)))
    count = int(ids.max()) + 1
    if count < 2:
        hint = {"cubes": "give smaller cubes", "slic": "ask for more supervoxels",
                "labels": "give a label volume with at least one label > 0 inside the input"}[spec.kind]
        raise InputError(f"segments {spec.text()} give {count} segment inside the volume ({'x'.join(map(str, shape))} "
                         f"voxels on the model grid); at least 2 are needed: {hint}")
    return ids.to(model_input.tensor.device)


def segments_on_input_grid(segments: torch.Tensor, model_input: ModelInput) -> np.ndarray:
    """Model-grid segment ids (X, Y, Z) → uint16/int32 labels 1..S on the input grid (nearest neighbour), 0
    where the model grid does not reach; label = segment id + 1, so that 0 stays "no segment" in viewers."""
    labels = segments.detach().cpu().numpy().astype(np.int32) + 1
    reference = model_input.reference
    on_input = resample_array(labels, model_input.ijk_to_ras, reference.size, reference.ijk_to_ras(),
                              interpolation="nearest")
    return on_input.astype(np.uint16) if int(labels.max()) < 2**16 else on_input


def estimate_seconds(passes: int, seconds_per_pass: float) -> float:
    """Expected run time of ``passes`` masked network passes at ``seconds_per_pass`` each."""
    return passes * seconds_per_pass


def check_duration(passes: int, seconds_per_pass: float, what: str, reduce: str,
                   longest_s: float = LONGEST_RUN_S) -> None:
    """Refuse, in one line before any work, a run estimated to take longer than ``longest_s``.

    Args:
        passes: masked passes the run needs (e.g. samples × segments for permutation sampling).
        seconds_per_pass: measured on this machine (e.g. the clean pass's time).
        what: the run, as the user named it (``"shap:1000 over 512 segments"``).
        reduce: how to need fewer passes (``"use fewer segments (slic:128) or samples (shap:200)"``).
    """
    seconds = estimate_seconds(passes, seconds_per_pass)
    if seconds > longest_s:
        raise InputError(f"{what} needs about {passes:,} model passes, about {_duration(seconds)} at "
                         f"{seconds_per_pass:.3g} s per pass here (more than {_duration(longest_s)}); "
                         f"to reduce it: {reduce}")


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
