"""The cases of a cohort: a CSV manifest or a folder of volumes, checked before any work is scheduled.

A manifest is a CSV file with a header row: ``case_id``, ``image`` and, for models with several input
channels, ``image_2``, ``image_3``, … in channel order; optional ``label`` (kept in the table as given),
``reference_mask`` (for the localisation metrics) and ``segments`` (a label map of the case's anatomy:
an atlas registered to it or its own segmentation, for the strategies, see :mod:`.strategies`).
Relative paths are relative to the manifest's folder. A folder instead of a manifest makes one case
per volume file in it (not in subfolders), the case id being the file name without its extension.

Whether each case's files exist and can be read is checked when the case runs: a missing or damaged
file fails that case only (see :mod:`xaioverlay.cohort.case`).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..volumes import VOLUME_SUFFIXES

#: Case ids become folder names: letters, digits, ``.``, ``_``, ``-``; not starting with ``.``.
CASE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
OPTIONAL_COLUMNS = ("label", "reference_mask", "segments")


@dataclass(frozen=True)
class Case:
    """One case: its id, its input volumes in channel order, and what the table keeps about it."""

    case_id: str
    images: tuple[str, ...]
    label: str | None = None
    reference_mask: str | None = None
    segments: str | None = None


def _channel_columns(header: list[str], manifest: Path) -> list[str]:
    """``image``, ``image_2``, … present in ``header``, checked to be consecutive."""
    extra = sorted((int(m.group(1)), name) for name in header if (m := re.fullmatch(r"image_(\d+)", name)))
    numbers = [n for n, _ in extra]
    if numbers != list(range(2, 2 + len(numbers))):
        raise InputError(
            f"manifest {manifest}: channel columns {', '.join(n for _, n in extra)} are not consecutive; "
            "name them image, image_2, image_3, ... in channel order"
        )
    return ["image", *(name for _, name in extra)]


def _resolve(value: str, base: Path) -> str:
    path = Path(value)
    return str(path if path.is_absolute() else base / path)


def check_case_id(case_id: str, where: str) -> str:
    if not CASE_ID.fullmatch(case_id):
        raise InputError(
            f"{where}: case id {case_id!r} cannot name a folder; use letters, digits, '.', '_' or '-' "
            "(at most 128, not starting with '.')"
        )
    return case_id


def read_manifest(manifest: Path) -> list[Case]:
    """Cases of a CSV manifest, in its row order. Raises InputError naming the first problem."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.reader(stream))
    except UnicodeDecodeError:
        raise InputError(f"manifest {manifest} is not UTF-8 text; save it as a UTF-8 CSV file") from None
    except (OSError, csv.Error) as error:
        raise InputError(f"cannot read manifest {manifest}: {getattr(error, 'strerror', None) or error}") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise InputError(f"manifest {manifest} is empty; give a CSV with a header row case_id,image,... "
                         "and one row per case")
    header = [cell.strip() for cell in rows[0]]
    missing = [name for name in ("case_id", "image") if name not in header]
    if missing:
        raise InputError(
            f"manifest {manifest} has no column {', '.join(missing)} (header: {','.join(header)}); "
            "the first row must name the columns case_id,image[,image_2,...][,label][,reference_mask][,segments]"
        )
    if len(set(header)) != len(header):
        raise InputError(f"manifest {manifest}: a column is named twice in the header {','.join(header)}")
    channels = _channel_columns(header, manifest)
    base = manifest.parent
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InputError(f"manifest {manifest} line {line}: {len(row)} fields where the header has {len(header)}")
        cells = {name: cell.strip() for name, cell in zip(header, row)}
        case_id = check_case_id(cells["case_id"], f"manifest {manifest} line {line}")
        if case_id in seen:
            raise InputError(f"manifest {manifest}: case id {case_id!r} on lines {seen[case_id]} and {line}; "
                             "case ids must be unique")
        seen[case_id] = line
        empty = [name for name in channels if not cells[name]]
        if empty:
            raise InputError(f"manifest {manifest} line {line}: case {case_id!r} has no {', '.join(empty)}")
        cases.append(Case(
            case_id=case_id,
            images=tuple(_resolve(cells[name], base) for name in channels),
            label=cells.get("label") or None,
            reference_mask=_resolve(cells["reference_mask"], base) if cells.get("reference_mask") else None,
            segments=_resolve(cells["segments"], base) if cells.get("segments") else None,
        ))
    if not cases:
        raise InputError(f"manifest {manifest} has a header but no case; add one row per case")
    return cases


def _case_id_of(path: Path) -> str:
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_folder(folder: Path) -> list[Case]:
    """One case per volume file in ``folder`` (sorted by name)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)
                   and not p.name.startswith("."))
    if not files:
        raise InputError(f"folder {folder} holds no volume ({', '.join(VOLUME_SUFFIXES)}); "
                         "give a folder of volumes or a CSV manifest")
    cases: dict[str, Case] = {}
    for path in files:
        case_id = check_case_id(_case_id_of(path), f"folder {folder}, file {path.name}")
        if case_id in cases:
            raise InputError(f"folder {folder}: {Path(cases[case_id].images[0]).name} and {path.name} "
                             f"are both case {case_id!r}; rename one")
        cases[case_id] = Case(case_id, (str(path),))
    return list(cases.values())


def read_cases(source: str | os.PathLike) -> list[Case]:
    """The cases of ``source``: a CSV manifest or a folder of volumes; their paths absolute (the cohort table keeps
    them, and it is read from other working directories)."""
    source = Path(source).absolute()
    if source.is_dir():
        return read_folder(source)
    if not source.exists():
        raise InputError(f"--cases {source} does not exist; give a CSV manifest or a folder of volumes")
    return read_manifest(source)
