"""Similar cases from a cohort folder (``xaioverlay cohort --out DIR``) for the volume on screen.

Reading: each complete case folder ``DIR/cases/<case_id>/`` (its ``case.json``: image files, label,
status, the model's output) and ``DIR/similar_cases.csv`` (each case's nearest cases in the model's
feature space). Only the standard library: nothing heavy is imported in Slicer.

Matching the current volume to a cohort case: first by its file — the file the volume was loaded from
(the case list's ``casePath`` attribute, else the node's storage node) resolved to an absolute path,
equal to a case's first image; then, when no path matches (the cohort ran on a copy, or its paths
were relative to another mount), by content — the SHA-256 of that file equal to the SHA-256 of a
case's first image, hashing only the images of the same size in bytes. A volume with no file (made
in Slicer, or edited and not saved) is not matched.

Showing: the chosen similar case is loaded (as the case list loads a case) with its map of a method,
when its cohort folder holds one, and set beside the current volume in a two-view compare layout
whose views are linked (slice position, zoom, pan).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import cases, colours, compare, nodes
from .cache import file_digest

CASE_RECORD = "case.json"  # as the engine's cohort writes them (xaioverlay.cohort.case)
CHECKSUMS = "checksums.json"
SIMILAR_FILE = "similar_cases.csv"


@dataclass
class CohortCase:
    """One case of a cohort folder."""

    case_id: str
    folder: Path
    images: tuple[str, ...]
    status: str
    label: str | None = None
    predicted: str | None = None

    @property
    def image(self) -> Path:
        return Path(self.images[0])


@dataclass
class SimilarCase:
    """One row of ``similar_cases.csv``: a case near another in the model's feature space."""

    case_id: str
    rank: int
    cosine_similarity: float
    label: str | None
    predicted: str | None

    def text(self) -> str:
        """The line shown in the list: ``case_07 · 0.982 · label 1 · predicted tumour``."""
        parts = [self.case_id, f"{self.cosine_similarity:.3f}"]
        if self.label:
            parts.append(f"label {self.label}")
        if self.predicted:
            parts.append(f"predicted {self.predicted}")
        return " · ".join(parts)


@dataclass
class Cohort:
    folder: Path
    cases: dict[str, CohortCase]
    similar: dict[str, list[SimilarCase]] = field(default_factory=dict)


