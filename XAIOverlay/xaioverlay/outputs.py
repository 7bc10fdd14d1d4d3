"""Writing a run's outputs: ``<method>.nrrd`` per map (and ``<method>_segments.nrrd`` beside the map of a
method that kept or filled segments), ``explanation.json``, ``montage.png``.

Everything is first written into a hidden staging folder inside the output folder and then renamed
into place, so an interrupted run leaves no half-written file and never a partial set behind a
complete-looking ``explanation.json`` (it is moved last).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import InputError
from .explain import Explanation
from .montage import render_montage
from .volumes import atomic_path, write_volume


def map_file_name(spec: str, taken: set[str]) -> str:
    """``"lrp:epsilon-gamma-box"`` → ``"lrp-epsilon-gamma-box.nrrd"`` (unique within ``taken``)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec).strip("-.") or "map"
    name, number = f"{stem}.nrrd", 2
    while name in taken:
        name, number = f"{stem}-{number}.nrrd", number + 1
    taken.add(name)
    return name


def write_json(data: dict, path: Path) -> Path:
    """Atomic JSON write (temporary sibling, then rename)."""
    temporary = atomic_path(path)
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2)
            stream.write("\n")
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def prepare_output_folder(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create output folder {out}: {error.strerror}; choose a writable place") from None
    if not os.access(out, os.W_OK):
        raise InputError(f"output folder {out} is not writable; choose another with --out")
    return out


def write_outputs(explanation: Explanation, out: str | os.PathLike, *, montage: bool = True) -> dict[str, Path]:
    """Write the maps, ``explanation.json`` and ``montage.png`` into ``out``; returns the paths by role."""
    out = prepare_output_folder(out)
    staging = Path(tempfile.mkdtemp(prefix=".xaioverlay-staging-", dir=out))
    try:
        taken: set[str] = set()
        files: dict[str, str] = {}
        segment_files: dict[str, str] = {}
        for result in explanation.results:
            name = map_file_name(result.spec, taken)
            write_volume(result.volume, staging / name)
            files[result.spec] = name
            if result.segments is not None:
                segment_files[result.spec] = map_file_name(name[:-len(".nrrd")] + "_segments", taken)
                write_volume(result.segments, staging / segment_files[result.spec])
        record = explanation.record()
        for entry in record["methods"]:
            entry["file"] = files[entry["spec"]]
            if entry["spec"] in segment_files:
                entry["segments"]["file"] = segment_files[entry["spec"]]
        if montage and explanation.results:
            render_montage(
                explanation.anatomy,
                [(r.label + (f" ({r.parameters['layer']})" if "layer" in r.parameters else ""), r.volume, r.signed) for r in explanation.results],
                staging / "montage.png",
            )
            record["montage"] = "montage.png"
        write_json(record, staging / "explanation.json")
        written: dict[str, Path] = {}
        order = [*files.values(), *segment_files.values(), *(["montage.png"] if record.get("montage") else []),
                 "explanation.json"]
        (out / "explanation.json").unlink(missing_ok=True)  # a previous run's record must not vouch for new maps
        try:
            for name in order:  # explanation.json last: its presence means the set is complete
                os.replace(staging / name, out / name)
                written[name] = out / name
        except BaseException:  # interrupted (Ctrl-C) or failed half-way: take back what was moved
            for path in written.values():
                path.unlink(missing_ok=True)
            raise
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
