"""Occlusion from the command line: maps and records written, progress in passes, Ctrl-C and cancel leave nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import blob_volume, default_ctrl_c, oblique_geometry, save_spec_model
from xaioverlay import cli
from xaioverlay.errors import Cancelled
from xaioverlay.explain import explain
from xaioverlay.models import load_model
from xaioverlay.outputs import write_outputs
from xaioverlay.progress import Progress
from xaioverlay.volumes import write_volume

ROOT = Path(__file__).resolve().parents[2]
TINY_RESNET = {"name": "ResNet", "args": {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [2, 4, 4, 8],
                                          "spatial_dims": 3, "n_input_channels": 1, "num_classes": 2}}


@pytest.fixture
def case(tmp_path):
    model = save_spec_model(tmp_path / "model", TINY_RESNET, task="classification", class_names=["no tumour", "tumour"])
    geometry = oblique_geometry(size=(24, 20, 16))
    centre = geometry.ijk_to_ras_points(np.array([[12.0, 10.0, 8.0]]))[0]
    volume = write_volume(blob_volume(geometry, centre, 5.0, noise=0.1), tmp_path / "case.nrrd")
    return model, volume, tmp_path / "out"


def test_cli_writes_the_map_and_reports_progress_in_passes(case, capsys):
    model, volume, out = case
    code = cli.main(["explain", "--model", str(model), "--input", str(volume), "--methods", "occlusion:8/4,occlusion-adaptive:20:4/2",
                     "--target", "class:tumour", "--out", str(out), "--progress", "json", "--no-montage"])
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    record = json.loads((out / "explanation.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["explanation.json", "occlusion-8-4.nrrd", "occlusion-adaptive-20-4-2.nrrd"]
    exact, adaptive = record["methods"]
    steps = [e for e in events if e["event"] == "progress" and e.get("method") == "occlusion:8/4"]
    assert steps and all(e["unit"] == "passes" for e in steps)
    assert steps[-1]["done"] == steps[-1]["total"] == exact["extras"]["occluded_passes"] == exact["parameters"]["occluders"]
    assert exact["passes"]["forward"] == exact["extras"]["occluded_passes"] + 2  # + the clean replay and its check
    assert adaptive["extras"]["occluders_evaluated"] <= 20
    assert [e["done"] for e in steps] == sorted(e["done"] for e in steps)


@pytest.mark.skipif(os.name == "nt", reason="SIGINT to a child process is POSIX-only")
def test_ctrl_c_stops_occlusion_and_leaves_no_output(case):
    model, volume, out = case
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "XAIOverlay"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "xaioverlay", "explain", "--model", str(model), "--input", str(volume),
         "--methods", "occlusion:2/1", "--out", str(out), "--progress", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=env,
        preexec_fn=default_ctrl_c,
    )
    try:
        for line in process.stdout:
            event = json.loads(line)
            if event["event"] == "progress" and 0 < event["done"] < event["total"]:
                break
        else:
            pytest.fail("no progress event before the run ended")
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    finally:
        process.kill()
    assert code == 130
    assert "interrupted" in process.stderr.read()
    assert list(out.iterdir()) == []


def test_cancel_from_the_progress_callback_stops_midway(case):
    model_path, volume_path, _ = case
    from xaioverlay.volumes import read_volume

    model = load_model(model_path, device="cpu")
    seen = []

    def callback(event):
        if event["event"] == "progress":
            seen.append((event["done"], event["total"]))
            if event["done"] >= 8:
                raise Cancelled("stopped by the user")

    with pytest.raises(Cancelled):
        explain(model, [read_volume(volume_path)], "occlusion:4/2", progress=Progress(callback))
    done, total = seen[-1]
    assert 8 <= done < total


def test_a_move_that_fails_half_way_takes_back_the_maps_already_moved(case):
    model_path, volume_path, out = case
    from xaioverlay.volumes import read_volume

    model = load_model(model_path, device="cpu")
    explanation = explain(model, [read_volume(volume_path)], "occlusion:12/12")
    (out / "montage.png").mkdir(parents=True)  # the montage cannot replace a folder that holds a file
    (out / "montage.png" / "keep").write_text("x")
    with pytest.raises(OSError):
        write_outputs(explanation, out)
    assert sorted(p.name for p in out.iterdir()) == ["montage.png"]