def read_cohort(folder: str | os.PathLike) -> Cohort:
    """The complete cases of a cohort folder and their similar cases; ValueError naming what is missing."""
    folder = Path(folder)
    if not (folder / "cases").is_dir():
        raise ValueError(f"{folder} is not a cohort folder (no cases/ inside); choose the --out folder of "
                         "'xaioverlay cohort'")
    found: dict[str, CohortCase] = {}
    for case_folder in sorted((folder / "cases").iterdir()):
        if case_folder.name.startswith(".") or not (case_folder / CHECKSUMS).is_file():
            continue  # half-made or staging
        try:
            record = json.loads((case_folder / CASE_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        rows = record.get("rows") or [{}]
        found[record["case_id"]] = CohortCase(record["case_id"], case_folder, tuple(record.get("images") or ()),
                                              record.get("status", ""), record.get("label"), rows[0].get("predicted"))
    similar: dict[str, list[SimilarCase]] = {}
    if not (folder / SIMILAR_FILE).is_file():
        raise ValueError(f"{folder} has no {SIMILAR_FILE}; run the cohort with --similar K (K > 0)")
    with open(folder / SIMILAR_FILE, newline="", encoding="utf-8") as stream:
        for row in csv.DictReader(stream):
            similar.setdefault(row["case_id"], []).append(SimilarCase(
                row["similar_case_id"], int(row["rank"]), float(row["cosine_similarity"]), row.get("label") or None,
                row.get("predicted") or None))
    return Cohort(folder, found, similar)


def volume_file(volume) -> Path | None:
    """The file (or DICOM folder) a volume node was loaded from; None when it has none."""
    path = nodes.attribute(volume, "casePath")
    if not path:
        storage = volume.GetStorageNode()
        path = storage.GetFileName() if storage is not None else None
    return Path(path) if path else None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def match_case(cohort: Cohort, volume) -> CohortCase | None:
    """The cohort case whose first image is the volume's file (by path, else by SHA-256); None if none."""
    path = volume_file(volume)
    if path is None or not path.exists():
        return None
    resolved = path.resolve()
    for case in cohort.cases.values():
        if case.images and case.image.resolve() == resolved:
            return case
    size, digest = _size(path), None
    for case in cohort.cases.values():
        if not case.images or _size(case.image) != size or (size is None and not case.image.is_dir()):
            continue
        digest = digest or file_digest(path)
        if file_digest(case.image) == digest:
            return case
    return None


def similar_to(cohort: Cohort, case: CohortCase) -> list[SimilarCase]:
    """The case's similar cases in rank order (only those the cohort folder still holds)."""
    rows = sorted(cohort.similar.get(case.case_id, []), key=lambda row: row.rank)
    return [row for row in rows if row.case_id in cohort.cases]


def map_record(case: CohortCase, method: str | None) -> dict | None:
    """The record of the case's map of ``method`` (a spec such as ``gxi``; None: its first map) from its
    ``explanation.json``, with ``path``; None when its folder holds no such map."""
    try:
        record = json.loads((case.folder / "explanation.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for entry in record.get("methods", []):
        if entry.get("file") and (method is None or entry.get("spec") == method):
            return {**entry, "path": case.folder / entry["file"]}
    return None


def load_cohort_map(scene, case: CohortCase, method: str | None, volume):
    """The case's map of ``method`` from its cohort folder as a map node of ``volume`` (coloured as the module
    colours maps); None when the folder holds no such map."""
    record = map_record(case, method)
    if record is None:
        return None
    label = record.get("label") or record.get("spec", "")
    heat = nodes.add_volume_from_file(scene, record["path"], f"{case.case_id} · {label}")
    heat.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    nodes.set_attributes(heat, role=nodes.MAP, source=volume.GetID(), label=label, spec=record.get("spec", ""),
                         signed=bool(record.get("signed")), record={k: v for k, v in record.items() if k != "path"})
    colours.style_map(scene, heat, bool(record.get("signed")))
    return heat


def load_cohort_case(scene, case: CohortCase, method: str | None = None):
    """Load the case's image (tagged as a case-list volume) and its map of ``method``: (volume, map or None)."""
    image = case.image
    if not image.exists():
        raise ValueError(f"case {case.case_id}: its image {image} is no longer there; was the cohort's data moved?")
    volume = cases.load_case(scene, cases.Case(case.case_id, path=image, dicom=image.is_dir()))
    return volume, load_cohort_map(scene, case, method, volume)


def shared_method(cohort: Cohort, case_ids, wanted) -> str | None:
    """The first method of ``wanted`` (specs) whose map every case of ``case_ids`` has; None: their first maps."""
    for spec in wanted:
        if all(map_record(cohort.cases[case_id], spec) is not None for case_id in case_ids):
            return spec
    return None


def show_similar(scene, layout_node, cohort: Cohort, volume, current: CohortCase, other_id: str, wanted=(),
                 *, orientation: str = "Axial", opacity: float = 0.6):
    """Load case ``other_id`` and show it beside ``volume`` (the cohort case ``current``), each with its cohort
    map of the first method of ``wanted`` both have; returns (the other case's volume, the view tags)."""
    if other_id not in cohort.cases:
        raise ValueError(f"case {other_id} is not in the cohort folder {cohort.folder}")
    other_case = cohort.cases[other_id]
    method = shared_method(cohort, (current.case_id, other_id), wanted)
    current_map = load_cohort_map(scene, current, method, volume)
    other, other_map = load_cohort_case(scene, other_case, method)
    labels = (f"{current.case_id} (current)", f"{other_id} (similar)")
    return other, show_beside(scene, layout_node, volume, current_map, other, other_map, labels,
                              orientation=orientation, opacity=opacity)


def show_beside(scene, layout_node, current, current_map, other, other_map, labels: tuple[str, str],
                *, orientation: str = "Axial", opacity: float = 0.6) -> list[str]:
    """Two linked views in the compare layout: ``current`` (with ``current_map``) and ``other`` (with
    ``other_map``); returns the two view tags."""
    if layout_node is not None:
        compare.apply_layout(layout_node, compare.layout_xml(list(labels), orientation))
    tags = [compare.view_name(0), compare.view_name(1)]
    for tag, anatomy, heat in zip(tags, (current, other), (current_map, other_map)):
        view = compare.slice_node(scene, tag)
        if view is not None:
            view.SetViewGroup(compare.COMPARE_GROUP)
            view.SetOrientation(orientation)
        compare.show_layers(scene, tag, anatomy, heat, opacity)
        composite = compare.composite_node(scene, tag)
        composite.SetLinkedControl(1)
        composite.SetHotLinkedControl(0)
    return tags
