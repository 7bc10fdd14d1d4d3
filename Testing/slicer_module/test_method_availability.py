"""A method the model cannot run (e.g. attention on a network without attention) fails the job with the
engine's one-line reason, and the worker's catalogue carries that reason for the module's method list."""

from __future__ import annotations

from slicer_support import head_with_lesion, load_volume
from XAIOverlayLib.logic import ExplainRequest
from XAIOverlayLib.target_spec import TargetChoice
from xaioverlay.volumes import write_volume


def test_unavailable_method_fails_the_job_with_the_reason(scene, logic, models, tmp_path):
    anatomy = load_volume(scene, write_volume(head_with_lesion(), tmp_path / "MR.nrrd"), "MR")
    request = ExplainRequest([anatomy], str(models["segmenter"]), ["attention"], TargetChoice(key="tumour"))
    job = logic.wait(logic.explain(request))
    assert job.state == "failed"
    assert "attention: UNet has no attention gates or self-attention blocks; use gradcam/lrp/occlusion" in job.error
