"""Maps computed before, on disk: keyed by (volume content, model, method, parameters, target, the
engine's version, device and mixed precision).

The volume content is its voxels and its geometry (spacing, origin, direction: the IJK-to-RAS matrix),
not the file it came from, so an edited or hardened volume never finds the maps of what it was. A
parent transform the volume is merely placed under is not part of it: the maps are computed in the
volume's own frame and shown under the same transform (a region target read through the transform
names its region in that frame, so it changes the target instead).

One folder per key under the cache root, holding ``map.nrrd`` and ``record.json`` (the method's record
from ``explanation.json`` plus the run's model, target and output). A folder appears complete or not
at all: it is filled under a temporary name and renamed into place. The model's segmentation (for
segmentation models) is cached the same way under its own key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAP_FILE = "map.nrrd"
RECORD_FILE = "record.json"
SEGMENTS_FILE = "segments.nrrd"  # the segments a perturbation map was computed over, when it used some


def model_fingerprint(path: str | os.PathLike, options: dict | None = None) -> str:
    """Identity of a model's files (path, names, sizes, modification times; nothing is read) and of the
    options it is loaded with (nnU-Net folds, checkpoint).

    The same signature the worker keys its loaded models by (:func:`xaioverlay.worker.model_signature`).
    """
    from xaioverlay.worker import model_signature

    signature = model_signature(Path(path)) if Path(path).exists() else (str(path),)
    chosen = tuple(sorted((k, v) for k, v in (options or {}).items() if v not in (None, "")))
    return hashlib.sha256(repr((signature, chosen) if chosen else signature).encode()).hexdigest()[:32]


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of every file in a folder (a DICOM series) in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def engine_version() -> str:
    """The engine's version (``xaioverlay.__version__``): the package's ``__init__`` imports nothing,
    so this works before the engine's dependencies (PyTorch, MONAI) are installed."""
    import xaioverlay

    return xaioverlay.__version__


def volume_digest(array: np.ndarray, ijk_to_ras: np.ndarray) -> str:
    """SHA-256 of one volume: voxel type, shape and values, and its 4×4 IJK-to-RAS matrix (spacing,
    origin, direction; rounded to 1 µm). ``array``: (I, J, K), any dtype."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.round(np.asarray(ijk_to_ras, dtype=float), 3).tobytes())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:40]


def cache_key(volume: str, model: str, method: str, target: str, score: str = "logit", layer: str = "",
              measured: str = "", *, device: str = "cpu", amp: bool = False, version: str | None = None) -> str:
    """One map's key. ``volume`` is the input's content digest (:func:`volume_digest`); ``method`` is
    the full spec (its options are its parameters); ``measured`` names the quality measurement stored
    with the map ("" for none); ``version`` defaults to :func:`engine_version`."""
    run = [device, bool(amp), version or engine_version()]
    return _key(volume, model, method, target, score, layer or "", *([measured] if measured else []), *run)


def segmentation_key(volume: str, model: str, *, device: str = "cpu", amp: bool = False,
                     version: str | None = None) -> str:
    """The key of the model's own segmentation of an input (same parts as :func:`cache_key`)."""
    return _key(volume, model, "segmentation", device, bool(amp), version or engine_version())


@dataclass(frozen=True)
class CachedMap:
    key: str
    path: Path
    record: dict

    @property
    def segments(self) -> Path | None:
        """The label volume of the segments the map was computed over, or None."""
        path = self.path.with_name(SEGMENTS_FILE)
        return path if path.is_file() else None


class MapCache:
    """The on-disk cache; ``root`` is created on first use. Beyond ``max_bytes`` the least recently
    used entries are removed (a hit counts as a use)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int = 4 << 30) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    def folder(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> CachedMap | None:
        folder = self.folder(key)
        try:
            record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        path = folder / MAP_FILE
        if not path.is_file():
            return None
        os.utime(folder)  # recently used
        return CachedMap(key, path, record)

    def put(self, key: str, volume_file: str | os.PathLike, record: dict,
            segments_file: str | os.PathLike | None = None) -> CachedMap:
        """Store a copy of ``volume_file`` (and of its ``segments_file``) with its record; an existing entry
        is replaced."""
        folder = self.folder(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:8]}-", dir=folder.parent))
        try:
            shutil.copyfile(volume_file, staging / MAP_FILE)
            if segments_file is not None:
                shutil.copyfile(segments_file, staging / SEGMENTS_FILE)
            (staging / RECORD_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.prune(keep=key)
        return CachedMap(key, folder / MAP_FILE, record)

    def prune(self, keep: str = "") -> None:
        """Remove least recently used entries until the cache holds at most ``max_bytes``."""
        entries = []
        for folder in self.root.glob("??/*"):
            if folder.is_dir() and not folder.name.startswith("."):
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                entries.append((folder.stat().st_mtime, size, folder))
        total = sum(size for _, size, _ in entries)
        for _, size, folder in sorted(entries):
            if total <= self.max_bytes:
                break
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)
                total -= size

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
