"""``xaioverlay cohort`` as users run it: a LocalCluster started by the command, JSON progress, Ctrl-C and --resume."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from support import SMALL_DENSENET, default_ctrl_c, save_spec_model
from test_cohort_manifest import BAD_MANIFESTS
from test_cohort_run import SMALL_GRID
from xaioverlay.phantoms import make_phantom
from xaioverlay.volumes import write_volume


def command(*args) -> list[str]:
    return [sys.executable, "-m", "xaioverlay", "cohort", *args]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def volumes_folder(tmp_path, seeds) -> tuple:
    model = save_spec_model(tmp_path / "model", SMALL_DENSENET, task="classification", class_names=["no", "yes"])
    (tmp_path / "volumes").mkdir()
    for seed in seeds:
        write_volume(make_phantom(seed, geometry=SMALL_GRID).image, tmp_path / "volumes" / f"case{seed}.nii.gz")
    return model, tmp_path / "volumes"


def run_cli(*args, cwd):
    return subprocess.run(command(*args), capture_output=True, text=True, cwd=cwd, env=environment(), timeout=300)


def test_cli_bad_manifest_exit_1_one_line(tmp_path):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(BAD_MANIFESTS["duplicate_case_id"][0])
    done = run_cli("--model", str(tmp_path), "--cases", str(manifest), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"xaioverlay: error: manifest {manifest}: case id 'a' on lines 2 and 4; case ids must be unique"]


def test_cli_runs_a_folder_of_volumes_on_a_local_cluster_with_json_progress(tmp_path):
    model, volumes = volumes_folder(tmp_path, (1, 2))
    done = run_cli("--model", str(model), "--cases", str(volumes), "--out", str(tmp_path / "out"),
                   "--methods", "gxi", "--device", "cpu", "--workers", "1", "--progress", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert events[0]["event"] == "message"
    if importlib.util.find_spec("bokeh") is None:  # the dashboard needs bokeh: said, not failed
        assert events[0]["message"] == "Dask dashboard: unavailable (install bokeh>=3.1 for one)"
    else:
        assert events[0]["message"].startswith("Dask dashboard: http://")
    progress = [e for e in events if e["event"] == "cohort"]
    assert [(e["done"], e["failed"], e["remaining"], e["total"]) for e in progress] == [(1, 0, 1, 2), (2, 0, 0, 2)]
    assert all(e["cases_per_minute"] > 0 for e in progress)
    assert progress[0]["eta_s"] > 0 and progress[1]["eta_s"] == 0
    assert events[-1]["event"] == "result" and events[-1]["done"] == 2
    report = tmp_path / "out" / "report.html"
    assert events[-1]["files"]["report"] == str(report) and "id='section-cases'" in report.read_text()
    rows = (tmp_path / "out" / "cohort.csv").read_text().splitlines()
    assert [row.split(",")[:3] for row in rows[1:]] == [["case1", "gxi", "done"], ["case2", "gxi", "done"]]
    assert (tmp_path / "out" / "cases" / "case2" / "gxi.nrrd").exists()
    strategies = json.loads((tmp_path / "out" / "strategies.json").read_text())  # run after the cases
    assert events[-1]["files"]["strategies"] == str(tmp_path / "out" / "strategies.json")
    assert (strategies["method"], strategies["clusters"][0]["members"]) == ("gxi", ["case1", "case2"])


def test_cli_bar_prints_the_dashboard_then_a_line_per_case_with_rate_and_eta(tmp_path):
    model, volumes = volumes_folder(tmp_path, (3, 4))
    done = run_cli("--model", str(model), "--cases", str(volumes), "--out", str(tmp_path / "out"), "--methods", "gxi",
                   "--device", "cpu", "--workers", "1", "--similar", "0", cwd=tmp_path)  # stderr is a pipe, not a tty
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert lines[0].startswith("Dask dashboard: ")
    bars = [line for line in lines if " cases · " in line]
    assert len(bars) == 2, lines
    assert re.fullmatch(r"1/2 cases · 1 done · 0 failed · 1 remaining · [0-9.]+ cases/min · ETA [0-9.]+ (s|min)"
                        r" · case[34] done", bars[0])
    assert bars[1].startswith("2/2 cases · 2 done · 0 failed · 0 remaining · ")
    assert done.stdout.splitlines()[0] == "2 of 2 cases done (0 from an earlier run), 0 failed"
    assert str(tmp_path / "out" / "report.html") in done.stdout


def test_cohort_report_rebuilds_the_page_and_refuses_a_folder_without_a_cohort(tmp_path):
    model, volumes = volumes_folder(tmp_path, (5,))
    out = tmp_path / "out"
    assert run_cli("--model", str(model), "--cases", str(volumes), "--out", str(out), "--methods", "gxi",
                   "--device", "cpu", "--workers", "1", "--progress", "none", cwd=tmp_path).returncode == 0
    (out / "report.html").unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "xaioverlay", "cohort-report", str(out)], capture_output=True,
                             text=True, env=environment(), timeout=120)
    assert rebuilt.returncode == 0 and rebuilt.stdout.strip() == str(out / "report.html")
    assert "<td>case5</td>" in (out / "report.html").read_text()
    refused = subprocess.run([sys.executable, "-m", "xaioverlay", "cohort-report", str(tmp_path)],
                             capture_output=True, text=True, env=environment(), timeout=120)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        f"xaioverlay: error: {tmp_path} holds no cohort.csv; give the --out folder of an 'xaioverlay cohort' run"]


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="SIGINT to a child process is POSIX-only")
def test_ctrl_c_keeps_finished_cases_and_resume_completes_them(tmp_path):
    model, volumes = volumes_folder(tmp_path, range(1, 7))
    args = ["--model", str(model), "--cases", str(volumes), "--out", str(tmp_path / "out"), "--methods", "gxi",
            "--device", "cpu", "--workers", "1", "--progress", "json", "--similar", "0"]  # rows then stay as kept
    process = subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path, env=environment(), preexec_fn=default_ctrl_c)
    for line in process.stdout:
        if '"event": "cohort"' in line:
            process.send_signal(signal.SIGINT)  # what Ctrl-C sends
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    last = stderr.strip().splitlines()[-1]
    assert last == "xaioverlay: interrupted; finished cases are kept: rerun with --resume to continue"
    kept = (tmp_path / "out" / "cohort.csv").read_text().splitlines()[1:]
    assert 1 <= len(kept) < 6

    resumed = run_cli(*args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads(resumed.stdout.splitlines()[-1])
    assert (result["done"], result["skipped"]) == (6, len(kept))
    rows = (tmp_path / "out" / "cohort.csv").read_text().splitlines()[1:]
    assert rows[: len(kept)] == kept and [row.split(",")[0] for row in rows] == [f"case{n}" for n in range(1, 7)]
