"""The Logic against real MRML: maps as scalar volume nodes with exact geometry, attributes, the
subject-hierarchy folder, replacing only the module's own nodes, cache hits, cancel, a dead worker."""

from __future__ import annotations

import json
import re

import numpy as np
import slicer

from slicer_support import classifier_request, head_with_lesion, lesion_mask, load_volume, scene_node_ids, worker_command
from xaioverlay.volumes import read_volume, write_volume
from XAIOverlayLib import nodes
from XAIOverlayLib.logic import ExplainRequest, OverlayLogic
from XAIOverlayLib.target_spec import TargetChoice
from XAIOverlayLib.worker_client import WorkerClient


def put_in_study(scene, volume):
    sh = nodes.subject_hierarchy(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "MR head")
    sh.SetItemParent(nodes.hierarchy_item(scene, volume), study)
    return sh, study


def test_map_nodes_keep_the_exact_geometry_of_the_input_and_land_on_the_lesion(scene, logic, models, lesion_case):
    volume, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    job = logic.wait(logic.explain(classifier_request(anatomy, models["classifier"])))
    assert job.state == "done", job.error
    maps = logic.map_nodes(job)
    assert [m.GetName() for m in maps] == ["CT_1 · Grad-CAM · tumour", "CT_1 · HiResCAM · tumour"]
    for node in maps:
        # oblique, anisotropic, off-origin grid: IJK-to-RAS identical to the source volume's
        np.testing.assert_allclose(nodes.ijk_to_ras(node), nodes.ijk_to_ras(anatomy), atol=1e-9)
        np.testing.assert_allclose(nodes.ijk_to_ras(node), volume.geometry.ijk_to_ras(), atol=1e-9)
        assert node.GetImageData().GetDimensions() == anatomy.GetImageData().GetDimensions()
        shown = nodes.voxels(node) >= float(nodes.attribute(node, "threshold"))
        assert shown.any() and shown[lesion_mask(volume)].sum() == shown.sum()  # every shown voxel is lesion


def test_map_nodes_record_method_parameters_target_model_and_runtime(scene, logic, models, lesion_case):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    job = logic.wait(logic.explain(classifier_request(anatomy, models["classifier"], methods=["gradcam"])))
    node = logic.map_nodes(job)[0]
    assert nodes.attribute(node, "role") == "map"
    assert nodes.attribute(node, "method") == "gradcam"
    assert nodes.attribute(node, "source") == anatomy.GetID()
    assert nodes.attribute(node, "parameters", parse=True)["layer"]
    assert nodes.attribute(node, "target", parse=True)["name"] == "tumour"
    assert nodes.attribute(node, "model").startswith("intensity_classifier@")
    assert float(nodes.attribute(node, "runtime_s")) > 0
    assert nodes.attribute(node, "passes", parse=True) == {"forward": 1, "backward": 1}
    assert json.loads(node.GetAttribute("XAIOverlay.record"))["label"] == "Grad-CAM"


def test_maps_go_into_an_xai_folder_under_the_input_volumes_study(scene, logic, models, lesion_case):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    sh, study = put_in_study(scene, anatomy)
    job = logic.wait(logic.explain(classifier_request(anatomy, models["classifier"])))
    folders = {sh.GetItemParent(nodes.hierarchy_item(scene, node)) for node in logic.map_nodes(job)}
    assert len(folders) == 1
    folder = folders.pop()
    assert sh.GetItemName(folder) == "XAI · intensity_classifier"
    assert sh.GetItemParent(folder) == study


def test_rerunning_replaces_the_modules_own_nodes_in_place_and_leaves_user_nodes_alone(scene, logic, models, lesion_case):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    users = slicer.vtkMRMLScalarVolumeNode()
    users.SetName("CT_1 · Grad-CAM · tumour")  # a user's node that happens to have the same name
    scene.AddNode(users)
    first = logic.wait(logic.explain(classifier_request(anatomy, models["classifier"], methods=["gradcam"])))
    node_id = first.maps["gradcam"]
    # a different layer parameter: a new map for the same (volume, method spec, target) replaces the node's content
    request = classifier_request(anatomy, models["classifier"], methods=["gradcam"])
    request.layer = "net.layer_0.conv"
    second = logic.wait(logic.explain(request))
    assert second.maps["gradcam"] == node_id
    node = scene.GetNodeByID(node_id)
    assert nodes.attribute(node, "parameters", parse=True)["layer"] == "net.layer_0.conv"
    assert len(nodes.owned_nodes(scene, nodes.MAP)) == 1
    assert scene.GetNodeByID(users.GetID()) is users and users.GetAttribute("XAIOverlay.role") is None


def test_cache_hits_return_the_same_nodes_without_asking_the_worker(scene, logic, models, lesion_case):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    first = logic.wait(logic.explain(classifier_request(anatomy, models["classifier"])))
    again = logic.wait(logic.explain(classifier_request(anatomy, models["classifier"])))
    assert again.state == "done" and again.request_id is None  # answered from the cache
    assert again.maps == first.maps
    # after the nodes are gone (case released), the cache still answers, with new nodes from disk
    nodes.remove_nodes(scene, logic.map_nodes(first))
    third = logic.wait(logic.explain(classifier_request(anatomy, models["classifier"])))
    assert third.state == "done" and third.request_id is None
    np.testing.assert_allclose(nodes.ijk_to_ras(logic.map_nodes(third)[0]), nodes.ijk_to_ras(anatomy), atol=1e-9)


