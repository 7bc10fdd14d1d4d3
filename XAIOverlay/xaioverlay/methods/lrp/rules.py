"""LRP rules: how relevance crosses one layer, written as a rewritten gradient.

Convention. Relevance at any tensor ``a`` is ``R(a) = a ⊙ c(a)``, where ``c`` is what flows backwards
through autograd in place of the gradient. Starting from the explained score ``T`` with
``c(y) = ∂T/∂y`` at the network output gives ``R(y) = y ⊙ ∂T/∂y`` (the logit itself for a class
target, the weighted logits over the region for a segmentation target). Then:

- a layer with a rule replaces the gradient by ``c(x)`` such that ``x ⊙ c(x)`` is the rule's
  relevance of its input (:meth:`Rule.gradient`);
- every operation that is linear without bias or piecewise linear and positively homogeneous (ReLU,
  PReLU, LeakyReLU, max/average pooling, trilinear upsampling, concatenation, slicing) keeps its plain
  gradient: for ``y = f(x)`` with ``f(x) = f'(x) x`` the gradient gives ``x ⊙ c(x) = y ⊙ c(y)``, so
  relevance passes unchanged or is routed exactly;
- a sum ``y = a + b`` (a residual connection) keeps its plain gradient too, and that splits relevance
  in proportion to each branch's contribution: ``R(a) = a ⊙ c(y) = (a / y) ⊙ R(y)`` and
  ``R(a) + R(b) = R(y)``, never counted twice.

Each rule sees its layer as ``z = s ⊙ L(x) + t`` (:class:`~.affine.Affine`), its input ``x``, the
incoming ``c(z)`` and the layer's output ``z``; all tensors are (B, C, ...). The vector-Jacobian products
of the (modified) forward maps are taken with autograd, as zennit does.

Rules for the input layer (flat, z^B) give relevance to inputs whatever their value (also to zero
inputs), so they implement :meth:`Rule.relevance` only and are marked ``input_only``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .affine import Affine


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z + ε·sign(z)`` with sign(0) = +1: moves the denominator away from zero."""
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z)


def divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` where the denominator is non-zero, 0 where it is zero."""
    return torch.nan_to_num_(numerator / denominator, nan=0.0, posinf=0.0, neginf=0.0)


def vjp(outputs: list[torch.Tensor], inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``Σ_i (∂outputs_i/∂inputs)ᵀ grad_outputs_i`` for each input (zeros where an input is unused)."""
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_(True)


class Rule:
    """Base class. Subclasses implement :meth:`gradient`, or :meth:`relevance` if ``input_only``."""

    input_only: ClassVar[bool] = False

    def gradient(self, layer: Affine | None, x: torch.Tensor, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``c(x)`` such that ``x ⊙ c(x)`` is the relevance of ``x``, given ``c(z)`` = ``grad``.

        Args:
            layer: the layer as an affine map (None for a non-affine element-wise layer).
            x: the layer's input (B, C_in, ...).
            grad: ``c(z)``, shaped like ``z``.
            z: the layer's output (B, C_out, ...); its relevance is ``z ⊙ grad``.
        """
        raise NotImplementedError

    def relevance(self, layer: Affine | None, x: torch.Tensor, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The relevance of ``x`` itself (B, C_in, ...)."""
        return x * self.gradient(layer, x, grad, z)

    def describe(self) -> str:
        return type(self).__name__.lower()


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-ε: ``R_j = Σ_k z_jk / (z_k + ε·sign z_k) · R_k``; the bias and ε absorb some relevance.

    ``epsilon=0`` is LRP-0: exactly the gradient (no division at all in this convention), so LRP-0 of a
    piecewise-linear network is gradient × input.
    """

    epsilon: float = 1e-6

    def gradient(self, layer, x, grad, z):
        weights = grad if self.epsilon == 0 else grad * divide(z, stabilize(z, self.epsilon))
        if layer.scale is not None:
            weights = weights * layer.scale
        return layer.adjoint(weights, x.shape)

    def describe(self) -> str:
        return f"epsilon({self.epsilon:g})"


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-αβ: ``R_j = Σ_k (α z⁺_jk / Σ_j z⁺_jk − β z⁻_jk / Σ_j z⁻_jk) R_k``, α − β = 1.

    ``z⁺_jk``, ``z⁻_jk``: positive and negative contributions ``s_k W_kj x_j`` (negative inputs, e.g.
    after PReLU or a normalisation, are allowed: a negative input times a negative weight is a positive
    contribution). The bias is not a contribution, so the rule conserves relevance wherever the
    denominators are non-zero. α=1, β=0 is the z⁺ rule.
    """

    alpha: float = 1.0
    beta: float = 0.0

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1) > 1e-9:
            raise ValueError(f"alpha-beta rule needs alpha, beta ≥ 0 and alpha − beta = 1 (got {self.alpha}, {self.beta})")

    def gradient(self, layer, x, grad, z):
        relevance = z * grad
        if layer.scale is None and layer.module is not None:
            return self._direct(layer, x, relevance, z)
        x = leaf(x)
        with torch.enable_grad():
            positive, negative = layer.contributions(x, need_negative=self.beta != 0)
        outputs, weights = [positive], [self.alpha * divide(relevance, positive.detach())]
        if self.beta != 0:
            outputs.append(negative)
            weights.append(-self.beta * divide(relevance, negative.detach()))
        return vjp(outputs, [x], weights)[0]

    def _direct(self, layer, x, relevance, z):
        """The same rule with explicit adjoints (no recomputed graph) when no per-sample scale is left.

        Non-negative inputs: ``P = L⁺(x)``. Signed inputs: since ``(x w)⁺ = (x w + |x||w|) / 2``,
        ``P = (L(x) + L_|W|(|x|)) / 2`` and ``N = (L(x) − L_|W|(|x|)) / 2``, where ``L(x) = z − t`` is
        known: one convolution and two adjoints instead of two and two.
        """
        linear = z if layer.shift is None else z - layer.shift
        if float(x.amin()) >= 0:
            positive = layer.linear(x, "positive")
            share = divide(relevance, positive)
            if self.alpha != 1:
                share.mul_(self.alpha)
            gradient = layer.adjoint(share, x.shape, "positive")
            if self.beta != 0:
                negative = linear - positive
                gradient -= layer.adjoint(divide(relevance, negative).mul_(self.beta), x.shape, "negative")
            return gradient
        magnitude = layer.linear(x.abs(), "absolute")
        # P = (L(x) + M) / 2, so α R / P = 2α R / (L(x) + M); likewise for N with L(x) − M
        up = divide(relevance, linear + magnitude)
        if self.alpha != 1:
            up.mul_(self.alpha)
        if self.beta != 0:
            down = divide(relevance, linear - magnitude).mul_(-self.beta)
            plain, absolute = up + down, up.sub_(down)
        else:
            plain, absolute = up, up
        gradient = layer.adjoint(plain, x.shape)
        return gradient.addcmul_(torch.sign(x), layer.adjoint(absolute, x.shape, "absolute"))

    def describe(self) -> str:
        return f"alpha{self.alpha:g}-beta{self.beta:g}"


@dataclass(frozen=True)
class Gamma(Rule):
    """LRP-γ, generalised to signed inputs: contributions of the output's sign are boosted by γ.

    For ``z_k > 0``: ``R_j = Σ_k (z_jk + γ z⁺_jk) / (z_k + γ (Σ_j z⁺_jk + t⁺_k)) R_k``; for ``z_k < 0``
    the same with the negative parts. With non-negative inputs and outputs this is the γ rule of
    Montavon et al. (2019), ``w + γ w⁺``. The bias is part of the denominator (it absorbs relevance).
    """

    gamma: float = 0.25

    def gradient(self, layer, x, grad, z):
        relevance = z * grad
        if layer.scale is None and layer.module is not None:
            return self._direct(layer, x, relevance, z)
        x = leaf(x)
        with torch.enable_grad():
            out = layer.scaled(x)
            positive, negative = layer.contributions(x, need_negative=True)
        up, down = (z > 0).to(z), (z < 0).to(z)
        boost = up * positive.detach() + down * negative.detach()
        if layer.shift is not None:
            boost = boost + up * layer.shift.clamp(min=0) + down * layer.shift.clamp(max=0)
        weights = divide(relevance, z + self.gamma * boost)
        return vjp([out, positive, negative], [x], [weights, self.gamma * up * weights, self.gamma * down * weights])[0]

    def _direct(self, layer, x, relevance, z):
        """With explicit adjoints, as for α-β: ``P, N = (L(x) ± L_|W|(|x|)) / 2``. The boosted part's
        weights are ``u`` on outputs > 0 and on outputs < 0 alike (``u`` is 0 where z = 0), so
        ``c = (1 + γ/2) Lᵀu + (γ/2) sign(x) ⊙ L_|W|ᵀ(sign(z) ⊙ u)``: one convolution, two adjoints."""
        linear = z if layer.shift is None else z - layer.shift
        magnitude = layer.linear(x.abs(), "absolute")
        up = z > 0
        boost = torch.where(up, linear + magnitude, linear - magnitude).mul_(0.5)
        if layer.shift is not None:
            boost += torch.where(up, layer.shift.clamp(min=0), layer.shift.clamp(max=0))
        weights = divide(relevance, boost.mul_(self.gamma).add_(z))
        gradient = layer.adjoint(weights, x.shape).mul_(1 + self.gamma / 2)
        signed = layer.adjoint(weights * torch.sign(z), x.shape, "absolute")
        return gradient.addcmul_(torch.sign(x), signed, value=self.gamma / 2)

    def describe(self) -> str:
        return f"gamma({self.gamma:g})"


Bound = float | tuple[float, ...] | None


def _bound_text(value: Bound) -> str:
    if value is None:
        return "data"
    return f"{value:g}" if isinstance(value, (int, float)) else "[" + ",".join(f"{v:g}" for v in value) + "]"


@dataclass(frozen=True)
class ZBox(Rule):
    """z^B rule for inputs bounded by ``low ≤ x ≤ high`` (Montavon et al. 2017).

    ``R_j = Σ_k (x_j w_jk − l_j w⁺_jk − h_j w⁻_jk) / Σ_j (...) R_k`` with the effective weights
    ``w = s ⊙ W``. A bound is one number, one number per input channel, or None: each channel's
    extreme value in the input the rule sees. The :class:`~.attribution.LRP` method sets the bounds from
    the whole volume before it runs, so that sliding windows all use the same ones.
    """

    input_only: ClassVar[bool] = True
    low: Bound = None
    high: Bound = None

    def _bound(self, x: torch.Tensor, value: Bound, reduce) -> torch.Tensor:
        """(B or 1, C or 1, 1, ...) bound: the given value(s), or each sample's and channel's extreme input value."""
        spread = [1] * (x.ndim - 2)
        if value is None:
            return reduce(x.flatten(2), dim=2).values.reshape(*x.shape[:2], *spread)
        values = torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(1, -1, *spread)
        if values.shape[1] not in (1, x.shape[1]):
            raise ValueError(f"z^B rule: {values.shape[1]} bounds for an input of {x.shape[1]} channels")
        return values

    def relevance(self, layer, x, grad, z):
        relevance = z * grad
        low, high = self._bound(x, self.low, torch.min), self._bound(x, self.high, torch.max)
        if layer.scale is None and layer.module is not None:
            # bounds constant over space: L⁺(l) and L⁻(h) are convolutions of constant maps; L(x) = z − t is known
            linear = z if layer.shift is None else z - layer.shift
            spread = (-1, x.shape[1], *x.shape[2:])
            out = linear - layer.linear(low.expand(spread), "positive") - layer.linear(high.expand(spread), "negative")
            weights = divide(relevance, out)
            return (x * layer.adjoint(weights, x.shape) - low * layer.adjoint(weights, x.shape, "positive")
                    - high * layer.adjoint(weights, x.shape, "negative"))
        low, high = leaf(low.expand_as(x).clone()), leaf(high.expand_as(x).clone())
        x = leaf(x)
        with torch.enable_grad():
            out = layer.scaled(x) - layer.bound_terms(low, high)
        gx, glow, ghigh = vjp([out], [x, low, high], [divide(relevance, out.detach())])
        return x.detach() * gx + low.detach() * glow + high.detach() * ghigh

    def describe(self) -> str:
        if self.low is None and self.high is None:
            return "zbox(data)"
        return f"zbox({_bound_text(self.low)},{_bound_text(self.high)})"


@dataclass(frozen=True)
class Flat(Rule):
    """Flat rule (Lapuschkin et al. 2019): each output's relevance is shared equally by every input in
    its receptive field, whatever the weights and input values."""

    input_only: ClassVar[bool] = True

    def relevance(self, layer, x, grad, z):
        relevance = z * grad
        ones = leaf(torch.ones_like(x))
        with torch.enable_grad():
            count = layer.linear(ones, "ones")
        return vjp([count], [ones], [divide(relevance, count.detach())])[0]


@dataclass(frozen=True)
class Pass(Rule):
    """Pass-through for element-wise layers: ``R(x) = R(z)`` position by position.

    Used for normalisations that cannot be folded into a preceding layer (their shift is not credited,
    so relevance is conserved and never divided by a small pre-activation) and for activations that are
    not piecewise linear (ELU, GELU, SiLU, tanh, ...). Where the input is exactly zero its relevance
    cannot be carried and is dropped.
    """

    def gradient(self, layer, x, grad, z):
        return divide(z * grad, x)
