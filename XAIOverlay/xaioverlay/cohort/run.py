"""Running a cohort on a Dask cluster: one task per case, retried where a worker died, resumable.

Dask (``dask.distributed``) does the scheduling: a ``LocalCluster`` of worker processes by default, or
any running cluster given by its scheduler address. What is ours: what a task is (one case, see
:mod:`.case`), which cases still need running (``--resume``), and the table built from the case
folders (:mod:`.table`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import InputError
from ..outputs import prepare_output_folder, write_json
from .case import DONE, FAILED, CaseSettings, complete_record, failed_rows, one_line, run_case, write_case_folder
from .manifest import Case, read_cases
from .table import write_table

log = logging.getLogger(__name__)

SETTINGS_FILE = "cohort.json"
#: Attempts of a case that raised an unexpected exception (a worker's death is retried by the scheduler).
RETRIES = 2


@dataclass
class CohortResult:
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0  # complete from an earlier run (--resume)
    files: dict[str, Path] = field(default_factory=dict)
    dashboard: str | None = None


def cpu_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cluster_layout(workers: int | None, device: str) -> tuple[int, int]:
    """(worker processes, PyTorch threads per worker): one worker per GPU when CUDA is used, else
    processes × threads filling the CPU cores (two threads per process); ``workers`` overrides."""
    import torch

    cores = cpu_cores()
    if workers is None:
        if device != "cpu" and torch.cuda.is_available():
            workers = torch.cuda.device_count()
        else:
            workers = max(1, cores // 2)
    if workers < 1:
        raise InputError(f"--workers {workers}: give at least 1")
    return workers, max(1, cores // workers)


def check_settings(out: Path, settings: CaseSettings, resume: bool) -> None:
    """Refuse to mix two cohorts in one folder; record what this one asks for."""
    path = out / SETTINGS_FILE
    wanted = settings.record()
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8")).get("settings")
        except (OSError, ValueError):
            previous = None
        if not resume:
            raise InputError(f"{out} already holds a cohort; add --resume to continue it, or choose another --out")
        if previous != wanted:
            changed = sorted(k for k in wanted if (previous or {}).get(k) != wanted[k])
            raise InputError(f"--resume: {out} was run with other settings ({', '.join(changed) or 'unreadable'}); "
                             "rerun with the same settings or choose another --out")
    write_json({"settings": wanted}, path)


def clear_stale_staging(cases_dir: Path) -> None:
    """Half-made case folders (hidden names) of cases whose worker died are removed."""
    for item in cases_dir.glob(".*"):
        if item.is_dir() and item.name.startswith((".staging-", ".replaced-")):
            shutil.rmtree(item, ignore_errors=True)


def start_client(scheduler: str | None, workers: int):
    """A Dask client on ``scheduler``, or on a new LocalCluster of ``workers`` processes; returns (client, cluster)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError("cohorts need Dask: pip install 'xaioverlay[cohort]' (dask[distributed])") from None
    if scheduler:
        try:
            return Client(scheduler, timeout="30s"), None
        except (OSError, TimeoutError) as error:
            raise InputError(f"--scheduler {scheduler}: cannot connect ({one_line(error)}); "
                             "check the address (tcp://host:8786) and that the scheduler runs") from None
    # any free port: another cluster may hold Dask's usual 8787 (without bokeh the port serves no dashboard)
    quiet = logging.ERROR if logging.getLogger().getEffectiveLevel() > logging.INFO else logging.INFO
    for name in ("distributed", "bokeh", "tornado"):  # Dask's own INFO lines unless the user asked for a log
        logging.getLogger(name).setLevel(quiet)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=quiet)
    return Client(cluster), cluster


def dashboard_line(client, local: bool) -> str:
    """Where the Dask dashboard is; a local one needs bokeh here (without it the port serves no page)."""
    services = client.scheduler_info().get("services", {})
    if "dashboard" not in services or (local and importlib.util.find_spec("bokeh") is None):
        return "Dask dashboard: unavailable (install bokeh>=3.1 for one)"
    return f"Dask dashboard: {client.dashboard_link}"


