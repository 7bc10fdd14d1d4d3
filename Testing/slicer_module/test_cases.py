"""Clicking through patient volumes: case lists from a folder (NIfTI, NRRD, DICOM series) or the scene,
Next/Previous releasing the previous case unless pinned, cached maps at once, the next case prepared
in the background."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_support import classifier_request, describe_now, head_with_lesion, load_volume
from xaioverlay.volumes import Geometry, Volume, read_volume, write_volume
from XAIOverlayLib import cases, nodes


def write_dicom_series(volume: Volume, folder) -> None:
    """One CT-like DICOM file per axial slice (axis-aligned LPS grid), as a scanner would write them."""
    folder.mkdir(parents=True)
    image = sitk.Cast(volume.to_sitk(), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.42"
    direction = image.GetDirection()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (("0008|0060", "CT"), ("0020|000e", series), ("0020|000d", series + ".0"),
                           ("0020|0032", "\\".join(f"{p:.6f}" for p in position)),
                           ("0020|0037", "\\".join(f"{d:.6f}" for d in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))),
                           ("0020|0013", str(k + 1)), ("0028|0030", f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}"),
                           ("0018|0050", f"{image.GetSpacing()[2]:.6f}"), ("0008|0018", f"{series}.{k + 1}")):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(plane)


@pytest.fixture
def case_folder(tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    write_volume(head_with_lesion(seed=1, name="a"), folder / "a_case.nrrd")
    write_volume(head_with_lesion(seed=2, name="b"), folder / "b_case.nii.gz")
    axis_aligned = Geometry((32, 32, 32), (1.4, 1.4, 1.5), (20.0, 25.0, -10.0))
    dicom = head_with_lesion(axis_aligned, seed=3, name="c")
    write_dicom_series(Volume(np.round(dicom.array), axis_aligned), folder / "c_series")
    (folder / "notes.txt").write_text("not a volume")
    return folder


def test_folder_case_list_finds_volume_files_and_dicom_series_in_name_order(case_folder):
    found = cases.cases_from_folder(case_folder)
    assert [(c.name, c.dicom) for c in found] == [("a_case", False), ("b_case", False), ("c_series", True)]
    empty = case_folder.parent / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no volume"):
        cases.cases_from_folder(empty)


def test_loaded_cases_keep_their_files_geometry_dicom_included(scene, case_folder):
    for case in cases.cases_from_folder(case_folder):
        node = cases.load_case(scene, case)
        expected = read_volume(case.path)
        np.testing.assert_allclose(nodes.ijk_to_ras(node), expected.geometry.ijk_to_ras(), atol=1e-4)
        assert np.array_equal(np.asarray(nodes.voxels(node)), expected.array)
        assert nodes.content_digest([node]) == nodes.combine_digests([case.file_digest()])  # known by its file


def test_scene_case_list_skips_the_modules_maps_and_label_maps(scene, logic, models, lesion_case):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    logic.wait(logic.explain(classifier_request(anatomy, models["classifier"], methods=["gradcam"])))
    other = load_volume(scene, path, "CT_2")
    assert [c.name for c in cases.cases_from_scene(scene)] == ["CT_1", "CT_2"]
    assert [c.node_id for c in cases.cases_from_scene(scene)] == [anatomy.GetID(), other.GetID()]


def test_next_and_previous_release_the_previous_case_unless_pinned(scene, logic, models, case_folder):
    logic.set_cases(cases.cases_from_folder(case_folder)[:2])
    first, job = logic.open_case(0, classifier_request(None, models["classifier"], methods=["gradcam"]))
    logic.wait(job)
    first_id = first.GetID()
    assert len(nodes.owned_nodes(scene, nodes.MAP, source=first_id)) == 1
    second, job = logic.open_case(+1)
    logic.wait(job)
    assert scene.GetNodeByID(first_id) is None  # the case list loaded it: released with its maps
    assert nodes.owned_nodes(scene, nodes.MAP, source=first_id) == []
    logic.pin(second)
    again, job = logic.open_case(-1)
    logic.wait(job)
    assert job.state == "done" and job.request_id is None  # revisit: straight from the cache
    assert scene.GetNodeByID(second.GetID()) is second  # pinned: kept, maps included
    assert len(nodes.owned_nodes(scene, nodes.MAP, source=second.GetID())) == 1
    with pytest.raises(ValueError, match="no more cases"):
        logic.open_case(-1)


def test_scene_cases_keep_the_users_volumes_when_released(scene, logic, models, lesion_case):
    _, path = lesion_case
    first = load_volume(scene, path, "CT_1")
    load_volume(scene, path, "CT_2")
    logic.set_cases(cases.cases_from_scene(scene))
    _, job = logic.open_case(0, classifier_request(None, models["classifier"], methods=["gradcam"]))
    logic.wait(job)
    logic.open_case(+1)
    assert scene.GetNodeByID(first.GetID()) is first
    assert nodes.owned_nodes(scene, nodes.MAP, source=first.GetID()) == []


def test_the_next_case_is_computed_in_the_background_and_shows_at_once(scene, logic, models, case_folder):
    logic.prefetch_next = True
    logic.set_cases(cases.cases_from_folder(case_folder)[:2])
    _, job = logic.open_case(0, classifier_request(None, models["classifier"], methods=["gradcam", "hirescam"]))
    logic.wait(job)
    background = [j for j in logic.jobs.values() if j.background]
    assert len(background) == 1 and background[0].case.name == "b_case"
    before = set(nodes.owned_nodes(scene, nodes.MAP))
    logic.wait(background[0])
    assert set(nodes.owned_nodes(scene, nodes.MAP)) == before  # background work makes no nodes
    started = time.perf_counter()
    second, job = logic.open_case(+1)
    logic.wait(job)
    assert job.state == "done" and job.request_id is None  # from the cache, no worker round trip
    assert time.perf_counter() - started < 2.0
    maps = logic.map_nodes(job)
    assert [nodes.attribute(m, "method") for m in maps] == ["gradcam", "hirescam"]
    np.testing.assert_allclose(nodes.ijk_to_ras(maps[0]), nodes.ijk_to_ras(second), atol=1e-9)


def test_opening_the_case_being_prepared_adopts_the_background_run(scene, logic, models, case_folder):
    logic.prefetch_next = True
    logic.set_cases(cases.cases_from_folder(case_folder)[:2])
    _, job = logic.open_case(0, classifier_request(None, models["classifier"], methods=["gradcam"] * 40))
    logic.wait(job)
    background = [j for j in logic.jobs.values() if j.background][0]
    second, job = logic.open_case(+1)  # while the background run is still going
    logic.wait(job)
    assert job.request_id == background.request_id and not job.background  # its run, not a second one
    assert background.id not in logic.jobs
    assert job.state == "done" and nodes.attribute(logic.map_nodes(job)[0], "source") == second.GetID()


def test_case_browser_stops_at_both_ends():
    browser = cases.CaseBrowser([cases.Case("a"), cases.Case("b")])
    assert browser.step(-1) is None and browser.current.name == "a"
    assert browser.step(+1).name == "b" and browser.step(+1) is None and browser.peek(+1) is None


def test_a_segment_region_target_is_not_prepared_ahead_for_the_next_case(scene, logic, models, case_folder):
    """The region comes from a node of the current case, so the next case cannot be computed in advance
    (the request's task is only known from the model, which the check must ask)."""
    from XAIOverlayLib.logic import ExplainRequest
    from XAIOverlayLib.target_spec import SEGMENT, TargetChoice

    following = cases.cases_from_folder(case_folder)[1]
    template = ExplainRequest([None], str(models["segmenter"]), ["gradcam"], TargetChoice(key="tumour", region=SEGMENT))
    describe_now(logic, models["segmenter"])  # known: the check does not stop at an unknown model
    assert logic.prefetch(following, template) is None
    assert not [job for job in logic.jobs.values() if job.background]
