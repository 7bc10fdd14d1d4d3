"""The engine worker as a real child process: requests in, JSON-line events out, models kept loaded,
prompt cancel without partial outputs, a dead worker explained and replaced."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import sys
import time
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from slicer_support import head_with_lesion, worker_command
from xaioverlay.volumes import read_volume, write_volume
from XAIOverlayLib.worker_client import WorkerClient


def run_until(client: WorkerClient, request_id: str, final=("result", "error", "cancelled", "died", "described"), timeout=120.0):
    """All events up to and including ``request_id``'s final one."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in client.poll(0.2):
            events.append(event)
            if event.get("id") == request_id and event["event"] in final:
                return events
    raise AssertionError(f"no final event for {request_id} within {timeout} s: {events[-5:]}")


@pytest.fixture
def inputs(tmp_path):
    volume = head_with_lesion()
    return volume, write_volume(volume, tmp_path / "CT_1.nrrd")


def test_worker_returns_the_engines_maps_on_the_input_grid_and_keeps_the_model_loaded(worker, models, inputs, tmp_path):
    from xaioverlay.explain import explain
    from xaioverlay.models import load_model

    volume, path = inputs
    request = {"command": "explain", "model": str(models["classifier"]), "inputs": [str(path)],
               "methods": ["gradcam", "hirescam"], "target": "class:tumour", "out": str(tmp_path / "run1")}
    first = run_until(worker, worker.send(request))
    second = run_until(worker, worker.send({**request, "out": str(tmp_path / "run2")}))
    result = first[-1]
    assert result["event"] == "result", result
    assert [m["method"] for m in result["explanation"]["methods"]] == ["gradcam", "hirescam"]
    # the same maps as the engine computes in this process, on the input's exact grid
    reference = explain(load_model(models["classifier"], device="cpu"), [read_volume(path)], ["gradcam", "hirescam"], "class:tumour")
    for record, expected in zip(result["explanation"]["methods"], reference.results):
        written = read_volume(tmp_path / "run1" / record["file"])
        assert written.geometry.same_grid(volume.geometry, tol=1e-6)
        np.testing.assert_allclose(written.array, expected.volume.array, rtol=1e-5, atol=1e-9)
    # progress names the method and counts passes; the second request reuses the loaded model
    progress = [e for e in first if e["event"] == "progress"]
    assert {(e["method"], e["unit"]) for e in progress} == {("gradcam", "passes"), ("hirescam", "passes")}
    loaded = lambda events: [e for e in events if e.get("stage") == "model"]  # noqa: E731
    assert len(loaded(second)) == 0
    assert second[-1]["event"] == "result"


def test_cli_progress_json_prints_the_same_events_as_the_worker(worker, models, inputs, tmp_path):
    from xaioverlay.cli import main

    _, path = inputs
    stream = io.StringIO()
    with redirect_stdout(stream):
        code = main(["explain", "--model", str(models["classifier"]), "--input", str(path), "--methods", "gradcam",
                     "--target", "class:tumour", "--out", str(tmp_path / "cli"), "--progress", "json", "--device", "cpu"])
    assert code == 0
    cli = [json.loads(line) for line in stream.getvalue().splitlines()]
    events = run_until(worker, worker.send({"command": "explain", "model": str(models["classifier"]), "inputs": [str(path)],
                                            "methods": ["gradcam"], "target": "class:tumour", "out": str(tmp_path / "w")}))
    shape = lambda event: (event["event"], tuple(sorted(k for k in event if k not in ("id",))))  # noqa: E731
    cli_progress = [shape(e) for e in cli if e["event"] in ("progress", "message")]
    worker_progress = [shape(e) for e in events if e["event"] in ("progress", "message") and e.get("stage") != "inputs"]
    assert cli_progress == worker_progress


def test_cancel_stops_promptly_and_writes_nothing(models, inputs, tmp_path):
    _, path = inputs
    client = WorkerClient(worker_command())
    try:
        out = tmp_path / "cancelled"
        # 400 Grad-CAMs in one request: about 20 s of work here, one progress report per method
        request_id = client.send({"command": "explain", "model": str(models["classifier"]), "inputs": [str(path)],
                                  "methods": ["gradcam"] * 400, "target": "class:tumour", "out": str(out)})
        run_until(client, request_id, final=("progress",))
        cancelled_at = time.monotonic()
        client.cancel(request_id)
        events = run_until(client, request_id)
        assert events[-1]["event"] == "cancelled"
        assert time.monotonic() - cancelled_at < 3.0
        assert sum(e["event"] == "progress" for e in events) < 100  # stopped early, not at the end
        assert not any(out.glob("*.nrrd")) and not (out / "explanation.json").exists()
        assert client.running  # cancelling does not cost the loaded model
    finally:
        client.shutdown()


