"""What XAIOverlayTest (the module's self-test, which runs only inside Slicer) does, run here against
slicer-core: held-out demo phantoms through the logic with the demo classifier bundle — explain,
compare, next case from the background run."""

from __future__ import annotations

import numpy as np

from xaioverlay.demo import CLASSIFIER, DEMO_SEED, bundle_path
from xaioverlay.phantoms import make_phantom
from xaioverlay.volumes import write_volume
from XAIOverlayLib import cases, compare, nodes
from XAIOverlayLib.logic import ExplainRequest
from XAIOverlayLib.target_spec import TargetChoice


def test_demo_phantoms_explain_compare_and_next_case(scene, logic, tmp_path):
    phantoms = [make_phantom(DEMO_SEED + index) for index in range(2)]
    for index, phantom in enumerate(phantoms):
        write_volume(phantom.image, tmp_path / f"phantom_{index}.nrrd")
    logic.prefetch_next = True
    logic.set_cases(cases.cases_from_folder(tmp_path))
    methods = ["gradcam", "hirescam", "gradcampp"]
    template = ExplainRequest([], str(bundle_path(CLASSIFIER)), methods, TargetChoice(key="tumour"))
    volume, job = logic.open_case(0, template)
    logic.wait(job)
    assert job.state == "done", job.error
    maps = logic.map_nodes(job)
    assert [m.GetName() for m in maps] == ["phantom_0 · Grad-CAM · tumour", "phantom_0 · HiResCAM · tumour", "phantom_0 · Grad-CAM++ · tumour"]
    for node in maps:
        np.testing.assert_allclose(nodes.ijk_to_ras(node), phantoms[0].image.geometry.ijk_to_ras(), atol=1e-6)
        assert nodes.attribute(node, "target", parse=True)["name"] == "tumour"
    table = logic.show_compare(job)
    assert table.GetTable().GetNumberOfRows() == 3
    assert [compare.composite_node(scene, tag).GetForegroundVolumeID() for tag in logic.compare_tags] == [m.GetID() for m in maps]
    background = [j for j in logic.jobs.values() if j.background]
    assert len(background) == 1
    logic.wait(background[0])
    volume, job = logic.open_case(+1)
    logic.wait(job)
    assert job.state == "done" and job.request_id is None  # the next case came from the background run
    assert [m.GetName() for m in logic.map_nodes(job)][0] == "phantom_1 · Grad-CAM · tumour"
