"""Model loading: MONAI bundle folder, state dict + spec, or TorchScript → :class:`LoadedModel`."""

from __future__ import annotations

import logging
import os

import torch

from ..errors import ModelError
from ..model_files import is_bundle, resolve_model_path
from .base import CLASSIFICATION, SEGMENTATION, LoadedModel, ModelInput, SlidingWindow, resolve_device
from .bundle import load_bundle
from .spec import SPEC_SUFFIXES, load_spec
from .torchscript import load_torchscript

__all__ = ["LoadedModel", "ModelInput", "SlidingWindow", "load_model", "resolve_device", "CLASSIFICATION", "SEGMENTATION"]

log = logging.getLogger(__name__)


def load_model(path: str | os.PathLike, device: str | torch.device = "auto", amp: bool = False) -> LoadedModel:
    """Load a model from a MONAI bundle folder, a spec file (.yaml/.json) or a TorchScript file.

    Args:
        path: bundle folder (or a file or sub-folder inside it, see :func:`resolve_model_path`), spec file
            or TorchScript file.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: mixed precision on CUDA (ignored on CPU).
    """
    path = resolve_model_path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file or folder; give a MONAI bundle folder, a spec (.yaml/.json) or TorchScript (.ts/.pt)")
    torch_device = resolve_device(device)
    infer_task = False
    if is_bundle(path):
        model = load_bundle(path, torch_device, amp)
    elif path.is_dir():
        raise ModelError(f"{path}: folder is not a MONAI bundle (no configs/ folder inside)")
    elif path.suffix.lower() in SPEC_SUFFIXES:
        model = load_spec(path, torch_device, amp)
    else:
        model, infer_task = load_torchscript(path, torch_device, amp)
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
