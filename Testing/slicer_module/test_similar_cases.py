"""Similar cases from a real cohort folder (``run_cohort`` on a Dask LocalCluster) for the volume in a real MRML
scene: matched by file path or content, its nearest cases listed, a chosen one loaded beside it in linked views."""

from __future__ import annotations

import shutil

import pytest
import slicer

from slicer_support import head_with_lesion
from XAIOverlayLib import compare, nodes, similar_cases
from xaioverlay.volumes import write_volume

pytest.importorskip("distributed", reason="cohorts need dask[distributed] (the test extra installs it)")


@pytest.fixture(scope="module")
def cohort(models, tmp_path_factory):
    """Four heads and case_02's file again under another id, explained with gxi; every other case listed."""
    from xaioverlay.cohort import CaseSettings, run_cohort

    root = tmp_path_factory.mktemp("similar")
    lines = ["case_id,image,label"]
    for number in range(4):
        volume = head_with_lesion(seed=number, name=f"head{number}")
        write_volume(volume, root / f"head{number}.nrrd")
        lines.append(f"case_{number:02d},head{number}.nrrd,{1 - number % 2}")
    lines.append("copy_of_02,head2.nrrd,1")
    (root / "cases.csv").write_text("\n".join(lines) + "\n")
    settings = CaseSettings(model=str(models["classifier"]), methods="gxi", device="cpu", similar=4)
    result = run_cohort(root / "cases.csv", settings, root / "out", workers=1)
    assert result.done == 5
    return root


def loaded_like_slicer(scene, path, name):
    """A volume node read from ``path`` with its storage node kept, as Slicer's "Add data" leaves it."""
    node = nodes.add_volume_from_file(scene, path, name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def test_current_volume_is_matched_by_path_then_by_content(scene, cohort, tmp_path):
    found = similar_cases.read_cohort(cohort / "out")
    assert sorted(found.cases) == ["case_00", "case_01", "case_02", "case_03", "copy_of_02"]

    by_path = loaded_like_slicer(scene, cohort / "head1.nrrd", "head1")
    assert similar_cases.match_case(found, by_path).case_id == "case_01"

    shutil.copy(cohort / "head3.nrrd", tmp_path / "renamed.nrrd")  # the same bytes elsewhere
    by_content = loaded_like_slicer(scene, tmp_path / "renamed.nrrd", "renamed")
    assert similar_cases.match_case(found, by_content).case_id == "case_03"

    write_volume(head_with_lesion(seed=99), tmp_path / "stranger.nrrd")
    assert similar_cases.match_case(found, loaded_like_slicer(scene, tmp_path / "stranger.nrrd", "x")) is None
    made_here = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(made_here)
    assert similar_cases.match_case(found, made_here) is None, "no file: nothing to match"


def test_similar_cases_of_the_current_volume_nearest_first(scene, cohort):
    found = similar_cases.read_cohort(cohort / "out")
    current = similar_cases.match_case(found, loaded_like_slicer(scene, cohort / "head2.nrrd", "head2"))
    assert current.case_id == "case_02", "the first case whose image is that file"
    rows = similar_cases.similar_to(found, current)
    assert [row.rank for row in rows] == [1, 2, 3, 4]
    assert sorted(row.case_id for row in rows) == ["case_00", "case_01", "case_03", "copy_of_02"]
    values = [row.cosine_similarity for row in rows]
    assert values == sorted(values, reverse=True)
    twin = next(row for row in rows if row.case_id == "copy_of_02")
    assert twin.cosine_similarity == pytest.approx(1.0, abs=1e-6) == values[0]
    assert twin.label == "1" and twin.predicted in ("no tumour", "tumour")
    assert twin.text().startswith("copy_of_02 · 1.000 · label 1 · predicted ")


def test_chosen_case_is_loaded_beside_the_current_one_in_linked_views(scene, cohort):
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    layout_node = layout_logic.GetLayoutNode()
    found = similar_cases.read_cohort(cohort / "out")
    current = loaded_like_slicer(scene, cohort / "head0.nrrd", "head0")
    current_case = similar_cases.match_case(found, current)
    _, current_map = similar_cases.load_cohort_case(scene, current_case, "gxi")
    chosen = found.cases[similar_cases.similar_to(found, current_case)[0].case_id]

    other, other_map = similar_cases.load_cohort_case(scene, chosen, "gxi")
    tags = similar_cases.show_beside(scene, layout_node, current, current_map, other, other_map,
                                     ("head0", chosen.case_id))

    assert layout_node.GetViewArrangement() == compare.LAYOUT_ID
    assert nodes.attribute(other, "casePath") == str(chosen.image) and nodes.attribute(other, "role") == nodes.CASE
    assert nodes.voxels(other).shape == (32, 32, 32)
    assert nodes.attribute(other_map, "role") == nodes.MAP and nodes.attribute(other_map, "source") == other.GetID()
    assert other_map.GetDisplayNode().GetColorNodeID(), "the map is coloured as the module colours maps"
    for tag, background, foreground, label in zip(tags, (current, other), (current_map, other_map),
                                                  ("head0", chosen.case_id)):
        composite = compare.composite_node(scene, tag)
        assert composite.GetBackgroundVolumeID() == background.GetID()
        assert composite.GetForegroundVolumeID() == foreground.GetID()
        assert composite.GetLinkedControl() == 1
        assert compare.slice_node(scene, tag).GetLayoutLabel() == label
    assert similar_cases.load_cohort_case(scene, chosen, "lrp")[1] is None, "no such map in the cohort: none shown"


def test_folders_that_are_not_cohorts_are_refused_with_the_fix(cohort, tmp_path):
    with pytest.raises(ValueError, match="not a cohort folder .*choose the --out folder"):
        similar_cases.read_cohort(tmp_path)
    shutil.copytree(cohort / "out", tmp_path / "no_similar")
    (tmp_path / "no_similar" / "similar_cases.csv").unlink()
    with pytest.raises(ValueError, match="run the cohort with --similar K"):
        similar_cases.read_cohort(tmp_path / "no_similar")
