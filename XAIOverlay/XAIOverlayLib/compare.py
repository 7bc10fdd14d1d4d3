"""The compare layout: one linked slice view per method over the anatomy, the main views below,
and the comparison table.

Layout (Slicer layout XML, registered under :data:`LAYOUT_ID`)::

    ┌──────────┬──────────┬──────────┐   one slice view per method, view group COMPARE_GROUP,
    │ Grad-CAM │ HiResCAM │ LRP      │   all linked (slice position, zoom, pan), one orientation
    ├──────────┴───┬──────┴──────────┤
    │ Red          │ Green  │ Yellow │   Slicer's main views: the method picked in the table,
    └──────────────┴────────┴────────┘   in three orientations

Views are named ``XAIOverlayCompare1..N`` (reused when the set of methods changes); each view's label
is its method's label. Linking is Slicer's own: composite nodes with linked control in one view group
(:class:`vtkMRMLSliceLinkLogic` does the propagation).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from typing import Sequence

import numpy as np
import slicer

from . import nodes

LAYOUT_ID = 60601
VIEW_PREFIX = "XAIOverlayCompare"
COMPARE_GROUP = 6
MAIN_VIEWS = ("Red", "Green", "Yellow")
ORIENTATIONS = ("Axial", "Coronal", "Sagittal")
#: Colours of the view bars, one per method (cycled).
VIEW_COLOURS = ("#E0683C", "#4C9BE8", "#9BC53D", "#C879D6", "#E8C547", "#3CC8B4")


def view_name(index: int) -> str:
    return f"{VIEW_PREFIX}{index + 1}"


def _slice_view(parent, tag: str, label: str, orientation: str, colour: str, group: int) -> None:
    view = ET.SubElement(ET.SubElement(parent, "item"), "view", {"class": "vtkMRMLSliceNode", "singletontag": tag})
    for name, value in (("orientation", orientation), ("viewlabel", label), ("viewcolor", colour), ("viewgroup", str(group))):
        ET.SubElement(view, "property", {"name": name, "action": "default"}).text = value


def layout_xml(labels: Sequence[str], orientation: str = "Axial", *, columns: int | None = None, main_views: bool = True) -> str:
    """Slicer layout XML with one slice view per label (in order), rows of ``columns`` views."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation {orientation!r}: use one of {', '.join(ORIENTATIONS)}")
    if not labels:
        raise ValueError("no method to compare; choose at least one method")
    columns = columns or min(len(labels), 4)
    root = ET.Element("layout", {"type": "vertical"})
    compare = ET.SubElement(ET.SubElement(root, "item", {"splitSize": "600"}), "layout", {"type": "vertical"})
    for row in range(math.ceil(len(labels) / columns)):
        line = ET.SubElement(ET.SubElement(compare, "item"), "layout", {"type": "horizontal"})
        for index in range(row * columns, min(len(labels), (row + 1) * columns)):
            _slice_view(line, view_name(index), labels[index], orientation, VIEW_COLOURS[index % len(VIEW_COLOURS)], COMPARE_GROUP)
    if main_views:
        main = ET.SubElement(ET.SubElement(root, "item", {"splitSize": "400"}), "layout", {"type": "horizontal"})
        for tag, label, view_orientation, colour in zip(
            MAIN_VIEWS, ("R", "G", "Y"), ORIENTATIONS, ("#F34A33", "#6DAD4A", "#EDD54C")
        ):
            _slice_view(main, tag, label, view_orientation, colour, 0)
    return ET.tostring(root, encoding="unicode")


def views_in_layout(xml: str) -> list[dict]:
    """The slice views a layout XML declares: tag, label, orientation, group, in document order."""
    views = []
    for view in ET.fromstring(xml).iter("view"):
        properties = {p.get("name"): p.text for p in view.findall("property")}
        views.append({"tag": view.get("singletontag"), "class": view.get("class"), "label": properties.get("viewlabel"),
                      "orientation": properties.get("orientation"), "group": int(properties.get("viewgroup", 0))})
    return views


def apply_layout(layout_node, xml: str) -> None:
    """Register (or update) the compare layout and switch to it."""
    if layout_node.IsLayoutDescription(LAYOUT_ID):
        layout_node.SetLayoutDescription(LAYOUT_ID, xml)
    else:
        layout_node.AddLayoutDescription(LAYOUT_ID, xml)
    if layout_node.GetViewArrangement() == LAYOUT_ID:  # force the views to be rebuilt from the new XML
        layout_node.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutNone)
    layout_node.SetViewArrangement(LAYOUT_ID)


def slice_node(scene, tag: str):
    return scene.GetSingletonNode(tag, "vtkMRMLSliceNode")


def composite_node(scene, tag: str):
    """The slice composite node of view ``tag``; made if the view has not made it yet."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if node.GetLayoutName() == tag:
            return node
    node = slicer.vtkMRMLSliceCompositeNode()
    node.SetLayoutName(tag)
    node.SetSingletonTag(tag)
    scene.AddNode(node)
    return node


def show_layers(scene, tag: str, background, foreground, opacity: float) -> None:
    """Anatomy in the background, a map in the foreground of view ``tag``."""
    composite = composite_node(scene, tag)
    composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
    composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
    composite.SetForegroundOpacity(float(opacity))


def show_compare(scene, anatomy, maps: Sequence, *, orientation: str = "Axial", opacity: float = 0.6,
                 segmentation=None) -> list[str]:
    """Fill the compare views (which the layout made) with ``maps``; returns the view tags used.

    All compare views share one view group and have linked control, so moving, zooming or panning one
    moves the others; the model's segmentation, if given, is drawn as an outline in them.
    """
    tags = [view_name(index) for index in range(len(maps))]
    for tag, volume in zip(tags, maps):
        view = slice_node(scene, tag)
        if view is not None:
            view.SetViewGroup(COMPARE_GROUP)
            view.SetOrientation(orientation)
        show_layers(scene, tag, anatomy, volume, opacity)
        composite = composite_node(scene, tag)
        composite.SetLinkedControl(1)
        composite.SetHotLinkedControl(0)
    if segmentation is not None:
        outline(scene, segmentation, [slice_node(scene, tag) for tag in (*tags, *MAIN_VIEWS)])
    return tags


def set_orientation(scene, tags: Sequence[str], orientation: str) -> None:
    """One orientation for every compare view."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation {orientation!r}: use one of {', '.join(ORIENTATIONS)}")
    for tag in tags:
        view = slice_node(scene, tag)
        if view is not None:
            view.SetOrientation(orientation)