def test_inputs_reach_the_worker_as_nrrd_with_geometry_and_the_volume_is_not_modified(scene, logic, models, lesion_case, tmp_path):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    written = nodes.write_volume_file(anatomy, tmp_path / "x.nrrd")
    before = anatomy.GetMTime(), anatomy.GetStorageNodeID(), anatomy.GetImageData().GetMTime()
    logic.wait(logic.explain(classifier_request(anatomy, models["classifier"], methods=["gradcam"])))
    assert (anatomy.GetMTime(), anatomy.GetStorageNodeID(), anatomy.GetImageData().GetMTime()) == before
    assert read_volume(written).geometry.same_grid(read_volume(path).geometry, tol=1e-9)


def test_cancel_leaves_the_scene_unchanged(scene, models, lesion_case, tmp_path):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    logic = OverlayLogic(scene, client=WorkerClient(worker_command()), cache_root=tmp_path / "cache")
    try:
        logic.describe(str(models["classifier"]))
        before = scene_node_ids(scene)
        job = logic.explain(classifier_request(anatomy, models["classifier"], methods=["gradcam"] * 300))
        while job.progress[0] == 0:
            logic.process_events(0.1)
        assert re.fullmatch(r"Grad-CAM \(\d+/300\) · 1/1 passes", job.status), job.status  # what the progress bar shows
        logic.cancel(job)
        logic.wait(job, timeout=30)
        assert job.state == "cancelled"
        assert scene_node_ids(scene) == before
        assert not list((tmp_path / "cache").rglob("*.nrrd"))
        assert not job.workdir.exists()
    finally:
        logic.shutdown()


def test_a_dead_worker_fails_the_job_with_its_reason_and_the_next_explain_works(scene, models, lesion_case, tmp_path):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    logic = OverlayLogic(scene, client=WorkerClient(worker_command()), cache_root=tmp_path / "cache")
    try:
        logic.describe(str(models["classifier"]))
        before = scene_node_ids(scene)
        job = logic.explain(classifier_request(anatomy, models["classifier"], methods=["gradcam"] * 300))
        while job.progress[0] == 0:
            logic.process_events(0.1)
        logic.client.kill()
        logic.wait(job, timeout=30)
        assert job.state == "failed"
        assert "worker stopped" in job.error and "fresh worker" in job.error
        assert scene_node_ids(scene) == before
        retry = logic.wait(logic.explain(classifier_request(anatomy, models["classifier"], methods=["gradcam"])))
        assert retry.state == "done" and logic.client.starts == 2
    finally:
        logic.shutdown()


def test_a_bad_target_is_reported_in_one_line_and_nothing_is_made(scene, logic, models, lesion_case):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    before = scene_node_ids(scene)
    job = logic.wait(logic.explain(classifier_request(anatomy, models["classifier"], key="lesion")))
    assert job.state == "failed"
    assert "unknown class 'lesion'" in job.error and "\n" not in job.error
    assert scene_node_ids(scene) == before


def test_segmentation_model_maps_and_the_models_segmentation_share_the_input_grid(scene, logic, models, tmp_path):
    from xaioverlay.models import load_model

    volume = head_with_lesion()
    path = write_volume(volume, tmp_path / "MR_2.nrrd")
    anatomy = load_volume(scene, path, "MR_2")
    request = ExplainRequest([anatomy], str(models["segmenter"]), ["gradcam"],
                             TargetChoice(key="tumour", region="point", point=_point(scene, volume), radius_mm=6.0))
    job = logic.wait(logic.explain(request))
    assert job.state == "done", job.error
    node = logic.map_nodes(job)[0]
    assert node.GetName() == "MR_2 · Grad-CAM · tumour @ point"
    np.testing.assert_allclose(nodes.ijk_to_ras(node), nodes.ijk_to_ras(anatomy), atol=1e-9)
    segmentation = scene.GetNodeByID(job.segmentation_id)
    assert segmentation.IsA("vtkMRMLSegmentationNode")
    # its label map equals the model's own decision, computed here with the engine
    model = load_model(models["segmenter"], device="cpu")
    logits = model.infer(model.preprocess([volume]).tensor)
    expected = logits[0].argmax(0).numpy() == 1
    exported = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(exported)
    slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(segmentation, exported, 0)
    resampled = _on_grid(scene, exported, anatomy)
    assert np.array_equal(resampled > 0, expected)


def _point(scene, volume):
    from slicer_support import lesion_centre

    point = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(point)
    point.AddControlPoint(*[float(v) for v in lesion_centre(volume.geometry)])
    return point


def _on_grid(scene, labelmap, reference) -> np.ndarray:
    """A label map's voxels on the reference's grid (its extent may be cropped to the segment)."""
    from xaioverlay.volumes import resample_array

    return resample_array(np.asarray(nodes.voxels(labelmap)), nodes.ijk_to_ras(labelmap),
                          reference.GetImageData().GetDimensions(), nodes.ijk_to_ras(reference), interpolation="nearest")
