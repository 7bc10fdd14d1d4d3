"""Where a model is on disk: a MONAI bundle folder, a spec file or a TorchScript file.

A bundle is a folder, but file dialogs hand over files: a file picked inside a bundle (its
``configs/inference.json``, ``configs/metadata.json``, its ``models/model.pt`` weights) or one of its
``configs``/``models`` folders stands for the bundle. No torch here: the Slicer module resolves a
chosen path before the engine's packages are installed.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Weights a bundle keeps in ``models/`` that are not a model on their own (``model.ts`` is TorchScript).
BUNDLE_WEIGHT_SUFFIXES = (".pt", ".pth")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / "configs").is_dir()


def _has_inference_config(folder: Path) -> bool:
    return any((folder / "configs" / f"inference{suffix}").is_file() for suffix in CONFIG_SUFFIXES)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The model ``path`` stands for: the bundle folder for a file or sub-folder of a bundle, else ``path``.

    ``b/configs/inference.json``, ``b/configs/metadata.json``, ``b/configs``, ``b/models/model.pt`` and
    ``b/models`` → ``b`` when ``b/configs/inference.{json,yaml,yml}`` exists. A TorchScript file in a
    bundle (``b/models/model.ts``) stays itself: it is a model on its own.
    """
    path = Path(path)
    parent = path.parent
    inside = (
        (path.is_dir() and path.name in ("configs", "models"))
        or (path.is_file() and parent.name == "configs" and path.suffix.lower() in CONFIG_SUFFIXES)
        or (path.is_file() and parent.name == "models" and path.suffix.lower() in BUNDLE_WEIGHT_SUFFIXES)
    )
    if inside and _has_inference_config(parent):
        return parent
    if inside and _has_inference_config(parent.parent):
        return parent.parent
    return path
