"""Layers seen as affine maps, the form every LRP rule works on.

A layer with a rule is written ``z = s ⊙ L(x) + t``:

- ``L`` is the bias-free linear part: a convolution, transposed convolution or dense layer with its
  weight ``W`` (or the identity for an element-wise layer such as a normalisation on its own);
- ``s`` is a per-sample, per-channel scale (B, C, 1, ...) from a normalisation folded into the layer
  (None when there is none);
- ``t`` is the shift: the layer's bias, plus the normalisation's shift when one is folded in.

A normalisation becomes such a scale and shift by detaching its statistics: for a given input its
output is then an affine map of each channel (see :func:`norm_scale_shift`).

The rules need the *contributions* ``z_jk = s_k W_kj x_j`` split by sign. Their sums are computed with
convolutions on the positive and negative parts of inputs and weights (:meth:`Affine.contributions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVOLUTIONS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
DENSE = (nn.Linear,)
LINEAR_LAYERS = CONVOLUTIONS + TRANSPOSED_CONVOLUTIONS + DENSE
NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)

#: Which weight ``L`` uses: the layer's own, its positive or negative part, its absolute value, or all
#: ones (flat rule).
WEIGHT_PARTS = ("all", "positive", "negative", "absolute", "ones")


def channel_view(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B, C) or (C,) → broadcastable against a (B, C, ...) tensor with ``ndim`` dimensions."""
    if values.ndim == 1:
        values = values[None]
    return values.reshape(*values.shape[:2], *([1] * (ndim - 2)))


def _weight(weight: torch.Tensor, part: str) -> torch.Tensor:
    if part == "all":
        return weight
    if part == "positive":
        return weight.clamp(min=0)
    if part == "negative":
        return weight.clamp(max=0)
    if part == "absolute":
        return weight.abs()
    if part == "ones":
        return torch.ones_like(weight)
    raise ValueError(f"unknown weight part {part!r}; use one of {WEIGHT_PARTS}")


