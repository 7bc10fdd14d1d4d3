"""Reading the parts of a model description shared by bundles and specs."""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import ModelError
from .base import SlidingWindow

#: Transforms that read files or add the channel axis; XAIOverlay reads volumes itself (SimpleITK,
#: geometry kept) and hands the transforms a channel-first MetaTensor, so these are skipped.
LOADING_TRANSFORMS = ("LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd", "AddChannel", "AddChanneld")


def target_name(item: Any) -> str:
    """``"monai.transforms.Spacingd"`` or ``"Spacingd"`` → ``"Spacingd"``; non-components → ``""``."""
    if isinstance(item, dict) and isinstance(item.get("_target_"), str):
        return item["_target_"].rsplit(".", 1)[-1]
    return ""


def without_loading(transforms: Iterable[Any]) -> list[Any]:
    return [t for t in transforms if target_name(t) not in LOADING_TRANSFORMS]


def image_key(transforms: Iterable[Any], default: str = "image") -> str:
    """The dictionary key the preprocessing loads the image under (``LoadImaged(keys=...)``)."""
    for item in transforms:
        if target_name(item) == "LoadImaged":
            keys = item.get("keys", default)
            if isinstance(keys, (list, tuple)):
                keys = keys[0]
            if isinstance(keys, str) and not keys.startswith(("@", "$")):
                return keys
    return default


def activation_from_postprocessing(transforms: Iterable[Any]) -> str | None:
    """``"softmax"``/``"sigmoid"`` when the postprocessing applies one (``Activations[d]``), else None."""
    for item in transforms:
        if target_name(item) in ("Activations", "Activationsd"):
            if item.get("softmax") is True:
                return "softmax"
            if item.get("sigmoid") is True:
                return "sigmoid"
    return None


def sliding_window_from(inferer: Any) -> SlidingWindow | None:
    """A :class:`SlidingWindow` from a parsed MONAI ``SlidingWindowInferer`` (None for others)."""
    if inferer is None or type(inferer).__name__ != "SlidingWindowInferer":
        return None
    roi = tuple(int(r) for r in inferer.roi_size)
    if len(roi) != 3 or min(roi) <= 0:
        raise ModelError(f"sliding-window roi_size {roi} is not a 3D window size; set all three sizes in the config")
    overlap = inferer.overlap
    if isinstance(overlap, (list, tuple)):
        overlap = float(overlap[0])
    mode = getattr(inferer.mode, "value", inferer.mode)
    sigma = inferer.sigma_scale
    if isinstance(sigma, (list, tuple)):
        sigma = float(sigma[0])
    return SlidingWindow(roi, float(overlap), str(mode), float(sigma), int(inferer.sw_batch_size))


def class_names_from_metadata(metadata: dict) -> list[str]:
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    for output in outputs.values():
        channel_def = output.get("channel_def") if isinstance(output, dict) else None
        if isinstance(channel_def, dict) and channel_def:
            return [str(channel_def[k]) for k in sorted(channel_def, key=lambda k: int(k))]
        if isinstance(output, dict) and isinstance(output.get("num_channels"), int):
            return [f"class {i}" for i in range(output["num_channels"])]
    return []


def first_conv_in_channels(network: Any) -> int | None:
    """Input channels of the first convolution in module order (fallback when nothing declares it)."""
    import torch

    for module in network.modules():
        if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            return int(module.in_channels)
    return None


def int_shape(shape: Any) -> tuple[int, int, int] | None:
    if isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape):
        return tuple(shape)
    return None