def test_killed_worker_is_reported_with_its_last_error_lines_and_the_next_request_starts_a_fresh_one(models, inputs, tmp_path):
    _, path = inputs
    env = {**os.environ, "XAIOVERLAY_WORKER_VERBOSE": "1"}
    from XAIOverlayLib.worker_client import worker_environment

    client = WorkerClient(worker_command(), env=worker_environment(env))
    try:
        request = {"command": "explain", "model": str(models["classifier"]), "inputs": [str(path)],
                   "methods": ["gradcam"] * 400, "target": "class:tumour", "out": str(tmp_path / "a")}
        request_id = client.send(request)
        run_until(client, request_id, final=("progress",))
        pid = client.process.pid
        os.kill(pid, signal.SIGKILL)
        events = run_until(client, request_id)
        died = events[-1]
        assert died["event"] == "died" and died["returncode"] == -signal.SIGKILL
        assert any("loaded" in line for line in died["stderr"]), died  # its last log lines, for the user
        assert "exit code" in died["message"] and "fresh worker" in died["message"]
        again = run_until(client, client.send({**request, "methods": ["gradcam"], "out": str(tmp_path / "b")}))
        assert again[-1]["event"] == "result"
        assert client.starts == 2 and client.process.pid != pid
    finally:
        client.shutdown()


def test_worker_that_cannot_start_is_explained_by_its_own_error_output(tmp_path):
    failing = [sys.executable, "-c", "import sys; sys.stderr.write('ModuleNotFoundError: No module named torch\\n'); sys.exit(3)"]
    client = WorkerClient(failing)
    events = run_until(client, client.send({"command": "describe", "model": "x"}), timeout=30)
    assert events[-1]["event"] == "died"
    assert events[-1]["returncode"] == 3
    assert "No module named torch" in events[-1]["message"]


def test_bad_requests_are_answered_and_the_worker_keeps_serving(worker, models):
    bad = run_until(worker, worker.send({"command": "explode"}))
    assert bad[-1]["event"] == "error" and "unknown command" in bad[-1]["message"]
    missing = run_until(worker, worker.send({"command": "explain", "model": str(models["classifier"])}))
    assert missing[-1]["event"] == "error" and "inputs" in missing[-1]["message"]
    described = run_until(worker, worker.send({"command": "describe", "model": str(models["classifier"])}))
    assert described[-1]["model"]["class_names"] == ["no tumour", "tumour"]
    assert {m["name"] for m in described[-1]["methods"]} >= {"gradcam", "hirescam"}


def test_an_unknown_metric_option_is_refused_in_one_line(worker, models, inputs, tmp_path):
    _, path = inputs
    events = run_until(worker, worker.send({"command": "explain", "model": str(models["classifier"]), "inputs": [str(path)],
                                            "methods": ["gradcam"], "out": str(tmp_path / "m"), "evaluate": True,
                                            "metric_options": {"stepfraction": 0.1}}))
    assert events[-1]["event"] == "error" and "unknown metric option(s) stepfraction" in events[-1]["message"]
    assert "\n" not in events[-1]["message"] and not (tmp_path / "m" / "explanation.json").exists()


def test_measuring_quality_returns_the_metrics_columns_with_each_methods_record(worker, models, inputs, tmp_path):
    _, path = inputs
    options = {"step_fraction": 0.1, "randomisation_depth": 1, "road": False}  # a quick measurement
    events = run_until(worker, worker.send({"command": "explain", "model": str(models["classifier"]), "inputs": [str(path)],
                                            "methods": ["gradcam", "gxi"], "out": str(tmp_path / "m"), "evaluate": True,
                                            "metric_options": options}))
    assert events[-1]["event"] == "result", events[-1]
    records = events[-1]["explanation"]["methods"]
    assert [r["method"] for r in records] == ["gradcam", "gxi"]
    for record in records:
        measured = record["metrics"]
        assert math.isfinite(measured["deletion AUC (blur)"]) and 0.0 <= measured["Gini sparseness"] <= 1.0
        assert measured["randomisation verdict"] in ("pass", "fail")
        assert "pointing game" not in measured  # a classifier without a reference mask has no localisation
