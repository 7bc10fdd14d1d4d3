"""TorchScript models: run as a black box (no hooks into layers).

An optional sidecar spec (``model.yaml``/``model.json`` beside ``model.ts``, same keys as a state-dict
spec but without ``network``/``weights``) declares task, classes, activation and preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelError
from . import config
from .base import LoadedModel, file_digest
from .spec import SPEC_SUFFIXES, build_transforms, read_spec


def sidecar_spec(path: Path) -> Path | None:
    for suffix in SPEC_SUFFIXES:
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def load_torchscript(path: Path, device: torch.device, amp: bool = False) -> LoadedModel:
    try:
        network = torch.jit.load(str(path), map_location=device)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
        raise ModelError(
            f"{path}: not a TorchScript archive ({first}); if it holds weights only, give a spec file "
            "(.yaml) that names the network and points to these weights"
        ) from None
    side = sidecar_spec(path)
    spec = read_spec(side) if side else {}
    if not side:
        spec["task"] = None
    return LoadedModel(
        network=network,
        device=device,
        task=spec.get("task") or "classification",
        class_names=[str(n) for n in spec.get("class_names", [])],
        in_channels=int(spec.get("in_channels", 1)),
        activation=spec.get("activation", "none"),
        transforms=build_transforms(spec.get("preprocessing", []), side) if side else None,
        internals_available=False,
        example_shape=config.int_shape(spec.get("input_shape")) or (64, 64, 64),
        source=path,
        format="torchscript",
        model_id=f"{path.stem}@{file_digest(path)[:12]}",
        amp=amp,
    ), spec.get("task") is None
