"""Loading weights without unpickling untrusted code."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import ModelError

CONVERT_HINT = (
    "if you trust the file, convert it once in Python: "
    "torch.save(torch.load(path, weights_only=False).state_dict(), 'model_state.pt')"
)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict with ``torch.load(weights_only=True)``.

    Accepts a plain state dict or one nested under ``"state_dict"``/``"model"``/``"network"`` (common in
    checkpoints). A file that needs full unpickling (a pickled module or arbitrary objects) is refused:
    unpickling can run any code the file's author chose.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found; check the model folder or the spec's 'weights' entry")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(
            f"{path}: refused: it is not a plain weights file and loading it would unpickle arbitrary code "
            f"(a security risk); {CONVERT_HINT}"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ModelError(f"{path}: cannot read weights ({str(error).splitlines()[0][:160]}); the file may be truncated") from None
    if isinstance(payload, dict):
        for key in ("state_dict", "model", "network"):
            if key in payload and isinstance(payload[key], dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ModelError(f"{path}: holds no state dict (name → tensor); {CONVERT_HINT}")
    return payload


def apply_state_dict(network: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state`` into ``network`` strictly, with a message naming what does not fit."""
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        result = network.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        detail = " ".join(str(error).split())[:200]
        raise ModelError(f"{source}: weights do not fit the network ({detail}); check the network arguments") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ModelError(
            f"{source}: weights do not fit the network ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); check the network arguments in the config"
        )
