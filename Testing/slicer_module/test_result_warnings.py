"""Warnings in a worker's result reach the module's job (the widget shows them in a warning box)."""

from __future__ import annotations

from slicer_support import classifier_request, load_volume
from support import kinks_volume, save_square_root_kinks
from xaioverlay.volumes import Geometry, write_volume


def test_non_finite_map_values_reach_the_job_as_a_warning_naming_method_and_count(scene, logic, tmp_path):
    model = save_square_root_kinks(tmp_path / "model")
    volume, expected = kinks_volume(Geometry((12, 10, 8), (1.0, 1.0, 2.0), (5.0, -3.0, 1.0)))
    anatomy = load_volume(scene, write_volume(volume, tmp_path / "kinks.nrrd"), "kinks")
    job = logic.wait(logic.explain(classifier_request(anatomy, model, methods=["gxi"], key="high")))
    assert job.state == "done", job.error
    (warning,) = job.warnings
    bad = sum(expected.values())
    assert warning.startswith(f"Gradient × input: {bad} of {volume.array.size} map values were not finite")
    assert f"NaN {expected['nan']}, +inf {expected['posinf']}, -inf {expected['neginf']}" in warning