def linear_part(module: nn.Module | None, x: torch.Tensor, part: str = "all", output_size=None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """``L(x)`` of ``module`` without its bias, with the weight (``module.weight`` unless ``weight`` is
    given) replaced by ``part`` of it.

    ``module`` None is the identity (an element-wise layer); its weight is 1, so its positive part is
    the identity and its negative part is zero.
    """
    if module is None:
        return torch.zeros_like(x) if part == "negative" else x
    weight = _weight((module.weight if weight is None else weight).detach().to(x.dtype), part)
    if isinstance(module, CONVOLUTIONS):
        return module._conv_forward(x, weight, None)
    if isinstance(module, TRANSPOSED_CONVOLUTIONS):
        dims = len(module.kernel_size)
        padding = module._output_padding(x, output_size, module.stride, module.padding, module.kernel_size, dims, module.dilation)
        convolve = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        return convolve(x, weight, None, module.stride, module.padding, padding, module.groups, module.dilation)
    if isinstance(module, DENSE):
        return F.linear(x, weight)
    raise TypeError(f"no linear part for {type(module).__name__}")


def linear_adjoint(module: nn.Module | None, u: torch.Tensor, input_shape, part: str = "all", output_size=None,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """``Lᵀ u``: the vector-Jacobian product of :func:`linear_part` without running it forward.

    Args:
        u: (B, C_out, ...) shaped like the layer's output.
        input_shape: the layer's input shape (B, C_in, ...).
    """
    if module is None:
        return torch.zeros_like(u) if part == "negative" else u
    weight = _weight((module.weight if weight is None else weight).detach().to(u.dtype), part)
    if isinstance(module, CONVOLUTIONS) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return torch.ops.aten.convolution_backward(
            u, u.new_empty(1).expand(tuple(input_shape)), weight, None, module.stride,
            module.padding, module.dilation, False, [0] * len(module.kernel_size), module.groups, [True, False, False],
        )[0]
    if isinstance(module, TRANSPOSED_CONVOLUTIONS):
        convolve = (F.conv1d, F.conv2d, F.conv3d)[len(module.kernel_size) - 1]
        return convolve(u, weight, None, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, DENSE):
        return u @ weight
    # anything else (e.g. reflect padding): autograd through a forward pass
    x = torch.zeros(input_shape, device=u.device, dtype=u.dtype, requires_grad=True)
    with torch.enable_grad():
        out = linear_part(module, x, part, output_size, weight)
    return torch.autograd.grad(out, x, u)[0]


def scaled_weight(module: nn.Module, scale: torch.Tensor) -> torch.Tensor | None:
    """``module``'s weight with each output channel multiplied by ``scale`` (B, C, 1, ...), when one
    weight serves the whole batch (batch of 1, or BatchNorm's running statistics); None otherwise."""
    if scale.shape[0] > 1 and not bool((scale == scale[:1]).all()):
        return None
    factors = scale[0].reshape(-1).float()
    weight = module.weight.detach().float()
    if isinstance(module, TRANSPOSED_CONVOLUTIONS):  # weight (C_in, C_out / groups, k...)
        if module.groups != 1:
            return None
        return weight * factors.reshape(1, -1, *([1] * (weight.ndim - 2)))
    return weight * factors.reshape(-1, *([1] * (weight.ndim - 1)))  # (C_out, ...)


@dataclass
class Affine:
    """One call of a layer as ``z = scale ⊙ L(x) + shift`` (see the module docstring).

    Attributes:
        module: the convolution / dense layer giving ``L``; None for an element-wise layer.
        scale: None or broadcastable (B, C, 1, ...) factor of a folded normalisation.
        shift: None or broadcastable (1 or B, C, 1, ...) shift (bias and folded normalisation).
        output_size: a transposed convolution's requested output size (usually None).
        weight: the weight of ``L`` if not ``module.weight`` (a scale already multiplied in).
    """

    module: nn.Module | None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    output_size: object = None
    weight: torch.Tensor | None = None

    @classmethod
    def folded(cls, module: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None, output_size=None) -> "Affine":
        """``scale ⊙ L(x) + shift``, with the scale multiplied into the weight when the batch allows
        (the same map, computed with one convolution per weight part instead of two)."""
        weight = scaled_weight(module, scale)
        if weight is None:
            return cls(module, scale, shift, output_size)
        return cls(module, None, shift, output_size, weight)

    def linear(self, x: torch.Tensor, part: str = "all") -> torch.Tensor:
        """``L`` with ``part`` of the weight, not scaled: (B, C_in, ...) → (B, C_out, ...)."""
        return linear_part(self.module, x, part, self.output_size, self.weight)

    def adjoint(self, u: torch.Tensor, input_shape, part: str = "all") -> torch.Tensor:
        """``Lᵀ u`` for ``part`` of the weight, not scaled (see :func:`linear_adjoint`)."""
        return linear_adjoint(self.module, u, input_shape, part, self.output_size, self.weight)

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """``s ⊙ L(x)``, the output without its shift."""
        z = self.linear(x)
        return z if self.scale is None else self.scale * z

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """``z = s ⊙ L(x) + t``."""
        z = self.scaled(x)
        return z if self.shift is None else z + self.shift

    def contributions(self, x: torch.Tensor, need_negative: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sums of the positive and of the negative contributions ``z_jk`` to each output.

        With ``P(x) = L⁺(x⁺) + L⁻(x⁻)`` and ``N(x) = L⁺(x⁻) + L⁻(x⁺)`` (``L⁺``, ``L⁻``: positive and
        negative weights), a folded scale ``s`` swaps them where it is negative:
        ``P' = s⁺P + s⁻N``, ``N' = s⁺N + s⁻P``. Both are positively homogeneous in ``x``, so
        ``x ⊙ ∂P'/∂x`` (a vector-Jacobian product) splits P' back onto the inputs.

        Returns:
            (P', N'), each shaped like the output; N' is None when not needed and not required.
        """
        has_negative_inputs = bool((x < 0).any())
        has_negative_scale = self.scale is not None and bool((self.scale < 0).any())
        positive_x = x.clamp(min=0) if has_negative_inputs else x
        positive = self.linear(positive_x, "positive")
        negative = self.linear(positive_x, "negative") if (need_negative or has_negative_scale) else None
        if has_negative_inputs:
            negative_x = x.clamp(max=0)
            positive = positive + self.linear(negative_x, "negative")
            if negative is not None:
                negative = negative + self.linear(negative_x, "positive")
        if self.scale is None:
            return positive, negative
        if not has_negative_scale:
            return self.scale * positive, None if negative is None else self.scale * negative
        up, down = self.scale.clamp(min=0), self.scale.clamp(max=0)
        return up * positive + down * negative, up * negative + down * positive

    def bound_terms(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """``Σ_j l_j w'⁺_jk + h_j w'⁻_jk`` for the effective weights ``w' = s ⊙ W`` (the z^B rule)."""
        low_up, low_down = self.linear(low, "positive"), self.linear(low, "negative")
        high_up, high_down = self.linear(high, "positive"), self.linear(high, "negative")
        if self.scale is None:
            return low_up + high_down
        up, down = self.scale.clamp(min=0), self.scale.clamp(max=0)
        return up * (low_up + high_down) + down * (low_down + high_up)


def norm_scale_shift(module: nn.Module, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalisation layer as a per-sample, per-channel affine map of its input, statistics detached.

    For BatchNorm in eval mode the statistics are the running ones (a constant map); for InstanceNorm
    and GroupNorm (and BatchNorm in training mode) they are this input's, as the layer computes them.

    Args:
        v: the layer's input, (B, C, ...).
    Returns:
        (scale, shift), each (B, C): ``module(v) == scale ⊙ v + shift`` up to rounding.
    """
    v = v.detach()
    batch, channels = v.shape[:2]
    if isinstance(module, nn.GroupNorm):
        grouped = v.reshape(batch, module.num_groups, -1).float()
        var, mean = torch.var_mean(grouped, dim=2, unbiased=False)
        per_group = channels // module.num_groups
        mean = mean.repeat_interleave(per_group, dim=1)
        var = var.repeat_interleave(per_group, dim=1)
    else:
        batch_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        running = module.running_mean is not None and not module.training
        if running:
            mean = module.running_mean.float().expand(batch, channels)
            var = module.running_var.float().expand(batch, channels)
        elif batch_norm:  # batch statistics, shared by all samples
            var, mean = torch.var_mean(v.transpose(0, 1).reshape(channels, -1).float(), dim=1, unbiased=False)
            mean, var = mean.expand(batch, channels), var.expand(batch, channels)
        else:  # instance statistics
            var, mean = torch.var_mean(v.reshape(batch, channels, -1).float(), dim=2, unbiased=False)
    scale = torch.rsqrt(var + module.eps)
    shift = -mean * scale
    if module.weight is not None:
        scale = scale * module.weight.float()
        shift = shift * module.weight.float()
    if module.bias is not None:
        shift = shift + module.bias.float()
    return scale.to(v.dtype), shift.to(v.dtype)


def layer_norm_scale_shift(v: torch.Tensor, shape: tuple[int, ...], weight: torch.Tensor | None,
                           bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer normalisation over the last ``len(shape)`` dimensions as an element-wise affine map of its
    input, statistics (each token's mean and standard deviation) detached.

    Args:
        v: the input, (..., *shape), e.g. (B, N, C) tokens with ``shape`` = (C,).
    Returns:
        (scale, shift), broadcastable against ``v``: ``layer_norm(v) == scale ⊙ v + shift`` up to rounding.
    """
    v = v.detach().float()
    dims = tuple(range(v.ndim - len(shape), v.ndim))
    var, mean = torch.var_mean(v, dim=dims, unbiased=False, keepdim=True)
    scale = torch.rsqrt(var + eps)
    shift = -mean * scale
    if weight is not None:
        scale = scale * weight.detach().float()
        shift = shift * weight.detach().float()
    if bias is not None:
        shift = shift + bias.detach().float()
    return scale, shift
