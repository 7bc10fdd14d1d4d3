"""Finding layers inside a network: listing candidates, the automatic default, lookup by name."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from .errors import ModelError
from .models.base import CLASSIFICATION, LoadedModel

#: Transformer blocks whose output is a sequence of patch tokens (B, N, C): listed for the CAMs as the
#: feature map (B, C, *grid) those tokens form (a leading class token dropped), see :func:`tokens_to_map`.
TOKEN_BLOCKS = ("TransformerBlock",)
#: Blocks whose insides are not feature maps a CAM can read, even where a tensor has five dimensions:
#: a transformer block's tokens and rearranged queries/keys/values, a Swin stage's channel-last
#: (B, D, H, W, C) blocks and patch merging. The block's own output is listed (tokens as a map; a Swin
#: stage's output is channel-first again).
OPAQUE_BLOCKS = ("TransformerBlock", "BasicLayer")


def patch_size(network: torch.nn.Module) -> tuple[int, int, int]:
    """The patch size of MONAI's ``PatchEmbeddingBlock`` (convolution or perceptron projection)."""
    blocks = [m for m in network.modules() if type(m).__name__ == "PatchEmbeddingBlock"]
    if len(blocks) != 1:
        raise ModelError(f"placing patch tokens needs one PatchEmbeddingBlock; this network has {len(blocks)}")
    embedding = blocks[0].patch_embeddings
    if isinstance(embedding, torch.nn.Conv3d):
        return tuple(int(k) for k in embedding.kernel_size)
    lengths = dict(getattr(embedding[0], "axes_lengths", {}))  # perceptron: einops Rearrange with p1, p2, p3
    return tuple(int(lengths[f"p{axis}"]) for axis in (1, 2, 3))


def token_grid(network: torch.nn.Module, spatial_shape) -> tuple[int, int, int]:
    """The patch-token grid of a ViT-style network for an input of ``spatial_shape``."""
    return tuple(s // p for s, p in zip(spatial_shape, patch_size(network)))


def tokens_to_map(tokens: torch.Tensor, grid) -> torch.Tensor:
    """Patch tokens as a feature map: (B, N, C) with N = Π grid (or one more, a class token first) →
    (B, C, *grid)."""
    count = grid[0] * grid[1] * grid[2]
    if tokens.shape[1] not in (count, count + 1):
        raise ModelError(f"{tokens.shape[1]} tokens do not form the {'x'.join(map(str, grid))} patch grid")
    return tokens[:, tokens.shape[1] - count:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


@dataclass(frozen=True)
class LayerInfo:
    """One module as seen in a forward pass."""

    name: str
    type: str
    output_shape: tuple[int, ...]
    calls: int
    tokens: bool = False  # a transformer block's tokens, shown as the feature map they form

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
    tokenised: set[str] = set()
    handles = []
    for name, module in model.network.named_modules():
        if not name:
            continue

        def hook(module, inputs, output, name=name):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape)
                if type(module).__name__ in TOKEN_BLOCKS and output.ndim == 3:
                    shapes[name] = tuple(tokens_to_map(output[:1], token_grid(model.network, x.shape[2:])).shape)
                    tokenised.add(name)
            if name in finished:
                finished.remove(name)
            finished.append(name)
            types[name] = type(module).__name__

        handles.append(module.register_forward_hook(hook))
    observed_forward(model, x, handles)
    return [LayerInfo(n, types[n], shapes.get(n, ()), calls[n], n in tokenised) for n in finished]


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
    """Layers a CAM can use: run once per forward, output a (B, K, X, Y, Z) map with more than one voxel
    (transformer blocks' tokens as the map they form; nothing inside them or a Swin stage)."""
    inside = tuple(f"{name}." for name, module in model.network.named_modules()
                   if name and type(module).__name__ in OPAQUE_BLOCKS)
    return [
        layer for layer in trace_layers(model, x)
        if len(layer.output_shape) == 5 and layer.calls == 1 and max(layer.spatial_shape) > 1
        and not (inside and layer.name.startswith(inside))
    ]


def default_layer(model: LoadedModel, x: torch.Tensor | None = None) -> str:
    """The automatic CAM layer.

    - Classifier: the last feature map before pooling — the last-finishing candidate layer (for a
      ViT with a class token: the tokens entering its last block).
    - Segmenter: the last feature map below full resolution — the last-finishing candidate whose
      spatial size is smaller than the input's along every axis (the final decoder stage before the
      last upsampling; for UNETR and SwinUNETR a convolutional decoder block); if there is none, the
      last candidate.
    """
    layers = candidate_layers(model, x)
    if not layers:
        raise ModelError(f"{model.source}: no layer produces a 3D feature map; CAM methods cannot run on this network")
    if model.task == CLASSIFICATION:
        if layers[-1].tokens and hasattr(model.network, "cls_token") and len(layers) > 1:
            # a ViT reads its decision from the class token after the last block, so that block's patch
            # tokens never reach the output (zero gradient): the tokens entering it instead
            return layers[-2].name
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
