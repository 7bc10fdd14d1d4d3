"""Cohorts on a real Dask LocalCluster (worker processes): no case lost or doubled when a worker dies,
an interrupted run resumed gives the same table, a case with bad data fails alone."""

from __future__ import annotations

import csv
import math
import os
import signal
import time

import pytest

from support import SMALL_DENSENET, save_spec_model
from xaioverlay.cohort import CaseSettings, run_cohort
from xaioverlay.cohort.case import CASE_RECORD, CHECKSUMS
from xaioverlay.metrics.evaluate import MetricOptions
from xaioverlay.phantoms import make_phantom
from xaioverlay.volumes import Geometry, write_volume

distributed = pytest.importorskip("distributed", reason="cohorts need dask[distributed] (the test extra installs it)")

#: A small phantom grid (the demo's 64×80×64 at 2.5 mm is 8× the voxels): cases take well under a second.
SMALL_GRID = Geometry((32, 40, 32), (5.0, 5.0, 5.0), (77.5, 97.5, -77.5), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
CASES = 12


def write_cases(folder, count: int = CASES) -> list[str]:
    """``count`` phantoms (every other one without tumour) with their tumour masks; returns manifest lines."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["case_id,image,label,reference_mask"]
    for number in range(count):
        phantom = make_phantom(500 + number, tumour=number % 2 == 0, geometry=SMALL_GRID)
        write_volume(phantom.image, folder / f"p{number}.nrrd")
        write_volume(phantom.tumour_mask, folder / f"p{number}_mask.nrrd")
        lines.append(f"case_{number:02d},p{number}.nrrd,{int(phantom.has_tumour)},p{number}_mask.nrrd")
    return lines


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    model = save_spec_model(root / "model", SMALL_DENSENET, task="classification", class_names=["no tumour", "tumour"])
    lines = write_cases(root / "volumes")
    manifest = root / "volumes" / "cases.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return {"model": model, "manifest": manifest, "root": root}


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes of one thread each, behind nannies that restart a worker that dies."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        with distributed.Client(local) as client:
            yield local, client


def settings(inputs, **changes) -> CaseSettings:
    return CaseSettings(model=str(inputs["model"]), methods="gxi,gradcam", device="cpu", torch_threads=1, **changes)


def table(out) -> list[dict]:
    with open(out / "cohort.csv", newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def wait_idle(client, seconds: float = 60.0) -> None:
    """Until no task runs on the cluster (a cancelled case may still be finishing)."""
    end = time.monotonic() + seconds
    while any(client.processing().values()) and time.monotonic() < end:
        time.sleep(0.2)


def test_worker_killed_mid_run_every_case_appears_once_done(inputs, cluster, tmp_path):
    local, client = cluster
    pids_before = set(client.run(os.getpid).values())
    killed = []

    def kill_a_busy_worker(event: dict) -> None:
        if event["event"] != "cohort" or killed:
            return
        busy = [address for address, keys in client.processing().items() if keys]
        address = busy[0]
        pid = client.run(os.getpid, workers=[address])[address]
        os.kill(pid, signal.SIGKILL)  # as the out-of-memory killer would
        killed.append((pid, client.processing()[address]))

    result = run_cohort(inputs["manifest"], settings(inputs), tmp_path / "out", scheduler=local.scheduler_address,
                        progress=kill_a_busy_worker)

    pid, keys_in_flight = killed[0]
    assert keys_in_flight, "the killed worker had a case in flight"
    assert pid in pids_before and pid not in set(client.run(os.getpid).values())
    assert (result.done, result.failed) == (CASES, 0)
    rows = table(tmp_path / "out")
    pairs = [(row["case_id"], row["method"]) for row in rows]
    assert sorted(pairs) == sorted((f"case_{n:02d}", m) for n in range(CASES) for m in ("gxi", "gradcam"))
    assert {row["status"] for row in rows} == {"done"}
    folders = sorted(p.name for p in (tmp_path / "out" / "cases").iterdir())
    assert folders == [f"case_{n:02d}" for n in range(CASES)], "no staging or replaced folder left behind"


def test_interrupted_run_resumed_gives_the_same_table(inputs, cluster, tmp_path):
    local, client = cluster
    address = local.scheduler_address
    reference = tmp_path / "reference"
    run_cohort(inputs["manifest"], settings(inputs), reference, scheduler=address)

    out = tmp_path / "interrupted"
    seen = []

    def interrupt_after_four(event: dict) -> None:
        if event["event"] == "cohort":
            seen.append(event["case_id"])
            if len(seen) == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cohort(inputs["manifest"], settings(inputs), out, scheduler=address, progress=interrupt_after_four)
    partial = table(out)
    assert 4 <= len({row["case_id"] for row in partial}) < CASES, "the interrupted run's table: the finished cases"
    wait_idle(client)
    first_records = {p.name: (p / CASE_RECORD).read_bytes()
                     for p in (out / "cases").iterdir() if (p / CHECKSUMS).exists()}

    resumed = run_cohort(inputs["manifest"], settings(inputs), out, scheduler=address, resume=True)
    assert resumed.skipped == len(first_records) and resumed.done == CASES
    for name, record in first_records.items():  # finished cases were not run again
        assert (out / "cases" / name / CASE_RECORD).read_bytes() == record

    def without_runtime(rows):
        return [{k: v for k, v in row.items() if k != "runtime_s"} for row in rows]

    assert without_runtime(table(out)) == without_runtime(table(reference))

    csv_bytes, parquet_bytes = (out / "cohort.csv").read_bytes(), (out / "cohort.parquet").read_bytes()
    again = run_cohort(inputs["manifest"], settings(inputs), out, scheduler=address, resume=True)
    assert again.skipped == CASES
    assert (out / "cohort.csv").read_bytes() == csv_bytes and (out / "cohort.parquet").read_bytes() == parquet_bytes


def test_resume_reruns_a_case_whose_files_no_longer_match_their_checksums(inputs, cluster, tmp_path):
    local, _ = cluster
    out = tmp_path / "out"
    run_cohort(inputs["manifest"], settings(inputs), out, scheduler=local.scheduler_address)
    damaged = out / "cases" / "case_03" / "gxi.nrrd"
    damaged.write_bytes(damaged.read_bytes()[:100])
    (out / "cases" / "case_05").rename(out / "cases" / ".staging-case_05-left-by-a-killed-run")

    result = run_cohort(inputs["manifest"], settings(inputs), out, scheduler=local.scheduler_address, resume=True)

    assert (result.skipped, result.done) == (CASES - 2, CASES)
    assert len(damaged.read_bytes()) > 100
    assert not list((out / "cases").glob(".staging-*"))
    assert [row["case_id"] for row in table(out)].count("case_05") == 2


def test_case_with_missing_or_truncated_file_fails_alone(inputs, cluster, tmp_path):
    local, _ = cluster
    volumes = inputs["root"] / "volumes"
    truncated = tmp_path / "cut.nrrd"
    write_volume(make_phantom(7, geometry=SMALL_GRID).image, truncated)  # gzip-compressed NRRD
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    manifest = tmp_path / "cases.csv"
    manifest.write_text(
        "case_id,image,label\n"
        f"good_a,{volumes / 'p0.nrrd'},1\n"
        f"missing,{tmp_path / 'nowhere.nrrd'},0\n"
        f"truncated,{truncated},1\n"
        f"good_b,{volumes / 'p1.nrrd'},0\n"
    )
    result = run_cohort(manifest, settings(inputs), tmp_path / "out", scheduler=local.scheduler_address)

    assert (result.done, result.failed) == (2, 2)
    rows = {(row["case_id"], row["method"]): row for row in table(tmp_path / "out")}
    assert len(rows) == 8
    for case, culprit in (("missing", "nowhere.nrrd"), ("truncated", "cut.nrrd")):
        for method in ("gxi", "gradcam"):
            row = rows[(case, method)]
            assert row["status"] == "failed" and culprit in row["error"] and "\n" not in row["error"]
            assert row["runtime_s"] == "" and row["predicted"] == ""
    for case in ("good_a", "good_b"):
        assert rows[(case, "gxi")]["status"] == "done" and rows[(case, "gxi")]["predicted"] in ("no tumour", "tumour")
    assert rows[("good_a", "gxi")]["label"] == "1"
    assert not (tmp_path / "out" / "cases" / "missing" / "gxi.nrrd").exists()


def test_metrics_are_measured_per_case_into_the_table(inputs, cluster, tmp_path):
    local, _ = cluster
    manifest = tmp_path / "two.csv"
    manifest.write_text("\n".join(inputs["manifest"].read_text().splitlines()[:3]).replace(
        ",p", f",{inputs['root'] / 'volumes'}/p") + "\n")
    options = MetricOptions(road=False, randomisation_depth=0, random_logit=False, step_fraction=0.1)
    result = run_cohort(manifest, settings(inputs, metrics=options), tmp_path / "out",
                        scheduler=local.scheduler_address)

    assert result.done == 2
    rows = {(row["case_id"], row["method"]): row for row in table(tmp_path / "out")}
    case = tmp_path / "out" / "cases" / "case_00"
    assert (case / "metrics.json").exists() and (case / "report.html").exists()
    for method in ("gxi", "gradcam"):
        assert math.isfinite(float(rows[("case_00", method)]["deletion_auc_blur"]))  # measured, not an empty cell
        assert 0.0 <= float(rows[("case_00", method)]["relevance_mass"]) <= 1.0  # the manifest's reference_mask
        # case_01 has no tumour: its mask is empty, so it is measured without localisation, not failed
        assert rows[("case_01", method)]["status"] == "done" and rows[("case_01", method)]["relevance_mass"] == ""


def test_similar_cases_find_the_same_image_under_another_id(inputs, cluster, tmp_path):
    local, _ = cluster
    lines = inputs["manifest"].read_text().splitlines()[:7]
    lines.append(lines[3].replace("case_02,", "copy_of_02,", 1))
    manifest = inputs["root"] / "volumes" / "with_copy.csv"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run_cohort(manifest, settings(inputs, similar=3), out, scheduler=local.scheduler_address)

    with open(out / "similar_cases.csv", newline="", encoding="utf-8") as stream:
        similar = list(csv.DictReader(stream))
    by_case: dict[str, list[dict]] = {}
    for row in similar:
        by_case.setdefault(row["case_id"], []).append(row)
    assert sorted(by_case) == sorted(["copy_of_02"] + [f"case_{n:02d}" for n in range(6)])
    for case, rows in by_case.items():
        assert [row["rank"] for row in rows] == ["1", "2", "3"]
        assert case not in {row["similar_case_id"] for row in rows}
        values = [float(row["cosine_similarity"]) for row in rows]
        assert values == sorted(values, reverse=True)
    for case, copy in (("case_02", "copy_of_02"), ("copy_of_02", "case_02")):
        assert by_case[case][0]["similar_case_id"] == copy and float(by_case[case][0]["cosine_similarity"]) == 1.0
    assert by_case["case_00"][0]["cosine_similarity"] != "1.0"
    table_rows = table(out)
    assert {row["similar_cases"].split(";")[0] for row in table_rows if row["case_id"] == "case_02"} == {"copy_of_02"}
