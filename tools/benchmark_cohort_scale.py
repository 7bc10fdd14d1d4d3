"""The cohort scheduler's cost per case, and cohort throughput, with a tiny model and many tiny cases.

    python tools/benchmark_cohort_scale.py                 # 10,000 cases, 1 and 2 workers
    python tools/benchmark_cohort_scale.py --cases 2000 --workers 2
    python tools/benchmark_cohort_scale.py --quick         # 200 cases: a check that it runs

The cases are synthetic 16³ volumes (a bright ball or not, labelled) written with a manifest into a
temporary folder, and the model is a tiny MONAI ``Classifier`` (two strided convolutions, random
weights): each case's own work is small, so what is measured is mostly the cohort machinery. Every
case is run as ``xaioverlay cohort`` would run it (gradient × input, no montage, the 5 similar cases),
on a Dask ``LocalCluster`` of N single-threaded worker processes started before the clock starts.

Definitions (per number of workers N):

- *wall*: seconds of :func:`xaioverlay.cohort.run_cohort`, from the call (manifest read) to its return
  (every case folder published, ``cohort.csv``/``.parquet`` and ``similar_cases.csv`` written); the
  report is timed apart (*report*).
- *compute*: the sum over cases of the seconds their Dask task ran (``run_case``: load the model on a
  worker's first case, read the volume, explain, write and checksum the case folder), from Dask's task
  stream.
- *overhead per case* = (N × wall − compute) / cases: worker time not spent inside a case's task —
  submitting, scheduling, transferring results, the driver's progress loop, the idle tail, and building
  the table from the case folders — shared out over the cases. Goal: under 50 ms.
- *throughput*: cases / wall, in cases per minute.
- *table*: seconds to rebuild the table from the case folders (checksums verified, similar cases found),
  timed again after the run: the part of the overhead that grows with the cohort in our own code.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "XAIOverlay")]

SIZE = 16
NETWORK = {"name": "Classifier", "args": {"in_shape": [1, SIZE, SIZE, SIZE], "classes": 2, "channels": [4, 8],
                                         "strides": [2, 2]}}


def write_model(folder: Path) -> Path:
    import torch
    import yaml
    from monai.networks.nets import Classifier

    torch.manual_seed(0)
    network = Classifier(**NETWORK["args"])
    torch.save(network.state_dict(), folder / "tiny.pt")
    spec = {"network": NETWORK, "weights": "tiny.pt", "task": "classification", "activation": "softmax",
            "class_names": ["no ball", "ball"], "preprocessing": []}
    (folder / "tiny.yaml").write_text(yaml.safe_dump(spec))
    return folder / "tiny.yaml"


def write_cases(folder: Path, count: int) -> Path:
    """``count`` 16³ volumes at 2 mm, every other one with a bright ball, and ``cases.csv``."""
    import numpy as np

    from xaioverlay.volumes import Geometry, Volume, write_volume

    geometry = Geometry((SIZE,) * 3, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"), -1)
    rng = np.random.default_rng(0)
    lines = ["case_id,image,label"]
    for number in range(count):
        array = rng.normal(0, 0.1, (SIZE,) * 3).astype(np.float32)
        ball = number % 2 == 0
        if ball:
            centre = rng.integers(5, SIZE - 5, 3)
            array[((grid - centre) ** 2).sum(-1) <= 9] += 1.0
        name = f"c{number:05d}.nrrd"
        write_volume(Volume(array, geometry, name), folder / name, compress=False)
        lines.append(f"c{number:05d},{name},{int(ball)}")
    (folder / "cases.csv").write_text("\n".join(lines) + "\n")
    return folder / "cases.csv"


def measure(manifest: Path, model: Path, workers: int, out: Path) -> dict:
    """One cohort run on a fresh LocalCluster of ``workers`` processes (see the module docstring)."""
    from distributed import Client, LocalCluster, get_task_stream

    from xaioverlay.cohort import CaseSettings, run_cohort
    from xaioverlay.cohort.manifest import read_cases
    from xaioverlay.cohort.report import write_cohort_report
    from xaioverlay.cohort.table import write_table

    settings = CaseSettings(model=str(model), methods="gxi", device="cpu", torch_threads=1, montage=False)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        with get_task_stream(client) as stream:
            started = time.perf_counter()
            result = run_cohort(manifest, settings, out, scheduler=cluster.scheduler_address)
            wall = time.perf_counter() - started
        compute = sum(part["stop"] - part["start"] for task in stream.data for part in task["startstops"]
                      if part["action"] == "compute")
    started = time.perf_counter()
    write_table(read_cases(manifest), out, settings.similar)  # what the run did last, again: same bytes
    table = time.perf_counter() - started
    started = time.perf_counter()
    write_cohort_report(out)
    report = time.perf_counter() - started
    cases = result.total
    return {"workers": workers, "cases": cases, "done": result.done, "failed": result.failed, "wall_s": wall,
            "compute_s": compute, "compute_per_case_ms": 1000 * compute / cases,
            "overhead_per_case_ms": 1000 * (workers * wall - compute) / cases,
            "cases_per_minute": 60 * cases / wall, "table_s": table, "report_s": report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure (1 2)")
    parser.add_argument("--quick", action="store_true", help="200 cases")
    parser.add_argument("--keep", type=Path, default=None, help="write the cases and outputs here and keep them")
    args = parser.parse_args()
    cases = 200 if args.quick else args.cases
    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp(prefix="cohort-scale-")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        model = write_model(root)
        manifest = write_cases(root, cases)
        print(f"{cases} cases of {SIZE}³ voxels written in {time.perf_counter() - started:.1f} s "
              f"({os.cpu_count()} CPU cores on this machine)", flush=True)
        print("| workers | cases | done | wall (s) | compute (s) | compute / case (ms) | overhead / case (ms) "
              "| cases / min | table (s) | report (s) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for workers in args.workers:
            row = measure(manifest, model, workers, root / f"out-{workers}")
            print(f"| {row['workers']} | {row['cases']} | {row['done']} | {row['wall_s']:.1f} | {row['compute_s']:.1f} "
                  f"| {row['compute_per_case_ms']:.1f} | {row['overhead_per_case_ms']:.1f} "
                  f"| {row['cases_per_minute']:.0f} | {row['table_s']:.1f} | {row['report_s']:.1f} |", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
