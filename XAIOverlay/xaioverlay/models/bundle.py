"""MONAI bundles (Model Zoo layout), read with MONAI's own ``ConfigParser``.

A bundle's configs are code by MONAI's design (``$`` expressions are evaluated): load bundles from
sources you trust. Its weights are still read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml

from ..errors import ModelError
from . import config
from .base import CLASSIFICATION, SEGMENTATION, LoadedModel, file_digest
from .weights import apply_state_dict, load_state_dict

log = logging.getLogger(__name__)


def _config_file(path: Path, stem: str) -> Path | None:
    for suffix in (".json", ".yaml", ".yml"):
        candidate = path / "configs" / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _task(metadata: dict, sliding_window: bool) -> str:
    declared = metadata.get("xaioverlay", {}).get("task")
    if declared:
        return declared
    for output in metadata.get("network_data_format", {}).get("outputs", {}).values():
        if isinstance(output, dict) and output.get("type") == "image":
            return SEGMENTATION
        if isinstance(output, dict) and output.get("type") in ("probabilities", "logits", "vector"):
            return CLASSIFICATION
    return SEGMENTATION if sliding_window else CLASSIFICATION


def _read_config(path: Path) -> dict:
    """A bundle config file read as UTF-8 (MONAI's own reader uses the system's encoding: cp1252 on Windows)."""
    try:
        text = path.read_text(encoding="utf-8")
        content = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelError(f"{path}: cannot parse the bundle config ({str(error)[:160]})") from None
    if not isinstance(content, dict):
        raise ModelError(f"{path}: a bundle config must hold a mapping")
    return content


def load_bundle(path: Path, device: torch.device, amp: bool = False) -> LoadedModel:
    """Load a MONAI bundle directory (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``)."""
    from monai.bundle import ConfigParser

    inference = _config_file(path, "inference")
    if inference is None:
        raise ModelError(f"{path}: not a MONAI bundle: configs/inference.json is missing")
    metadata_file = _config_file(path, "metadata")
    parser = ConfigParser()
    parser.read_config(_read_config(inference))
    if metadata_file is not None:
        parser.read_meta(_read_config(metadata_file))
    metadata = parser.get("_meta_", {}) or {}
    parser["bundle_root"] = str(path)
    parser["device"] = device
    if "network_def" not in parser:
        raise ModelError(f"{inference}: has no 'network_def'; XAIOverlay needs the network definition, not only TorchScript")

    # The config must be edited before anything is parsed: the parser resolves the whole config once.
    preprocessing = parser.get("preprocessing")
    key = "image"
    has_preprocessing = preprocessing is not None
    if isinstance(preprocessing, dict) and isinstance(preprocessing.get("transforms"), list):
        key = config.image_key(preprocessing["transforms"])
        parser["preprocessing"]["transforms"] = config.without_loading(preprocessing["transforms"])
    elif has_preprocessing:
        raise ModelError(
            f"{inference}: 'preprocessing' is not a Compose with a 'transforms' list; XAIOverlay cannot separate its loading step"
        )
    try:
        network = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as error:
        raise ModelError(f"{inference}: cannot build 'network_def' ({str(error).splitlines()[0][:160]})") from None
    weights = path / "models" / "model.pt"
    if not weights.is_file():
        if (path / "models" / "model.ts").is_file():
            raise ModelError(f"{path}: has only models/model.ts; load that file directly (TorchScript) or add models/model.pt")
        raise ModelError(f"{path}: models/model.pt is missing")
    apply_state_dict(network, load_state_dict(weights), weights)

    transforms = parser.get_parsed_content("preprocessing", instantiate=True) if has_preprocessing else None

    inferer = parser.get_parsed_content("inferer", instantiate=True) if "inferer" in parser else None
    sliding_window = config.sliding_window_from(inferer)
    post = parser.get("postprocessing")
    post_list = post.get("transforms", []) if isinstance(post, dict) else []
    activation = metadata.get("xaioverlay", {}).get("activation") or config.activation_from_postprocessing(post_list) or "none"

    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    first_input = next(iter(inputs.values()), {}) if inputs else {}
    in_channels = first_input.get("num_channels") or config.first_conv_in_channels(network) or 1
    example = config.int_shape(first_input.get("spatial_shape")) or (
        sliding_window.roi_size if sliding_window else (96, 96, 96)
    )
    class_names = config.class_names_from_metadata(metadata)
    return LoadedModel(
        network=network.to(device),
        device=device,
        task=_task(metadata, sliding_window is not None),
        class_names=class_names,
        in_channels=int(in_channels),
        activation=activation,
        transforms=transforms,
        image_key=key,
        sliding_window=sliding_window,
        example_shape=example,
        source=path,
        format="monai-bundle",
        model_id=f"{metadata.get('name', path.name)}@{file_digest(weights)[:12]}",
        amp=amp,
    )
