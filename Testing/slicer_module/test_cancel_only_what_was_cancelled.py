"""Cancel stops the request it names and nothing else: a request still waiting is answered at once
while the running one goes on; a worker stuck in one long step is restarted and the requests still
wanted are sent again to the new one; a long step that reports nothing (the model's own sliding-window
inference) still stops at its next window."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from slicer_support import SMALL_UNET, head_with_lesion, save_spec_model
from xaioverlay.volumes import Geometry, write_volume
from XAIOverlayLib.worker_client import WorkerClient

SLOW_WORKER = Path(__file__).with_name("slow_worker.py")


def events_until(client: WorkerClient, done, timeout: float = 120.0) -> list[dict]:
    """Poll until ``done(events so far)``."""
    events, deadline = [], time.monotonic() + timeout
    while not done(events):
        assert time.monotonic() < deadline, f"gave up waiting: {events[-5:]}"
        events += client.poll(0.1)
    return events


def final(events: list[dict], request_id: str) -> dict | None:
    ends = ("result", "error", "cancelled", "died")
    return next((e for e in events if e.get("id") == request_id and e["event"] in ends), None)


@pytest.fixture
def inputs(tmp_path):
    return str(write_volume(head_with_lesion(), tmp_path / "CT_1.nrrd"))


def explain_request(model, inputs, out, methods=("gradcam",), **extra) -> dict:
    return {"command": "explain", "model": str(model), "inputs": [inputs], "methods": list(methods),
            "target": "class:tumour", "out": str(out), **extra}


def test_cancelling_a_waiting_request_leaves_the_running_one_alone(worker, models, inputs, tmp_path):
    client, grace = worker, worker.cancel_grace_s
    client.cancel_grace_s = 1.0
    try:
        # seconds of work, well over the grace period; the second request waits behind it
        running = client.send(explain_request(models["classifier"], inputs, tmp_path / "running", ["gradcam"] * 150))
        starts = client.starts
        waiting = client.send(explain_request(models["classifier"], inputs, tmp_path / "waiting"))
        events_until(client, lambda events: any(e["event"] == "progress" and e.get("id") == running for e in events))
        cancelled_at = time.monotonic()
        client.cancel(waiting)
        events = events_until(client, lambda events: final(events, waiting) is not None)
        assert final(events, waiting)["event"] == "cancelled" and time.monotonic() - cancelled_at < 0.8
        events += events_until(client, lambda more: final(events + more, running) is not None)
        assert final(events, running)["event"] == "result", final(events, running)
        assert client.starts == starts  # never restarted
        assert not (tmp_path / "waiting").exists()
    finally:
        client.cancel_grace_s = grace


def test_a_worker_stuck_in_one_step_is_restarted_and_the_request_still_wanted_completes(models, inputs, tmp_path):
    client = WorkerClient([sys.executable, "-u", str(SLOW_WORKER)], cancel_grace_s=1.0)
    try:
        # the background run for the next case hangs in one step; the user's own request waits behind it
        background = client.send(explain_request(models["classifier"], inputs, tmp_path / "background", stuck=True))
        users = client.send(explain_request(models["classifier"], inputs, tmp_path / "users", ["gradcam", "hirescam"]))
        time.sleep(0.5)
        client.cancel(background)
        events = events_until(client, lambda events: final(events, users) is not None)
        assert final(events, background)["event"] == "cancelled"
        assert final(events, users)["event"] == "result", final(events, users)
        assert [m["method"] for m in final(events, users)["explanation"]["methods"]] == ["gradcam", "hirescam"]
        assert any(e.get("id") == users and e.get("stage") == "restart" for e in events)  # told why it started again
        assert client.starts == 2  # a fresh worker, which loaded the model again
        assert not (tmp_path / "background" / "explanation.json").exists()
    finally:
        client.shutdown()


def test_the_models_own_sliding_window_inference_stops_at_its_next_window(worker, tmp_path):
    # 64³ in 16³ windows at overlap 0.75: 2,197 windows of inference (seconds here) before any progress report
    model = save_spec_model(tmp_path / "windowed", SMALL_UNET, task="segmentation",
                            class_names=["background", "tumour"], name="windowed",
                            sliding_window={"roi_size": [16, 16, 16], "overlap": 0.75})
    volume = head_with_lesion(Geometry((64, 64, 64), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    path = str(write_volume(volume, tmp_path / "CT_1.nrrd"))
    client, grace = worker, worker.cancel_grace_s
    client.cancel_grace_s = 30.0  # a kill would come too late: only the check at the next window can pass
    try:
        request = client.send({"command": "explain", "model": str(model), "inputs": [path], "methods": ["gradcam"],
                               "target": "channel:tumour", "out": str(tmp_path / "out")})
        starts = client.starts
        events_until(client, lambda events: any(e.get("stage") == "preprocess" for e in events))
        time.sleep(0.5)  # inside the whole-volume inference now
        cancelled_at = time.monotonic()
        client.cancel(request)
        events = events_until(client, lambda events: final(events, request) is not None)
        assert final(events, request)["event"] == "cancelled"
        assert time.monotonic() - cancelled_at < 3.0  # not at the end of the inference
        assert client.starts == starts and client.running
    finally:
        client.cancel_grace_s = grace
