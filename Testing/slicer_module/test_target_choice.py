"""The GUI's target choice → the engine's target: a class, or a channel over the model's region, a
segment, a markups ROI, or a markups point with a radius."""

from __future__ import annotations

import numpy as np
import pytest
import slicer

from slicer_support import head_with_lesion, lesion_mask, load_volume, segmentation_of
from xaioverlay.targets import parse_target
from xaioverlay.volumes import Volume, read_volume, resample_array, write_volume
from XAIOverlayLib import nodes
from XAIOverlayLib.logic import ExplainRequest
from XAIOverlayLib.target_spec import POINT, ROI, SEGMENT, TargetChoice, build_target, target_label


def test_classifier_targets():
    assert build_target(TargetChoice("classification", "tumour"), None, None) == ("class:tumour", "class:tumour")
    assert build_target(TargetChoice("classification", ""), None, None) == (None, "default")
    assert target_label(TargetChoice("classification", "1"), ["no tumour", "tumour"]) == "tumour"


def test_segment_region_becomes_a_mask_with_exactly_the_segments_voxels(scene, lesion_case, tmp_path):
    volume, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    segmentation = segmentation_of(scene, volume, lesion_mask(volume), tmp_path)
    spec, text = build_target(TargetChoice("segmentation", "tumour", SEGMENT, segmentation=segmentation), anatomy, tmp_path)
    parsed = parse_target(spec)
    assert (parsed.kind, parsed.key, parsed.region) == ("channel", "tumour", "mask")
    mask = read_volume(parsed.mask_path)
    on_grid = resample_array(mask.array, mask.geometry.ijk_to_ras(), volume.geometry.size, volume.geometry.ijk_to_ras(), interpolation="nearest")
    assert np.array_equal(on_grid > 0, lesion_mask(volume))
    assert text.startswith("channel:tumour@mask:") and str(tmp_path) not in text  # cached by content, not path
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 1  # the export node is gone


def test_roi_region_is_its_ras_bounding_box(scene, tmp_path):
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    roi.SetCenter(10.0, -20.0, 30.0)
    roi.SetSize(8.0, 6.0, 4.0)
    spec, text = build_target(TargetChoice("segmentation", "1", ROI, roi=roi), None, tmp_path)
    parsed = parse_target(spec)
    assert parsed.region == "box" and parsed.numbers == pytest.approx((6, -23, 28, 14, -17, 32))
    assert text == spec


def test_point_region_with_radius(scene, tmp_path):
    point = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(point)
    point.AddControlPoint(1.5, -2.0, 3.25)
    spec, _ = build_target(TargetChoice("segmentation", "tumour", POINT, point=point, radius_mm=7.5), None, tmp_path)
    assert parse_target(spec).numbers == pytest.approx((1.5, -2.0, 3.25, 7.5))


@pytest.mark.parametrize("choice, message", [
    (TargetChoice("segmentation", "tumour", SEGMENT), "choose a segmentation"),
    (TargetChoice("segmentation", "tumour", ROI), "choose a markups ROI"),
    (TargetChoice("segmentation", "tumour", POINT), "at least one point"),
    (TargetChoice("segmentation", "", ROI), "needs a channel"),
])
def test_region_without_its_node_names_the_fix(choice, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build_target(choice, None, tmp_path)


def test_segment_target_reaches_the_engine_and_is_recorded(scene, logic, models, tmp_path):
    volume = head_with_lesion()
    anatomy = load_volume(scene, write_volume(volume, tmp_path / "MR.nrrd"), "MR")
    segmentation = segmentation_of(scene, volume, lesion_mask(volume), tmp_path)
    choice = TargetChoice(key="tumour", region=SEGMENT, segmentation=segmentation)
    job = logic.wait(logic.explain(ExplainRequest([anatomy], str(models["segmenter"]), ["gradcam"], choice)))
    assert job.state == "done", job.error
    target = nodes.attribute(logic.map_nodes(job)[0], "target", parse=True)
    expected = int(lesion_mask(volume).sum())
    assert target["region"] == "mask" and target["name"] == "tumour"
    assert abs(target["voxels"] - expected) <= 0.02 * expected
    assert logic.map_nodes(job)[0].GetName() == "MR · Grad-CAM · tumour @ mask"