def set_opacity(scene, tags: Sequence[str], opacity: float) -> None:
    for tag in tags:
        composite_node(scene, tag).SetForegroundOpacity(float(opacity))


def outline(scene, segmentation, views: Sequence) -> None:
    """Draw a segmentation as outlines only, in the given slice views."""
    segmentation.CreateDefaultDisplayNodes()
    display = segmentation.GetDisplayNode()
    display.SetVisibility2DFill(0)
    display.SetVisibility2DOutline(1)
    display.SetSliceIntersectionThickness(2)
    display.SetViewNodeIDs([view.GetID() for view in views if view is not None])


def jump_to(scene, tags: Sequence[str], ras: Sequence[float]) -> None:
    """Centre the given views on a RAS point (e.g. a map's peak)."""
    for tag in tags:
        view = slice_node(scene, tag)
        if view is not None:
            view.JumpSliceByCentering(*[float(v) for v in ras])


def peak_ras(volume) -> np.ndarray:
    """World RAS mm of a map's largest value (for signed maps, largest magnitude), through the map's
    parent transform: where the views must go."""
    values = nodes.voxels(volume)
    index = np.unravel_index(int(np.argmax(np.abs(values))), values.shape)
    world = [0.0, 0.0, 0.0]
    volume.TransformPointToWorld((nodes.ijk_to_ras(volume) @ np.r_[np.array(index, float), 1.0])[:3], world)
    return np.array(world)


# --- the comparison table --------------------------------------------------------------------------
BASE_COLUMNS = ("Method", "Runtime (s)", "Forward passes", "Backward passes")


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, object]:
    """``{"faithfulness": {"deletion_auc": 0.2}}`` → ``{"faithfulness · deletion_auc": 0.2}``; scalars only."""
    flat: dict[str, object] = {}
    for key, value in (metrics or {}).items():
        name = f"{prefix} · {key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


def table_rows(records: Sequence[dict]) -> tuple[list[str], list[list[object]]]:
    """Columns and rows of the comparison table: one row per method record.

    Base columns come from every record (runtime and passes); after them, one column per metric that
    any record carries under ``"metrics"`` (whatever the engine measured), blank where a method lacks it.
    """
    metric_columns: list[str] = []
    flats = []
    for record in records:
        flat = flatten_metrics(record.get("metrics", {}))
        flats.append(flat)
        metric_columns += [name for name in flat if name not in metric_columns]
    rows = []
    for record, flat in zip(records, flats):
        passes = record.get("passes", {})
        rows.append([record.get("label", record.get("method", "?")), record.get("runtime_s"),
                     passes.get("forward"), passes.get("backward"), *[flat.get(name) for name in metric_columns]])
    return [*BASE_COLUMNS, *metric_columns], rows


def comparison_table(scene, anatomy, maps: Sequence, name: str | None = None):
    """A table node (one row per map) in the maps' folder; reused and refilled for the same anatomy."""
    import vtk

    records = [nodes.attribute(volume, "record", {}, parse=True) for volume in maps]
    columns, rows = table_rows(records)
    found = nodes.owned_nodes(scene, nodes.TABLE, source=anatomy.GetID())
    table_node = found[0] if found else slicer.vtkMRMLTableNode()
    table = table_node.GetTable()
    table.Initialize()
    for column, title in enumerate(columns):
        numeric = column > 0 and all(isinstance(row[column], (int, float)) and not isinstance(row[column], bool)
                                     for row in rows if row[column] is not None)
        array = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        array.SetName(title)
        for row in rows:
            value = row[column]
            if numeric:
                array.InsertNextValue(float("nan") if value is None else float(value))
            else:
                array.InsertNextValue("" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value)))
        table.AddColumn(array)
    table_node.Modified()
    if not found:
        table_node.SetName(name or f"{anatomy.GetName()} · XAI comparison")
        scene.AddNode(table_node)
    nodes.set_attributes(table_node, role=nodes.TABLE, source=anatomy.GetID(), rows=[volume.GetID() for volume in maps])
    sh = nodes.subject_hierarchy(scene)
    nodes.place_in_folder(scene, table_node, sh.GetItemParent(nodes.hierarchy_item(scene, maps[0])))
    return table_node


def map_for_row(scene, table_node, row: int):
    """The map node shown in ``row`` of a comparison table (None when out of range)."""
    ids = nodes.attribute(table_node, "rows", [], parse=True)
    return scene.GetNodeByID(ids[row]) if 0 <= row < len(ids) else None


def show_in_main_views(scene, anatomy, volume, opacity: float) -> None:
    """The picked method in Slicer's Red, Green and Yellow views, centred on its peak."""
    for tag in MAIN_VIEWS:
        show_layers(scene, tag, anatomy, volume, opacity)
    jump_to(scene, MAIN_VIEWS, peak_ras(volume))
