"""Finding layers inside a network: listing candidates, the automatic default, lookup by name."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from .errors import ModelError
from .models.base import CLASSIFICATION, LoadedModel


@dataclass(frozen=True)
class LayerInfo:
    """One module as seen in a forward pass."""

    name: str
    type: str
    output_shape: tuple[int, ...]
    calls: int

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.output_shape[2:]


def trace_layers(model: LoadedModel, x: torch.Tensor | None = None) -> list[LayerInfo]:
    """Every named module with its output shape, in the order the modules *finish* in one forward pass.

    A container finishes after its children, so among modules producing the same feature map the
    outermost block comes last.
    """
    if not model.internals_available:
        raise ModelError(f"{model.source}: a TorchScript model hides its layers; load it as a MONAI bundle or state dict + spec to list them")
    x = model.example_input() if x is None else x
    finished: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    types: dict[str, str] = {}
    handles = []
    for name, module in model.network.named_modules():
        if not name:
            continue

        def hook(module, inputs, output, name=name):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape)
            if name in finished:
                finished.remove(name)
            finished.append(name)
            types[name] = type(module).__name__

        handles.append(module.register_forward_hook(hook))
    observed_forward(model, x, handles)
    return [LayerInfo(n, types[n], shapes.get(n, ()), calls[n]) for n in finished]


def observed_forward(model: LoadedModel, x: torch.Tensor, handles: list) -> None:
    """One inference pass of ``x`` (1, C, X, Y, Z) with the hooks ``handles`` attached, then removed
    (also on error). The model's pass counters stay as they were: looking at a network is not
    explaining it."""
    counted = model.passes.as_dict()
    try:
        with torch.inference_mode():
            model.forward(x)
    finally:
        for handle in handles:
            handle.remove()
        model.passes.forward, model.passes.backward = counted["forward"], counted["backward"]


def candidate_layers(model: LoadedModel, x: torch.Tensor | None = None) -> list[LayerInfo]:
    """Layers a CAM can use: run once per forward, output a (B, K, X, Y, Z) map with more than one voxel."""
    return [
        layer for layer in trace_layers(model, x)
        if len(layer.output_shape) == 5 and layer.calls == 1 and max(layer.spatial_shape) > 1
    ]


def default_layer(model: LoadedModel, x: torch.Tensor | None = None) -> str:
    """The automatic CAM layer.

    - Classifier: the last feature map before pooling — the last-finishing candidate layer.
    - Segmenter: the last feature map below full resolution — the last-finishing candidate whose
      spatial size is smaller than the input's along every axis (the final decoder stage before the
      last upsampling); if there is none, the last candidate.
    """
    layers = candidate_layers(model, x)
    if not layers:
        raise ModelError(f"{model.source}: no layer produces a 3D feature map; CAM methods cannot run on this network")
    if model.task == CLASSIFICATION:
        return layers[-1].name
    full = tuple((model.example_input() if x is None else x).shape[2:])
    below = [layer for layer in layers if all(s < f for s, f in zip(layer.spatial_shape, full))]
    return (below or layers)[-1].name


def find_module(network: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule called ``name``; an unknown name lists close matches."""
    modules = dict(network.named_modules())
    if name in modules and name:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=4, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else "run 'xaioverlay layers --model ...' to list layers"
    raise ModelError(f"unknown layer {name!r}; {hint}")
