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
    chosen = found.cases[similar_cases.similar_to(found, current_case)[0].case_id]

    other, tags = similar_cases.show_similar(scene, layout_node, found, current, current_case, chosen.case_id,
                                             ("lrp", "gxi"), orientation="Coronal")

    assert layout_node.GetViewArrangement() == compare.LAYOUT_ID
    assert nodes.attribute(other, "casePath") == str(chosen.image) and nodes.attribute(other, "role") == nodes.CASE
    assert nodes.voxels(other).shape == (32, 32, 32)
    labels = ("case_00 (current)", f"{chosen.case_id} (similar)")
    for tag, background, label in zip(tags, (current, other), labels):
        composite = compare.composite_node(scene, tag)
        assert composite.GetBackgroundVolumeID() == background.GetID()
        heat = scene.GetNodeByID(composite.GetForegroundVolumeID())
        assert nodes.attribute(heat, "role") == nodes.MAP and nodes.attribute(heat, "source") == background.GetID()
        assert nodes.attribute(heat, "spec") == "gxi", "lrp is not in the cohort: the next wanted method"
        assert heat.GetDisplayNode().GetColorNodeID(), "the map is coloured as the module colours maps"
        assert composite.GetLinkedControl() == 1
        view = compare.slice_node(scene, tag)
        assert view.GetLayoutLabel() == label and view.GetOrientation() == "Coronal"
    assert similar_cases.load_cohort_case(scene, chosen, "lrp")[1] is None, "no such map in the cohort: none shown"
    with pytest.raises(ValueError, match="case nobody is not in the cohort folder"):
        similar_cases.show_similar(scene, layout_node, found, current, current_case, "nobody")


def test_folders_that_are_not_cohorts_are_refused_with_the_fix(cohort, tmp_path):
    with pytest.raises(ValueError, match="not a cohort folder .*choose the --out folder"):
        similar_cases.read_cohort(tmp_path)
    shutil.copytree(cohort / "out", tmp_path / "no_similar")
    (tmp_path / "no_similar" / "similar_cases.csv").unlink()
    with pytest.raises(ValueError, match="run the cohort with --similar K"):
        similar_cases.read_cohort(tmp_path / "no_similar")


def test_module_wires_the_similar_cases_list_to_this_logic():
    """Static (the Qt GUI cannot run here): the buttons call the widget's handlers, the handlers the module
    logic, and every XAIOverlayLib.similar_cases name the module file uses exists."""
    import ast
    from pathlib import Path

    source = (Path(similar_cases.__file__).resolve().parents[1] / "XAIOverlay.py").read_text(encoding="utf-8")
    for wiring in ('self.ui.findSimilarButton.connect("clicked(bool)", self.onFindSimilar)',
                   'self.ui.showSimilarButton.connect("clicked(bool)", self.onShowSimilar)',
                   'self.ui.similarListWidget.connect("itemDoubleClicked(QListWidgetItem*)"',
                   "self.logic.similarCases(self._parameterNode)", "self.logic.showSimilar(self._parameterNode"):
        assert wiring in source
    used = {node.attr for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "similar_cases"}
    assert used >= {"read_cohort", "match_case", "similar_to", "show_similar"}
    assert all(callable(getattr(similar_cases, name, None)) for name in used), used
