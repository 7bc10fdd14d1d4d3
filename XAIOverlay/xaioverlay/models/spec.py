"""A state dict plus a small network spec (YAML or JSON) — pure data, no code is evaluated.

Example ``model.yaml``::

    network:                      # a class of monai.networks.nets and its arguments
      name: UNet
      args: {spatial_dims: 3, in_channels: 1, out_channels: 2, channels: [8, 16, 32], strides: [2, 2]}
    weights: model.pt             # state dict, relative to this file; loaded with weights_only=True
    task: segmentation            # or classification
    activation: softmax           # softmax | sigmoid | none
    class_names: [background, tumour]
    preprocessing:                # monai.transforms dictionary transforms, applied to key "image"
      - {name: Orientationd, args: {keys: image, axcodes: RAS}}
      - {name: Spacingd, args: {keys: image, pixdim: [1.5, 1.5, 2.0]}}
      - {name: NormalizeIntensityd, args: {keys: image, nonzero: true}}
    sliding_window: {roi_size: [96, 96, 96], overlap: 0.25, mode: gaussian}   # optional
    input_shape: [96, 96, 96]     # optional: for listing layers without a volume

``{_target_: UNet, spatial_dims: 3, ...}`` (MONAI's config style) is accepted as well. Loading and
channel-first steps (``LoadImaged``, ``EnsureChannelFirstd``) are skipped: volumes are read with their
geometry by XAIOverlay.

A spec stays data: the network is a class of ``monai.networks.nets`` that downloads nothing (no
``pretrained``), and preprocessing uses only :data:`SPEC_TRANSFORMS` — spatial, intensity and type
steps; nothing that writes files, logs, downloads or takes code (``SaveImaged``, ``DataStatsd``,
``Lambdad``). Anything else needs a MONAI bundle, whose config is code (trusted sources only).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import ModelError
from . import config
from .base import LoadedModel, SlidingWindow, file_digest, read_mapping
from .weights import apply_state_dict, load_state_dict

SPEC_SUFFIXES = (".yaml", ".yml", ".json")

#: The ``monai.transforms`` a spec's preprocessing may name (loading steps are skipped).
SPEC_TRANSFORMS = (
    *config.LOADING_TRANSFORMS,
    "Orientationd", "Spacingd", "Resized", "SpatialPadd", "DivisiblePadd", "BorderPadd", "CenterSpatialCropd",
    "SpatialCropd", "CropForegroundd", "ResizeWithPadOrCropd", "Flipd", "Rotate90d",
    "ScaleIntensityRanged", "ScaleIntensityRangePercentilesd", "ScaleIntensityd", "NormalizeIntensityd",
    "ThresholdIntensityd", "ShiftIntensityd", "ClipIntensityPercentilesd",
    "EnsureTyped", "CastToTyped", "ToTensord", "Identityd",
)


def read_spec(path: Path) -> dict:
    return read_mapping(path, yaml.safe_load, (yaml.YAMLError,), "YAML/JSON",
                        "a model spec must be a mapping with 'network' and 'weights'")


def _refuse_code(value: Any, where: str, path: Path) -> None:
    if isinstance(value, str) and value.startswith(("$", "@", "%")):
        raise ModelError(f"{path}: {where} holds an expression ({value[:40]!r}); specs are data only, give literal values")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_code(item, f"{where}.{key}", path)
    if isinstance(value, list):
        for item in value:
            _refuse_code(item, where, path)


def component(entry: Any, namespace: Any, kind: str, path: Path) -> tuple[str, dict]:
    """``{name, args}`` or ``{_target_, **args}`` → (class name in ``namespace``, arguments)."""
    if not isinstance(entry, dict):
        raise ModelError(f"{path}: each {kind} must be a mapping like {{name: ..., args: {{...}}}}")
    if "_target_" in entry:
        name = config.target_name(entry)
        args = {k: v for k, v in entry.items() if not k.startswith("_")}
    else:
        name, args = entry.get("name"), entry.get("args", {}) or {}
    if not isinstance(name, str) or not hasattr(namespace, name):
        raise ModelError(f"{path}: unknown {kind} {name!r}; name a class of {namespace.__name__}")
    _refuse_code(args, f"{kind} {name}", path)
    return name, dict(args)


def build_transforms(entries: list, path: Path):
    """A ``monai.transforms.Compose`` from spec entries (loading steps skipped; only :data:`SPEC_TRANSFORMS`)."""
    import monai.transforms

    items = []
    for entry in entries or []:
        name, args = component(entry, monai.transforms, "transform", path)
        if name not in SPEC_TRANSFORMS:
            raise ModelError(
                f"{path}: transform {name} is not allowed in a data-only spec (it may write, download or run code); "
                f"allowed: {', '.join(SPEC_TRANSFORMS)}; use a MONAI bundle from a trusted source for anything else"
            )
        if name in config.LOADING_TRANSFORMS:
            continue
        try:
            items.append(getattr(monai.transforms, name)(**args))
        except TypeError as error:
            raise ModelError(f"{path}: bad arguments for {name}: {error}") from None
    return monai.transforms.Compose(items) if items else None


def check_network(cls: Any, name: str, args: dict, path: Path) -> None:
    """Refuse what is not a network class, or a network that would download weights when built
    (an argument about pretrained weights or a URL that is set, by the spec or by default)."""
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ModelError(f"{path}: {name} is not a network class of monai.networks.nets; name one, e.g. UNet")
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}
    for key, value in {**defaults, **args}.items():
        if ("pretrain" in key.lower() or "url" in key.lower()) and value:
            raise ModelError(
                f"{path}: network {name} with {key}={value!r} would download weights; a spec is data only: "
                f"set {key}: false and give the trained weights in 'weights'"
            )


def load_spec(path: Path, device: torch.device, amp: bool = False) -> LoadedModel:
    import monai.networks.nets

    spec = read_spec(path)
    for key in ("network", "weights"):
        if key not in spec:
            raise ModelError(f"{path}: the spec needs a '{key}' entry (see the README's model spec example)")
    name, args = component(spec["network"], monai.networks.nets, "network", path)
    check_network(getattr(monai.networks.nets, name), name, args, path)
    try:
        network = getattr(monai.networks.nets, name)(**args)
    except TypeError as error:
        raise ModelError(f"{path}: bad arguments for {name}: {error}") from None
    weights = (path.parent / spec["weights"]).resolve()
    apply_state_dict(network, load_state_dict(weights), weights)

    window = spec.get("sliding_window")
    sliding_window = None
    if window:
        roi = window.get("roi_size") if isinstance(window, dict) else None
        if config.int_shape(roi) is None:
            raise ModelError(f"{path}: sliding_window needs roi_size as three positive integers")
        sliding_window = SlidingWindow(
            tuple(roi), float(window.get("overlap", 0.25)), str(window.get("mode", "constant")),
            float(window.get("sigma_scale", 0.125)), int(window.get("sw_batch_size", 1)),
        )
    in_channels = spec.get("in_channels") or args.get("in_channels") or args.get("n_input_channels") \
        or config.first_conv_in_channels(network) or 1
    return LoadedModel(
        network=network.to(device),
        device=device,
        task=spec.get("task", "segmentation"),
        class_names=[str(n) for n in spec.get("class_names", [])],
        in_channels=int(in_channels),
        activation=spec.get("activation", "none"),
        transforms=build_transforms(spec.get("preprocessing", []), path),
        sliding_window=sliding_window,
        example_shape=example_shape(spec, args, sliding_window),
        source=path,
        format="state-dict+spec",
        model_id=f"{path.stem}@{file_digest(weights)[:12]}",
        amp=amp,
    )


def example_shape(spec: dict, args: dict, sliding_window: SlidingWindow | None) -> tuple[int, int, int]:
    """The input size to probe layers with when no volume is given: the spec's ``input_shape``, else the sliding
    window, else the network's own fixed ``img_size`` (UNETR, ViT: their position embeddings fix it), else 64³."""
    return (config.int_shape(spec.get("input_shape")) or (sliding_window.roi_size if sliding_window else None)
            or config.int_shape(args.get("img_size")) or (64, 64, 64))