def progress_event(result: CohortResult, todo: int, started: float, case_id: str, status: str) -> dict:
    finished = result.done + result.failed - result.skipped
    minutes = (time.perf_counter() - started) / 60.0
    rate = finished / minutes if minutes > 0 else 0.0
    remaining = result.total - result.done - result.failed
    return {"event": "cohort", "case_id": case_id, "status": status, "done": result.done, "failed": result.failed,
            "remaining": remaining, "total": result.total, "cases_per_minute": round(rate, 3),
            "eta_s": round(remaining / rate * 60.0, 1) if rate > 0 else None}


def run_cohort(
    cases: str | os.PathLike | Sequence[Case],
    settings: CaseSettings,
    out: str | os.PathLike,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    retries: int = RETRIES,
    progress: Callable[[dict], None] | None = None,
) -> CohortResult:
    """Run every case of ``cases`` (a manifest, a folder of volumes or a list) and write the cohort table.

    Every check of the inputs (manifest, methods, settings of a resumed run) happens before any work
    is scheduled. On KeyboardInterrupt the running cases are cancelled, the table of the finished
    ones is written and the interrupt propagates; ``resume=True`` continues later.
    """
    from ..methods import build_methods

    progress = progress or (lambda event: None)
    cases = read_cases(cases) if isinstance(cases, (str, os.PathLike)) else list(cases)
    if settings.methods is not None:
        build_methods(settings.methods, layer=settings.layer)  # an unknown method is refused now, not per case
    if not Path(settings.model).exists():
        raise InputError(f"--model {settings.model} does not exist; give a model folder, spec file or TorchScript file")
    out = prepare_output_folder(out)
    cases_dir = out / "cases"
    cases_dir.mkdir(exist_ok=True)
    check_settings(out, settings, resume)
    clear_stale_staging(cases_dir)

    result = CohortResult(total=len(cases))
    todo = []
    for case in cases:
        record = complete_record(cases_dir / case.case_id) if resume else None
        if record is not None and record["status"] == DONE:
            result.done += 1
            result.skipped += 1
        else:
            todo.append(case)
    if not todo:
        progress({"event": "message", "message": f"all {len(cases)} cases are complete; table rebuilt"})
        result.files = write_table(cases, out, settings.similar)
        return result

    count, threads = cluster_layout(workers, settings.device)
    if scheduler is None and settings.torch_threads is None:
        settings = CaseSettings(**{**settings.__dict__, "torch_threads": threads})
    client, cluster = start_client(scheduler, count)
    futures = []
    try:
        result.dashboard = dashboard_line(client, local=cluster is not None)
        progress({"event": "message", "message": result.dashboard})
        progress({"event": "message", "message": f"{len(todo)} cases to run"
                  + (f" ({result.skipped} complete from an earlier run)" if result.skipped else "")})
        token = uuid.uuid4().hex[:8]
        futures = [client.submit(run_case, case, settings, str(cases_dir), retries=retries, pure=False,
                                 key=f"xaioverlay-case-{case.case_id}-{token}") for case in todo]
        by_key = {future.key: case for future, case in zip(futures, todo)}
        started = time.perf_counter()
        from distributed import as_completed

        for future in as_completed(futures):
            case = by_key[future.key]
            try:
                status = future.result()["status"]
            except Exception as error:  # every attempt raised, or the case killed its workers
                message = one_line(error)
                if type(error).__name__ == "KilledWorker":
                    message = f"the case ended its worker process on every attempt (out of memory?): {message}"
                write_case_folder(case, cases_dir, FAILED, failed_rows(case, settings.methods, message), message)
                status = FAILED
            if status == DONE:
                result.done += 1
            else:
                result.failed += 1
            progress(progress_event(result, len(todo), started, case.case_id, status))
    except KeyboardInterrupt:
        if futures:
            client.cancel(futures)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        clear_stale_staging(cases_dir)  # a worker killed mid-case leaves its staging folder
        result.files = write_table(cases, out, settings.similar)
    return result
