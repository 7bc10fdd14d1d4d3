"""The GUI thread never waits: with a worker that takes seconds to start, to read a model and to explain
(a slow stand-in: the real worker with deliberate sleeps), every logic call returns within 0.5 s, and
the model's description and the maps arrive through the callbacks that the module's timer drives
(:meth:`OverlayLogic.process_events`). Hashing and writing a large input happen off the calling thread."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from slicer_support import classifier_request, describe_now, load_volume
from xaioverlay.volumes import Geometry, Volume, write_volume
from XAIOverlayLib import colours, nodes
from XAIOverlayLib.logic import OverlayLogic
from XAIOverlayLib.worker_client import WorkerClient

SLOW_WORKER = Path(__file__).with_name("slow_worker.py")
# Far below the slow worker's 2 s delays (waiting for any of them fails), and above what a busy shared CPU
# adds to a call that does not wait (0.15 s was seen at a load average of 13 on 2 cores).
LIMIT_S = 0.5


def slow_worker_command(**delays: float) -> list[str]:
    return [sys.executable, "-u", str(SLOW_WORKER), *[f"--{name}={seconds}" for name, seconds in delays.items()]]


def within_limit(call, *args, **kwargs):
    """``call(*args, **kwargs)``, which must return within LIMIT_S."""
    started = time.perf_counter()
    result = call(*args, **kwargs)
    elapsed = time.perf_counter() - started
    assert elapsed < LIMIT_S, f"{call.__name__} kept the calling thread {elapsed:.2f} s"
    return result


def test_reading_the_model_and_explaining_never_wait_for_a_slow_worker(scene, models, lesion_case, tmp_path):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    logic = OverlayLogic(scene, client=WorkerClient(slow_worker_command(start=2, describe=2, explain=2)),
                         cache_root=tmp_path / "cache")
    logic.prefetch_next = False
    try:
        job = within_limit(logic.explain, classifier_request(anatomy, models["classifier"], methods=["gradcam", "gxi"]))
        described: list[dict] = []
        assert within_limit(logic.describe, str(models["classifier"]), then=described.append) is None  # asked already
        finished, deadline = [], time.monotonic() + 120
        while not job.finished:
            assert time.monotonic() < deadline, job.status
            finished += [changed for changed in within_limit(logic.process_events) if changed.finished]
            time.sleep(0.02)
        assert [info["class_names"] for info in described] == [["no tumour", "tumour"]]
        assert finished == [job] and job.state == "done", job.error
        maps = logic.map_nodes(job)
        assert [nodes.attribute(node, "method") for node in maps] == ["gradcam", "gxi"]
        # slider ticks: recorded at once, applied once by the next timer tick with the last value
        for percentile in (60.0, 70.0, 80.0, 99.0):
            within_limit(logic.set_percentile, percentile, coalesce=True)
        assert {nodes.attribute(node, "percentile") for node in maps} == {"95.0"}
        within_limit(logic.process_events)
        assert {nodes.attribute(node, "percentile") for node in maps} == {"99.0"}
        assert within_limit(logic.describe, str(models["classifier"]))["task"] == "classification"  # known now
    finally:
        logic.shutdown()


def test_a_large_input_is_hashed_and_written_off_the_calling_thread(scene, logic, models, tmp_path):
    describe_now(logic, models["classifier"])
    size = (192, 192, 192)  # 28 MB of float32: hashing it alone takes over 150 ms here, copying it about 10 ms
    voxels = np.random.default_rng(0).normal(0, 1, size).astype(np.float32)
    large = load_volume(scene, write_volume(Volume(voxels, Geometry(size, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))),
                                            tmp_path / "large.nrrd", compress=False), "large")
    job = within_limit(logic.explain, classifier_request(large, models["classifier"], methods=["gradcam"]))
    assert job.state == "preparing" and job.request_id is None
    within_limit(logic.cancel, job)  # still being prepared: it never reaches the worker
    assert job.state == "cancelled"
    for _ in range(30):
        logic.process_events(0.1)
    assert job.request_id is None and not job.workdir.exists()


def test_a_model_that_cannot_be_read_fails_the_waiting_job_through_the_callback(scene, logic, lesion_case, tmp_path):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    missing = tmp_path / "no_such_model.yaml"
    failures: list[str] = []
    logic.describe(str(missing), then=failures.append, failed=failures.append)
    job = logic.wait(logic.explain(classifier_request(anatomy, missing)), timeout=120)
    assert job.state == "failed" and failures == [job.error]
    assert "no_such_model" in job.error and "\n" not in job.error


def test_moving_the_threshold_back_reuses_the_maps_computed_quantile(scene, tmp_path):
    values = np.random.default_rng(1).gamma(2.0, 1.0, (20, 20, 20)).astype(np.float32)
    node = load_volume(scene, write_volume(Volume(values, Geometry((20, 20, 20), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))),
                                           tmp_path / "map.nrrd"), "map")
    known: dict = {}
    first = colours.map_levels(node, False, 90.0, known)
    assert first == (float(values.max()), colours.visible_threshold(values, False, 90.0))
    colours.map_levels(node, False, 60.0, known)
    assert colours.map_levels(node, False, 90.0, known) is first  # back to 90: nothing recomputed
    nodes.read_volume_file(write_volume(Volume(values * 2, Geometry((20, 20, 20), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))),
                                        tmp_path / "map2.nrrd"), node)
    assert colours.map_levels(node, False, 90.0, known)[0] == float(2 * values.max())  # new voxels: new levels
