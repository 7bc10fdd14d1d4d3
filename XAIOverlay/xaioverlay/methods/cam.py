"""Class activation maps on volumes: Grad-CAM, Grad-CAM++, HiResCAM.

All three read the activations ``A`` (B, K, x, y, z) of one layer and the gradient ``G`` of the target
with respect to them; they differ only in how they combine the two (:meth:`CAM.combine`). The map is
upsampled trilinearly, on the device, to the model input's spatial shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ModelError
from ..layers import TOKEN_BLOCKS, default_layer, find_module, token_grid, tokens_to_map
from ..models.base import LoadedModel
from ..progress import NO_PROGRESS, Progress
from ..targets import Target
from .base import NO_CONTEXT, Attribution, Context, Method


def gradcam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ReLU(Σ_k mean(G_k) · A_k).

    Args:
        activations, gradients: (B, K, x, y, z).
    Returns:
        (B, 1, x, y, z).
    """
    weights = gradients.mean(dim=(2, 3, 4), keepdim=True)
    return F.relu((weights * activations).sum(1, keepdim=True))


def gradcam_plus_plus(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018), with the 3D sums of its closed form.

    α_k(v) = G_k(v)² / (2 G_k(v)² + Σ_u A_k(u) G_k(v)³), w_k = Σ_v α_k(v) ReLU(G_k(v)),
    map = ReLU(Σ_k w_k A_k). (The paper's exp(score) factor scales every weight equally and is dropped.)

    Args:
        activations, gradients: (B, K, x, y, z).
    Returns:
        (B, 1, x, y, z).
    """
    g2 = gradients.pow(2)
    g3 = gradients.pow(3)
    activation_sum = activations.sum(dim=(2, 3, 4), keepdim=True)
    denominator = 2 * g2 + activation_sum * g3
    denominator = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    alpha = g2 / denominator
    weights = (alpha * F.relu(gradients)).sum(dim=(2, 3, 4), keepdim=True)
    return F.relu((weights * activations).sum(1, keepdim=True))


def hirescam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020): ReLU(Σ_k G_k ⊙ A_k), element-wise, no spatial averaging.

    Args:
        activations, gradients: (B, K, x, y, z).
    Returns:
        (B, 1, x, y, z).
    """
    return F.relu((gradients * activations).sum(1, keepdim=True))


def layer_activation_and_gradient(
    model: LoadedModel, x: torch.Tensor, target: Target, layer: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations of ``layer`` and the target's gradient with respect to them; one forward + backward.
    A transformer block's tokens (B, N, C) are read as the feature map they form (see
    :func:`~xaioverlay.layers.tokens_to_map`).

    Returns:
        (A, G), each (B, K, x, y, z), detached.
    """
    module = find_module(model.network, layer)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, output: captured.append(output))
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # a graph exists even if the weights are frozen
            output = model.forward(x)
            if len(captured) != 1:
                raise ModelError(f"layer {layer!r} runs {len(captured)} times per forward pass; pick a layer that runs once")
            activations = captured[0]
            tokens = type(module).__name__ in TOKEN_BLOCKS and getattr(activations, "ndim", 0) == 3
            if not isinstance(activations, torch.Tensor) or (activations.ndim != 5 and not tokens):
                shape = tuple(activations.shape) if isinstance(activations, torch.Tensor) else type(activations).__name__
                raise ModelError(f"layer {layer!r} outputs {shape}, not a (B, K, X, Y, Z) feature map; pick a convolutional layer")
            score = target(output).sum()
            (gradients,) = torch.autograd.grad(score, activations)
    finally:
        handle.remove()
    if tokens:
        grid = token_grid(model.network, x.shape[2:])
        activations, gradients = tokens_to_map(activations, grid), tokens_to_map(gradients, grid)
    return activations.detach().float(), gradients.float()


class CAM(Method):
    """Shared hooks and upsampling; subclasses pick :meth:`combine`."""

    needs_internals = True
    signed = False

    def __init__(self, layer: str | None = None) -> None:
        self.layer = layer
        self.layer_in_use = layer

    @classmethod
    def from_option(cls, option: str | None, *, layer: str | None = None) -> "CAM":
        return cls(option or layer)

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.layer}" if self.layer else self.name

    @staticmethod
    def combine(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, model: LoadedModel, x: torch.Tensor) -> None:
        self.layer_in_use = self.layer or default_layer(model, x)

    def attribute(self, model: LoadedModel, x: torch.Tensor, target: Target, progress: Progress = NO_PROGRESS,
                  context: Context = NO_CONTEXT) -> Attribution:
        layer = self.layer_in_use or default_layer(model, x)
        activations, gradients = layer_activation_and_gradient(model, x, target, layer)
        cam = self.combine(activations, gradients)
        cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
        progress(1, 1, unit="passes")
        return Attribution(cam[0, 0], signed=False, parameters={"layer": layer, "layer_shape": list(activations.shape[1:])})


class GradCAM(CAM):
    name = "gradcam"
    label = "Grad-CAM"
    summary = "Grad-CAM: channel weights = mean gradient (option: layer name)"
    combine = staticmethod(gradcam)


class GradCAMPlusPlus(CAM):
    name = "gradcampp"
    label = "Grad-CAM++"
    summary = "Grad-CAM++: higher-order channel weights (option: layer name)"
    combine = staticmethod(gradcam_plus_plus)


class HiResCAM(CAM):
    name = "hirescam"
    label = "HiResCAM"
    summary = "HiResCAM: element-wise gradient × activation (option: layer name)"
    combine = staticmethod(hirescam)
