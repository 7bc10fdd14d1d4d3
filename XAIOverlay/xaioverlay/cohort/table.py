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
import numpy as np

from .case import complete_record
from .manifest import Case
from .similar import FEATURES_FILE, nearest_cases

#: The first columns, in this order; the others (model output, metrics) follow in order of appearance.
LEADING = ("case_id", "method", "status", "error", "label", "predicted", "predicted_index", "probability", "logit",
           "dice", "target_value", "runtime_s", "device", "forward_passes", "backward_passes", "similar_cases")


SIMILAR = ("case_id", "rank", "similar_case_id", "cosine_similarity", "label", "predicted")


def complete_records(cases: Sequence[Case], cases_dir: Path) -> list[dict]:
    """``case.json`` of every case with a complete folder, in ``cases`` order."""
    records = (complete_record(cases_dir / case.case_id) for case in cases)
    return [record for record in records if record is not None]


def similar_rows(records: Sequence[dict], cases_dir: Path, k: int) -> list[dict]:
    """For each done case with a feature vector, its ``k`` most similar such cases (see :mod:`.similar`)."""
    with_features = [r for r in records
                     if r["status"] == "done" and (cases_dir / r["case_id"] / FEATURES_FILE).exists()]
    if len(with_features) < 2 or k < 1:
        return []
    features = np.stack([np.load(cases_dir / r["case_id"] / FEATURES_FILE, allow_pickle=False) for r in with_features])
    indices, similarities = nearest_cases(features, k)
    rows = []
    for record, near, values in zip(with_features, indices, similarities):
        for rank, (index, value) in enumerate(zip(near, values), start=1):
            other = with_features[index]
            rows.append({"case_id": record["case_id"], "rank": rank, "similar_case_id": other["case_id"],
                         "cosine_similarity": round(float(value), 6), "label": other["label"],
                         "predicted": other["rows"][0].get("predicted")})
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


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _cell(row.get(key)) for key in columns})


def write_table(cases: Sequence[Case], out: Path, k: int = 0) -> dict[str, Path]:
    """Write ``out/cohort.csv`` (and ``out/cohort.parquet`` when pyarrow is installed) from ``out/cases``,
    and with ``k`` > 0 ``out/similar_cases.csv`` (each case's ``k`` most similar cases)."""
    records = complete_records(cases, out / "cases")
    similar = similar_rows(records, out / "cases", k)
    nearest: dict[str, list[str]] = {}
    for row in similar:
        nearest.setdefault(row["case_id"], []).append(row["similar_case_id"])
    rows = [{**row, **({"similar_cases": ";".join(nearest[row["case_id"]])} if row["case_id"] in nearest else {})}
            for record in records for row in record["rows"]]
    columns = table_columns(rows)

    written = {"csv": _replace_atomically(out / "cohort.csv", lambda path: _write_csv(path, columns, rows))}
    if k > 0:
        written["similar"] = _replace_atomically(out / "similar_cases.csv",
                                                 lambda path: _write_csv(path, SIMILAR, similar))
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])
        if not rows:
            table = pa.table({key: pa.array([], pa.string()) for key in columns})
        written["parquet"] = _replace_atomically(out / "cohort.parquet", lambda p: pq.write_table(table, p))
    return written
