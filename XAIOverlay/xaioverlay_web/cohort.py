"""``serve --cohort DIR``: a cohort folder's cases, their stored maps, table rows and similar cases.

The folder is read as the Slicer module reads it (:mod:`XAIOverlayLib.similar_cases`: complete case
folders, ``similar_cases.csv``), plus ``cohort.csv`` (the cohort table: its order of cases and each
(case, method) row). Each stored map is handed to the logic as a :class:`XAIOverlayLib.cache.CachedMap`
whose record carries the map's ``explanation.json`` entry and, under ``metrics``, its cohort table row,
so the logic makes its nodes on the same path as cached maps, and the page's table shows the row.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from XAIOverlayLib.cache import CachedMap
from XAIOverlayLib.cases import Case
from XAIOverlayLib.similar_cases import Cohort, read_cohort, similar_to

from xaioverlay.errors import InputError

TABLE = "cohort.csv"
#: Cohort table columns the page's table already shows (method, runtime, passes) or that name the row.
SHOWN_ELSEWHERE = ("case_id", "method", "runtime_s", "forward_passes", "backward_passes", "similar_cases")


@dataclass
class StoredCohort:
    """A cohort folder opened for the page: ``cases`` (done cases, in the table's order), ``methods`` (the specs
    the cohort ran, in order), ``rows`` ((case_id, method) → cohort table row) and ``model`` (its explanation's
    model record)."""

    cohort: Cohort
    cases: list[Case]
    methods: list[str]
    rows: dict[tuple[str, str], dict]
    model: dict

    @property
    def model_path(self) -> str:
        return str(self.model.get("source") or self.model.get("id") or "cohort model")

    def description(self) -> dict:
        """The model's description the page needs when no model is given: its task and classes (no method
        can compute: the cohort's methods are offered from the stored maps)."""
        return {"task": self.model.get("task", ""), "class_names": self.model.get("class_names") or [],
                "channel_names": self.model.get("channel_names") or [], "methods": []}

    def stored_maps(self, case_id: str, methods: list[str]) -> dict[str, CachedMap]:
        """The case's stored maps of ``methods`` (those its folder holds), by spec."""
        folder = self.cohort.cases[case_id].folder
        explanation = _read_json(folder / "explanation.json")
        run = {key: explanation.get(key) for key in ("model", "target", "output", "created", "xaioverlay_version")}
        entries = {entry.get("spec"): entry for entry in explanation.get("methods", []) if entry.get("file")}
        maps = {}
        for spec in methods:
            if spec not in entries:
                continue
            path = folder / entries[spec]["file"]
            row = self.rows.get((case_id, spec), {})
            metrics = {key: value for key, value in row.items() if key not in SHOWN_ELSEWHERE and value != ""}
            record = {**entries[spec], **run, "request_spec": spec, "metrics": metrics}
            maps[spec] = CachedMap(f"cohort:{path.resolve()}:{path.stat().st_mtime_ns}", path, record)
        return maps

    def target_text(self, case_id: str) -> str:
        explanation = _read_json(self.cohort.cases[case_id].folder / "explanation.json")
        return json.dumps(explanation.get("target") or {}, sort_keys=True)

    def similar(self, case_id: str) -> list[dict]:
        """The case's similar cases that the page lists (done cases only): ``{"id", "text"}`` in rank order."""
        listed = {case.name for case in self.cases}
        return [{"id": row.case_id, "text": row.text()} for row in similar_to(self.cohort, self.cohort.cases[case_id])
                if row.case_id in listed]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _number(text: str):
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def open_cohort(folder: str) -> StoredCohort:
    """The cohort folder ``folder`` for the page; :class:`InputError` naming what is missing or incomplete."""
    folder = Path(folder)
    again = "give the --out folder of 'xaioverlay cohort'"
    if not folder.is_dir():
        raise InputError(f"cohort folder {folder} does not exist; {again}")
    if not (folder / TABLE).is_file():
        raise InputError(f"{folder} holds no {TABLE}; {again} once it has finished (or rerun it with --resume)")
    try:
        cohort = read_cohort(folder)
    except ValueError as error:
        raise InputError(str(error)) from error
    with open(folder / TABLE, newline="", encoding="utf-8") as stream:
        table = list(csv.DictReader(stream))
    rows = {(row["case_id"], row["method"]): {k: _number(v) for k, v in row.items()} for row in table}
    order = list(dict.fromkeys(row["case_id"] for row in table))
    incomplete = [case_id for case_id in order if case_id not in cohort.cases]
    if incomplete:
        raise InputError(f"{folder}: case folder(s) {', '.join(incomplete[:3])} missing or incomplete; "
                         "finish the cohort with 'xaioverlay cohort ... --resume'")
    done = [case_id for case_id in order if cohort.cases[case_id].status == "done"]
    if not done:
        raise InputError(f"{folder}: no case of the cohort finished; see the error column of {TABLE}")
    cases = []
    for case_id in done:
        image = cohort.cases[case_id].image
        if not image.exists():
            raise InputError(f"case {case_id}: its image {image} is no longer there; serve the cohort where its "
                             "images are (paths as in its manifest)")
        cases.append(Case(case_id, path=image, dicom=image.is_dir()))
    methods = list(dict.fromkeys(row["method"] for row in table if row["case_id"] in done and row["method"]))
    model = _read_json(cohort.cases[done[0]].folder / "explanation.json").get("model") or {}
    return StoredCohort(cohort, cases, methods, rows, model)
