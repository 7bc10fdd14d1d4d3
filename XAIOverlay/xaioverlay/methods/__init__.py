"""Explanation methods. Adding one: write a :class:`Method` subclass and list it in ``REGISTRY``.

Method specs (CLI ``--methods``, comma-separated): ``name`` or ``name:option``, e.g.
``gradcam``, ``gradcam:features.layer4``, ``hirescam``, ``lrp:epsilon-gamma-box``, ``lrp:zero/uniform``, ``ig:32``,
``occlusion:20mm/10mm``, ``occlusion-adaptive:400``, ``attention``, ``attention:level=1``, ``shap:16``,
``kernelshap:1000``, ``lime:500``, ``shap-guided:16``.
"""

from __future__ import annotations

import difflib

from ..errors import InputError
from .attention import Attention
from .base import Attribution, Method
from .cam import GradCAM, GradCAMPlusPlus, HiResCAM
from .coalitions import GuidedShap, KernelShap, LimeMethod, Shap
from .gradients import GradientTimesInput, IntegratedGradients
from .lrp import LRP
from .occlusion import AdaptiveOcclusion, Occlusion

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        GradCAM, GradCAMPlusPlus, HiResCAM, LRP, GradientTimesInput, IntegratedGradients, Attention, Occlusion,
        AdaptiveOcclusion, Shap, KernelShap, LimeMethod, GuidedShap,
    )
}


def split_specs(text: str) -> list[str]:
    """``"gradcam, lrp:epsilon-gamma-box"`` → ``["gradcam", "lrp:epsilon-gamma-box"]``."""
    return [part.strip() for part in text.split(",") if part.strip()]


def build_method(spec: str, *, layer: str | None = None) -> Method:
    """One method from its spec ``name[:option]``."""
    name, _, option = spec.partition(":")
    name = name.strip().lower()
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise InputError(f"unknown method {name!r}; {hint}available: {', '.join(REGISTRY)}")
    return REGISTRY[name].from_option(option.strip() or None, layer=layer)


def build_methods(specs: str | list[str], *, layer: str | None = None) -> list[Method]:
    items = split_specs(specs) if isinstance(specs, str) else list(specs)
    if not items:
        raise InputError(f"no method given; pass --methods with one or more of: {', '.join(REGISTRY)}")
    return [build_method(spec, layer=layer) for spec in items]


__all__ = ["Attribution", "Method", "REGISTRY", "build_method", "build_methods", "split_specs"]
