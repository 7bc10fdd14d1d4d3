"""Model loading through a registry of formats, each one module → :class:`LoadedModel`.

A format says whether it recognises a path and how to load it; :func:`load_model` takes the first that
recognises the path (the order of :data:`FORMATS`) and lists them all when none does.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelError
from ..model_files import is_bundle, resolve_model_path
from . import nnunet
from .base import CLASSIFICATION, SEGMENTATION, LoadedModel, ModelInput, SlidingWindow, resolve_device
from .bundle import load_bundle
from .spec import SPEC_SUFFIXES, load_spec
from .torchscript import load_torchscript

__all__ = ["LoadedModel", "ModelInput", "SlidingWindow", "load_model", "resolve_device", "CLASSIFICATION",
           "SEGMENTATION", "FORMATS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFormat:
    """One model format: ``load(path, device, amp, **options)`` returns a :class:`LoadedModel` (or, for
    formats that cannot declare their task, ``(model, infer_task)``); ``options`` are those it accepts."""

    name: str
    recognise: Callable[[Path], bool]
    load: Callable
    options: tuple[str, ...] = ()


FORMATS = (
    ModelFormat(nnunet.NAME, nnunet.recognise, nnunet.load, ("folds", "checkpoint", "tta")),
    ModelFormat("MONAI bundle folder (configs/)", is_bundle, load_bundle),
    ModelFormat("state dict + spec (.yaml/.yml/.json)", lambda p: p.is_file() and p.suffix.lower() in SPEC_SUFFIXES,
                load_spec),
    ModelFormat("TorchScript file (.ts/.pt)", Path.is_file, load_torchscript),
)


def load_model(path: str | os.PathLike, device: str | torch.device = "auto", amp: bool = False,
               **options) -> LoadedModel:
    """Load a model in any format of :data:`FORMATS`.

    Args:
        path: model folder or file (a file or sub-folder inside a bundle stands for the bundle, see
            :func:`~xaioverlay.model_files.resolve_model_path`).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: mixed precision on CUDA (ignored on CPU).
        options: format options left at None are ignored (nnU-Net: ``folds``, ``checkpoint``, ``tta``).
    """
    path = resolve_model_path(path)
    known = "; ".join(f.name for f in FORMATS)
    if not path.exists():
        raise ModelError(f"{path}: no such model file or folder; give one of: {known}")
    chosen = next((f for f in FORMATS if f.recognise(path)), None)
    if chosen is None:
        raise ModelError(f"{path}: not a model XAIOverlay knows; give one of: {known}")
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(set(given) - set(chosen.options))
    if foreign:
        raise ModelError(f"--{foreign[0]} applies to other model formats, not to a {chosen.name}; leave it out")
    result = chosen.load(path, resolve_device(device), amp, **given)
    model, infer_task = result if isinstance(result, tuple) else (result, False)
    if infer_task or not model.class_names:
        _probe_outputs(model, infer_task)
    log.info("loaded %s (%s, %s) on %s", model.model_id, model.format, model.task, model.device)
    return model


def _probe_outputs(model: LoadedModel, infer_task: bool) -> None:
    """Fill in what nothing declared (task, class names) from one forward pass on a zero input."""
    with torch.inference_mode():
        out = model.forward(model.example_input())
    model.passes.reset()
    if infer_task:
        model.task = CLASSIFICATION if out.ndim == 2 else SEGMENTATION
    if not model.class_names:
        model.class_names = [f"class {i}" for i in range(out.shape[1])]
