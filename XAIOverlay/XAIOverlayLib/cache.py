"""Maps computed before, on disk: keyed by (volume content, model, method, parameters, target).

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

MAP_FILE = "map.nrrd"
RECORD_FILE = "record.json"


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


def cache_key(volume: str, model: str, method: str, target: str, score: str = "logit", layer: str = "", measured: str = "") -> str:
    """One map's key. ``method`` is the full spec (its options are its parameters); ``measured`` names
    the quality measurement stored with the map ("" for none)."""
    text = json.dumps([volume, model, method, target, score, layer or "", *([measured] if measured else [])])
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def segmentation_key(volume: str, model: str) -> str:
    return hashlib.sha256(json.dumps([volume, model, "segmentation"]).encode()).hexdigest()[:40]


@dataclass(frozen=True)
class CachedMap:
    key: str
    path: Path
    record: dict


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
            record = json.loads((folder / RECORD_FILE).read_text())
        except (OSError, ValueError):
            return None
        path = folder / MAP_FILE
        if not path.is_file():
            return None
        os.utime(folder)  # recently used
        return CachedMap(key, path, record)

    def put(self, key: str, volume_file: str | os.PathLike, record: dict) -> CachedMap:
        """Store a copy of ``volume_file`` with its record; an existing entry is replaced."""
        folder = self.folder(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:8]}-", dir=folder.parent))
        try:
            shutil.copyfile(volume_file, staging / MAP_FILE)
            (staging / RECORD_FILE).write_text(json.dumps(record, indent=1))
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
