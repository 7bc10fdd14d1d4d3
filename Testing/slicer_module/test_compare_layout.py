"""The compare layout: XML Slicer's layout logic accepts, one view per method, linked views, one
orientation for all, and the comparison table with whatever metrics the engine recorded."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import slicer

from slicer_support import classifier_request, load_volume
from XAIOverlayLib import compare, nodes

LABELS = ["Grad-CAM", "HiResCAM", "LRP", "Occlusion", "IG"]


def test_layout_xml_parses_and_names_one_view_per_method_in_order():
    xml = compare.layout_xml(LABELS, "Coronal", columns=3)
    ET.fromstring(xml)  # well-formed
    views = compare.views_in_layout(xml)
    method_views = [v for v in views if v["group"] == compare.COMPARE_GROUP]
    assert [v["label"] for v in method_views] == LABELS
    assert [v["tag"] for v in method_views] == [f"XAIOverlayCompare{i}" for i in range(1, 6)]
    assert {v["orientation"] for v in method_views} == {"Coronal"}
    assert [v["tag"] for v in views if v["group"] == 0] == ["Red", "Green", "Yellow"]
    rows = ET.fromstring(xml).find("item").find("layout").findall("item")
    assert [len(row.find("layout").findall("item")) for row in rows] == [3, 2]


def test_layout_xml_refuses_nothing_to_compare_and_unknown_orientations():
    with pytest.raises(ValueError, match="at least one method"):
        compare.layout_xml([])
    with pytest.raises(ValueError, match="Axial, Coronal, Sagittal"):
        compare.layout_xml(["Grad-CAM"], "Oblique")


def test_slicers_layout_logic_builds_the_views_the_xml_names(scene):
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    layout_node = layout_logic.GetLayoutNode()
    compare.apply_layout(layout_node, compare.layout_xml(LABELS[:3], "Sagittal"))
    assert layout_node.GetViewArrangement() == compare.LAYOUT_ID
    for index, label in enumerate(LABELS[:3]):
        view = compare.slice_node(scene, compare.view_name(index))
        assert view is not None and view.GetLayoutLabel() == label
        assert view.GetOrientation() == "Sagittal" and view.GetViewGroup() == compare.COMPARE_GROUP
    # a new set of methods updates the registered layout in place
    compare.apply_layout(layout_node, compare.layout_xml(LABELS[:4], "Axial"))
    assert compare.slice_node(scene, compare.view_name(3)).GetLayoutLabel() == "Occlusion"


def use_layout_logic(scene, logic) -> None:
    """Slicer's layout logic on the scene (it makes the views' slice nodes, as the app does)."""
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    logic.layout_node = layout_logic.GetLayoutNode()
    logic._layout_logic = layout_logic  # kept alive with the logic


def interact(view, flags, change) -> None:
    """What a mouse drag does: mark the slice node as interacting, change it, stop."""
    view.SetInteractionFlags(flags)
    view.SetInteracting(1)
    change()
    view.UpdateMatrices()
    view.SetInteracting(0)


def test_compare_views_are_linked_by_slicers_own_link_logic(scene, logic, models, lesion_case):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    use_layout_logic(scene, logic)
    link = slicer.vtkMRMLSliceLinkLogic()
    link.SetMRMLScene(scene)
    job = logic.wait(logic.explain(classifier_request(anatomy, models["classifier"])))
    logic.show_compare(job, "Axial")
    first, second = (compare.slice_node(scene, tag) for tag in logic.compare_tags)
    for tag, node in zip(logic.compare_tags, logic.map_nodes(job)):
        composite = compare.composite_node(scene, tag)
        assert composite.GetLinkedControl() == 1
        assert composite.GetBackgroundVolumeID() == anatomy.GetID() and composite.GetForegroundVolumeID() == node.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(logic.opacity)
    red = compare.slice_node(scene, "Red")
    red_offset = red.GetSliceOffset()
    # zoom (field of view), pan (origin) and slice position follow from the first view to the second
    interact(first, slicer.vtkMRMLSliceNode.FieldOfViewFlag, lambda: first.SetFieldOfView(61.0, 61.0, first.GetFieldOfView()[2]))
    interact(first, slicer.vtkMRMLSliceNode.XYZOriginFlag, lambda: first.SetXYZOrigin(4.0, -3.0, 0.0))
    interact(first, slicer.vtkMRMLSliceNode.SliceToRASFlag, lambda: first.GetSliceToRAS().SetElement(2, 3, 47.5))
    assert second.GetFieldOfView()[:2] == pytest.approx((61.0, 61.0))
    assert second.GetXYZOrigin() == pytest.approx((4.0, -3.0, 0.0))
    assert second.GetSliceToRAS().GetElement(2, 3) == pytest.approx(47.5)
    assert red.GetSliceOffset() == pytest.approx(red_offset)  # the main views are another group
    # one orientation selector for all compare views
    logic.set_orientation("Coronal")
    assert {compare.slice_node(scene, tag).GetOrientation() for tag in logic.compare_tags} == {"Coronal"}


def test_comparison_table_has_one_row_per_method_and_takes_any_metrics():
    records = [
        {"label": "Grad-CAM", "runtime_s": 0.5, "passes": {"forward": 1, "backward": 1},
         "metrics": {"faithfulness": {"deletion_auc": 0.12, "insertion_auc": 0.8}, "sanity": {"verdict": "pass"}}},
        {"label": "Occlusion", "runtime_s": 4.0, "passes": {"forward": 640, "backward": 0},
         "metrics": {"faithfulness": {"deletion_auc": 0.08}, "localisation": {"pointing_game": True}}},
        {"label": "HiResCAM", "runtime_s": 0.4, "passes": {"forward": 1, "backward": 1}},
    ]
    columns, rows = compare.table_rows(records)
    assert columns == ["Method", "Runtime (s)", "Forward passes", "Backward passes", "faithfulness · deletion_auc",
                       "faithfulness · insertion_auc", "sanity · verdict", "localisation · pointing_game"]
    assert rows[1] == ["Occlusion", 4.0, 640, 0, 0.08, None, None, True]
    assert rows[2][4:] == [None, None, None, None]


def test_comparison_table_node_rows_lead_back_to_their_maps(scene, logic, models, lesion_case):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    use_layout_logic(scene, logic)
    job = logic.wait(logic.explain(classifier_request(anatomy, models["classifier"])))
    table = logic.show_compare(job)
    maps = logic.map_nodes(job)
    vtk_table = table.GetTable()
    assert vtk_table.GetNumberOfRows() == 2
    assert [vtk_table.GetValue(r, 0).ToString() for r in range(2)] == ["Grad-CAM", "HiResCAM"]
    runtimes = [vtk_table.GetValue(r, 1).ToDouble() for r in range(2)]
    assert runtimes == pytest.approx([float(nodes.attribute(m, "runtime_s")) for m in maps])
    assert vtk_table.GetValue(0, 2).ToDouble() == 1  # forward passes
    # clicking row 1 shows HiResCAM in the main views, centred on its peak
    picked = compare.map_for_row(scene, table, 1)
    assert picked is maps[1]
    logic.select(picked)
    for tag in compare.MAIN_VIEWS:
        assert compare.composite_node(scene, tag).GetForegroundVolumeID() == maps[1].GetID()
    peak = compare.peak_ras(maps[1])
    red = compare.slice_node(scene, "Red")
    centre = np.array([red.GetSliceToRAS().GetElement(r, 3) for r in range(3)])
    assert np.linalg.norm(centre - peak) < 1e-6
    assert compare.map_for_row(scene, table, 5) is None
    # the table sits with the maps
    sh = nodes.subject_hierarchy(scene)
    assert sh.GetItemParent(nodes.hierarchy_item(scene, table)) == sh.GetItemParent(nodes.hierarchy_item(scene, maps[0]))
