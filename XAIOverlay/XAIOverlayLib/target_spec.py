"""What to explain, as chosen in the GUI → the engine's target syntax (see :mod:`xaioverlay.targets`).

Classifiers: a class (or the predicted one). Segmentation models: an output channel over a region —
the model's own predicted region, a segment of a segmentation node, a markups ROI, or a markups point
with a radius. Regions are given to the engine in the input volume's own RAS millimetres (the frame of
the file written for the worker) or as a mask file on its grid written next to the inputs. Markups
give world coordinates: they are taken into the volume's frame through the inverse of its parent
transforms, so a region selects the same anatomy whether or not the volume (or the markup, or the
segmentation) is under a transform. A non-linear transform is refused: it must be hardened first.

Each choice also yields a cache text that names the region by content (a segment by its voxels, an
ROI or point by its coordinates), so a revisit finds the map again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk

from . import nodes
from .cache import volume_digest

PREDICTED, SEGMENT, ROI, POINT = "predicted", "segment", "roi", "point"
REGIONS = (PREDICTED, SEGMENT, ROI, POINT)


@dataclass
class TargetChoice:
    """The GUI's target choice.

    Attributes:
        task: ``"classification"`` or ``"segmentation"`` (from the model's description).
        key: class or channel, by name or index; "" for the model's default (the predicted class, or
            the first foreground channel).
        region: one of :data:`REGIONS` (segmentation only).
        segmentation, segment_id: the segment (region ``segment``; first segment when id is "").
        roi: a ``vtkMRMLMarkupsROINode`` (region ``roi``): the voxels whose centres it holds.
        point: a markups node whose first control point is the centre (region ``point``).
        radius_mm: ball radius around the point (0: the voxel holding it).
    """

    task: str = "classification"
    key: str = ""
    region: str = PREDICTED
    segmentation: object = None
    segment_id: str = ""
    roi: object = None
    point: object = None
    radius_mm: float = 10.0

    @property
    def needs_region_node(self) -> bool:
        return self.task == "segmentation" and self.region != PREDICTED


def _numbers(values) -> str:
    return ",".join(f"{float(v):.3f}" for v in values)


def segment_mask_file(segmentation, segment_ids: list[str], reference, path: Path) -> tuple[Path, str]:
    """Write segments (all when ``segment_ids`` is empty) as a label map on ``reference``'s grid, in its
    own frame (Slicer's export applies the linear transforms between the two nodes); returns (file,
    content digest). Raises ValueError for a non-linear transform or segments outside the volume."""
    for node in (segmentation, reference):
        nodes.to_world(node)  # refuses a non-linear transform
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids or list(segmentation.GetSegmentation().GetSegmentIDs()):
        ids.InsertNextValue(segment_id)
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene = segmentation.GetScene()
    scene.AddNode(labelmap)  # the export needs the node in the scene; removed again below
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, reference):
            raise ValueError(f"cannot export segments {list(segment_ids)} of {segmentation.GetName()!r}; check that they are not empty")
        if not nodes.voxels(labelmap).any():
            raise ValueError(f"the segments of {segmentation.GetName()!r} lie outside volume {reference.GetName()!r}; "
                             "check that they are placed on it (and under the same transform)")
        nodes.write_volume_file(labelmap, path)
        digest = nodes.voxel_digest(labelmap)
    finally:
        nodes.remove_nodes(scene, [labelmap])
    return path, digest


def world_to_volume(reference) -> np.ndarray:
    """4×4 world RAS → ``reference``'s own RAS (identity without a reference volume)."""
    return np.eye(4) if reference is None else np.linalg.inv(nodes.to_world(reference))


def along_axes(linear: np.ndarray) -> bool:
    """True when a 3×3 matrix maps each axis onto one axis (a permutation with signs and scales)."""
    significant = np.abs(linear) > 1e-6 * np.abs(linear).max()
    return bool((significant.sum(0) == 1).all() and (significant.sum(1) == 1).all())


def box_corners(low, high) -> np.ndarray:
    """(8, 4): the corners of the box ``low`` ≤ x ≤ ``high`` in homogeneous coordinates."""
    return np.array([[x, y, z, 1.0] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])


def box_mask(ijk_to_ras: np.ndarray, shape: tuple[int, int, int], ras_to_box: np.ndarray, low, high) -> np.ndarray:
    """(I, J, K) bool: the voxels of a grid whose centres, taken into a box's own frame by ``ras_to_box``
    (4×4), lie within ``low`` ≤ x ≤ ``high`` (3 numbers each). Only the box's extent on the grid is visited."""
    ijk_to_box = ras_to_box @ ijk_to_ras
    extent = (np.linalg.inv(ijk_to_box) @ box_corners(low, high).T)[:3]
    start = np.clip(np.floor(extent.min(1)).astype(int), 0, shape)
    stop = np.clip(np.ceil(extent.max(1)).astype(int) + 1, 0, shape)
    i, j = np.arange(start[0], stop[0]), np.arange(start[1], stop[1])
    planes = [np.add.outer(i * ijk_to_box[axis, 0], j * ijk_to_box[axis, 1]) for axis in range(3)]  # 3 × (I', J')
    mask = np.zeros(shape, bool)
    for k in range(start[2], stop[2]):  # a slice at a time: a CT's points at once would take gigabytes
        inside = np.ones(planes[0].shape, bool)
        for axis, plane in enumerate(planes):
            offset = k * ijk_to_box[axis, 2] + ijk_to_box[axis, 3]
            inside &= (plane >= low[axis] - offset) & (plane <= high[axis] - offset)
        mask[start[0]:stop[0], start[1]:stop[1], k] = inside
    return mask


