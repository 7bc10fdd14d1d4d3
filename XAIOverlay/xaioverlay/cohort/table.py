"""The cohort table, rebuilt from the case folders: ``cohort.csv`` and, with pyarrow, ``cohort.parquet``.

One row per (case, method), cases in manifest order, methods in the order they ran. The rows are the
ones each complete case folder recorded in its ``case.json``, so the table is a pure function of the
case folders: rebuilding it gives the same bytes, whichever run, worker or attempt wrote each case.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path
from typing import Sequence

from ..volumes import atomic_path
from .case import complete_record
from .manifest import Case

#: The first columns, in this order; the others (model output, metrics) follow in order of appearance.
LEADING = ("case_id", "method", "status", "error", "label", "predicted", "predicted_index", "probability", "logit",
           "target_value", "runtime_s", "device", "forward_passes", "backward_passes")


def collect_rows(cases: Sequence[Case], cases_dir: Path) -> list[dict]:
    """Rows of every case with a complete folder, in ``cases`` order."""
    rows: list[dict] = []
    for case in cases:
        record = complete_record(cases_dir / case.case_id)
        if record is not None:
            rows.extend(record["rows"])
    return rows


def table_columns(rows: Sequence[dict]) -> list[str]:
    present = {key for row in rows for key in row}
    rest: list[str] = []
    for row in rows:
        rest.extend(key for key in row if key not in LEADING and key not in rest)
    return [key for key in LEADING if key in present or key in LEADING[:5]] + rest


def _replace_atomically(path: Path, write) -> Path:
    temporary = atomic_path(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def _cell(value):
    return "" if value is None else value


def write_table(cases: Sequence[Case], out: Path) -> dict[str, Path]:
    """Write ``out/cohort.csv`` (and ``out/cohort.parquet`` when pyarrow is installed) from ``out/cases``."""
    rows = collect_rows(cases, out / "cases")
    columns = table_columns(rows)

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({key: _cell(row.get(key)) for key in columns})

    written = {"csv": _replace_atomically(out / "cohort.csv", write_csv)}
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])
        if not rows:
            table = pa.table({key: pa.array([], pa.string()) for key in columns})
        written["parquet"] = _replace_atomically(out / "cohort.parquet", lambda p: pq.write_table(table, p))
    return written
