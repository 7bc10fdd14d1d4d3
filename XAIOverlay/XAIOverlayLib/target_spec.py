"""What to explain, as chosen in the GUI → the engine's target syntax (see :mod:`xaioverlay.targets`).

Classifiers: a class (or the predicted one). Segmentation models: an output channel over a region —
the model's own predicted region, a segment of a segmentation node, a markups ROI, or a markups point
with a radius. Regions are given to the engine in RAS millimetres (as Slicer shows them) or, for a
segment, as a mask file written next to the inputs.

Each choice also yields a cache text that names the region by content (a segment by its voxels, an
ROI or point by its coordinates), so a revisit finds the map again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import slicer
import vtk

from . import nodes

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
        roi: a ``vtkMRMLMarkupsROINode`` (region ``roi``); its RAS-aligned bounds are used.
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
    """Write segments (all when ``segment_ids`` is empty) as a label map on ``reference``'s grid;
    returns (file, content digest)."""
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids or list(segmentation.GetSegmentation().GetSegmentIDs()):
        ids.InsertNextValue(segment_id)
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene = segmentation.GetScene()
    scene.AddNode(labelmap)  # the export needs the node in the scene; removed again below
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, reference):
            raise ValueError(f"cannot export segments {list(segment_ids)} of {segmentation.GetName()!r}; check that they are not empty")
        nodes.write_volume_file(labelmap, path)
        digest = nodes.voxel_digest(labelmap)
    finally:
        nodes.remove_nodes(scene, [labelmap])
    return path, digest


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
        bounds = [0.0] * 6
        choice.roi.GetRASBounds(bounds)
        corners = _numbers(bounds[0::2]) + "," + _numbers(bounds[1::2])
        return f"channel:{channel}@box:{corners}", f"channel:{channel}@box:{corners}"
    if choice.region == POINT:
        if choice.point is None or choice.point.GetNumberOfControlPoints() < 1:
            raise ValueError("target region 'point': choose a markups point list with at least one point")
        centre = [0.0, 0.0, 0.0]
        choice.point.GetNthControlPointPositionWorld(0, centre)
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