def roi_region(roi, reference, path: Path) -> tuple[str, str]:
    """(region, its cache text) of a markups ROI in ``reference``'s own frame: ``box:...`` when the ROI's
    axes stay along that frame's axes (no transform, a translation, the volume's own transform), else
    ``mask:FILE`` holding the voxels whose centres lie inside it."""
    nodes.to_world(roi)  # refuses a non-linear transform
    object_to_volume = world_to_volume(reference) @ nodes.matrix_array(roi.GetObjectToWorldMatrix())
    bounds = [0.0] * 6
    roi.GetObjectBounds(bounds)
    low, high = np.array(bounds[0::2]), np.array(bounds[1::2])
    if along_axes(object_to_volume[:3, :3]):
        inside = (object_to_volume @ box_corners(low, high).T).T[:, :3]
        text = "box:" + _numbers(inside.min(0)) + "," + _numbers(inside.max(0))
        return text, text
    if reference is None:
        raise ValueError(f"ROI {roi.GetName()!r} is rotated; choose the input volume to read it on")
    ijk_to_ras = nodes.ijk_to_ras(reference)
    mask = box_mask(ijk_to_ras, nodes.voxels(reference).shape, np.linalg.inv(object_to_volume), low, high)
    if not mask.any():
        raise ValueError(f"ROI {roi.GetName()!r} holds no voxel centre of {reference.GetName()!r}; "
                         "place it on the volume")
    from xaioverlay.volumes import Geometry, Volume, write_volume

    write_volume(Volume(mask.astype(np.uint8), Geometry.from_ijk_to_ras(ijk_to_ras, mask.shape)), path)
    return f"mask:{path}", f"mask:{volume_digest(mask, ijk_to_ras)}"


def build_target(choice: TargetChoice, reference, folder: Path) -> tuple[str | None, str]:
    """(engine target spec or None for the default, cache text) for ``choice`` on volume ``reference``.

    Raises ValueError (one line, naming the fix) for a region choice without its node.
    """
    key = choice.key.strip()
    if choice.task == "classification":
        return (f"class:{key}" if key else None), (f"class:{key}" if key else "default")
    channel = key or None
    if choice.region == PREDICTED:
        spec = f"channel:{channel}" if channel else None
        return spec, spec or "default"
    if channel is None:
        raise ValueError("a region target needs a channel; choose the output channel to explain")
    if choice.region == SEGMENT:
        if choice.segmentation is None:
            raise ValueError("target region 'segment': choose a segmentation node (and segment)")
        segment_id = choice.segment_id or choice.segmentation.GetSegmentation().GetNthSegmentID(0)
        if not segment_id:
            raise ValueError(f"segmentation {choice.segmentation.GetName()!r} has no segment; add one or choose another region")
        path, digest = segment_mask_file(choice.segmentation, [segment_id], reference, Path(folder) / "target_mask.nrrd")
        return f"channel:{channel}@mask:{path}", f"channel:{channel}@mask:{digest}"
    if choice.region == ROI:
        if choice.roi is None:
            raise ValueError("target region 'roi': choose a markups ROI")
        region, text = roi_region(choice.roi, reference, Path(folder) / "target_roi.nrrd")
        return f"channel:{channel}@{region}", f"channel:{channel}@{text}"
    if choice.region == POINT:
        if choice.point is None or choice.point.GetNumberOfControlPoints() < 1:
            raise ValueError("target region 'point': choose a markups point list with at least one point")
        nodes.to_world(choice.point)  # refuses a non-linear transform
        centre = [0.0, 0.0, 0.0]
        choice.point.GetNthControlPointPositionWorld(0, centre)
        centre = (world_to_volume(reference) @ np.r_[centre, 1.0])[:3]
        text = f"channel:{channel}@point:{_numbers([*centre, choice.radius_mm])}"
        return text, text
    raise ValueError(f"unknown target region {choice.region!r}; use one of {', '.join(REGIONS)}")


def target_label(choice: TargetChoice, class_names: list[str]) -> str:
    """Short name of the target for node names (``tumour``, ``tumour @ ROI``)."""
    key = choice.key.strip()
    if key.isdigit() and int(key) < len(class_names):
        key = class_names[int(key)]
    name = key or ("predicted class" if choice.task == "classification" else "default channel")
    suffix = {SEGMENT: " @ segment", ROI: " @ ROI", POINT: " @ point"}.get(choice.region, "") if choice.task == "segmentation" else ""
    return name + suffix
