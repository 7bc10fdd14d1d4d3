"""Canonizing a network for LRP: rules attached to its layers for one attribution, then removed.

:func:`canonized` is a context manager. On entry it replaces the ``forward`` of every layer that needs
a rule with one that runs the layer unchanged but routes the backward pass through the layer's rule
(:class:`_LayerFunction`); on exit — also on error or cancellation — it restores every ``forward``
and removes every hook, so the user's network is left exactly as it was (parameters and buffers are
never written). What it does to the computation:

- **Normalisation folded into the preceding layer.** A BatchNorm / InstanceNorm / GroupNorm whose
  input is the untouched output of a convolution or dense layer is folded into it: with its
  statistics detached the normalisation is a per-channel affine map ``s ⊙ v + t``, so conv + norm is
  the single affine layer ``z = s ⊙ W x + (s ⊙ b + t)`` and the convolution's rule is applied to the
  effective weights ``s ⊙ W`` (a negative ``s`` swaps positive and negative contributions). BatchNorm
  in eval mode uses its running statistics (an exact, constant fold); Instance/GroupNorm use this
  input's statistics, treated as constants.
- **Normalisation on its own** (pre-activation blocks: DenseNet's BN–ReLU–Conv, SegResNet's
  GN–ReLU–Conv): the composite's ``norm`` rule on the same detached-statistics affine map.
- **Residual sums and concatenations** (MONAI ``ResidualUnit``, ``SkipConnection``, ResNet and
  SegResNet blocks, DenseNet's concatenation) need no rewriting: in this implementation's convention
  the plain gradient of ``a + b`` splits relevance in proportion to ``a`` and ``b`` (see :mod:`.rules`).
- **Multiplicative gates** ``y = x · σ(g(x))`` (MONAI ``AttentionBlock``'s ``psi``, the
  squeeze-excitation ``fc`` of ``ChannelSELayer``/``ResidualSELayer``, EfficientNet's ``_se_expand``):
  the gate is held constant (detached) during the LRP pass, so all relevance of ``y`` flows to the
  signal ``x`` and none into the gate's branch — Arras et al. (2017)'s rule for multiplicative gates.
  The forward values are unchanged; the gate is a per-voxel (or per-channel) weight like a fixed
  scaling, and conservation holds through it. With a composite's ``gates="uniform"`` (AttnLRP,
  Achtibat et al. 2024) the relevance arriving at the product is halved instead: half goes to ``x``,
  half into the gate's branch and on through its layers' rules. That needs the product to be the
  block's output (``AttentionBlock``, ``ChannelSELayer`` without residual); other gated blocks are
  refused in that mode.
- **Softmax attention** (MONAI ``SABlock`` in ``ViT``/``UNETR``, SwinUNETR's ``WindowAttention``):
  the attention matrix ``A = softmax(q kᵀ)`` is held constant (detached where the block multiplies the
  values with it; flash attention, which never forms it, is switched off for the run). ``A v`` is then a
  bias-free linear map of the values, whose plain gradient is its LRP-0/ε rule (no bias to absorb
  anything, no division), so relevance flows through the value path and is conserved; none enters
  ``q`` and ``k``. This is the conservative propagation of Ali et al. (2022), which AttnLRP (Achtibat et
  al. 2024) also uses for the value path; AttnLRP's own softmax rule would send part of the relevance
  into the logits ``q kᵀ`` and lose the share a bias-like term absorbs there. Held constant, the
  attention is treated as the gates are by default (the signal, not the weighting, is explained).
  With ``gates="uniform"`` the attention gets AttnLRP's own rules instead: the relevance of ``A v`` is
  split uniformly between ``A`` and ``v`` (the signal halved at the product's output), the softmax rule
  ``R(z_i) = z_i (R(A_i) − A_i Σ_j R(A_j))`` — in this convention exactly the plain gradient through the
  softmax — and the uniform split again for ``q kᵀ`` (the signal halved where the attention matrix
  leaves the softmax). Not conservative: the softmax rule's bias-like term absorbs a share.
- **LayerNorm** (``nn.LayerNorm``, and SwinUNETR's functional ``F.layer_norm`` of each stage's output,
  whose ``proj_out`` is wrapped): per token, ``γ ⊙ (x − μ) / σ + β`` with μ and σ detached is an
  element-wise affine map; it gets the composite's ``norm`` rule, the identity (pass) rule by default
  (AttnLRP's rule: the normalisation factor held constant, relevance position by position).
- **GELU, SiLU** (transformer MLPs): the ``activation`` rule, the identity by default.
- **Patch and position embeddings.** A convolutional patch embedding is a convolution (the ``first``
  rule when it reads the input), a perceptron one a rearrangement and a dense layer. The position
  embeddings (and ViT's class token) are added like a bias: the sum gives them their proportional
  share, which stays with the parameter (absorbed, as a bias's share is) — on a network with zero
  position embeddings relevance is conserved. SwinUNETR's relative position bias enters only the
  held attention logits and takes no relevance.
- **Reindexing** (SwinUNETR's window partition and reverse, cyclic shift ``torch.roll``, padding and
  cropping, patch merging's strided slices and concatenation; VNet's ``repeat`` of the input over
  channels): plain gradients, so relevance follows the values; a repeated tensor receives the sum of
  its copies' relevance.
- **In-place activations** (VNet's ``ELU(inplace=True)``) are switched to out-of-place for the run (a
  layer with a rule must keep its input) and switched back afterwards.
- **Unsupported layers** raise :class:`~xaioverlay.errors.ModelError` naming the layer and its type
  as soon as they run; after the forward pass, :func:`check_graph` refuses operations written in a
  module's ``forward`` that have no LRP rule (e.g. a product of two feature maps in an attention
  gate) instead of silently giving them plain gradients.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ModelError
from .affine import (DENSE, LINEAR_LAYERS, NORMS, TRANSPOSED_CONVOLUTIONS, Affine, channel_view,
                     layer_norm_scale_shift, norm_scale_shift)
from .composites import Composite

#: Layers whose plain gradient is the right propagation: positively homogeneous element-wise maps
#: (f(x) = f'(x)·x), bias-free linear maps with non-negative weights, routing and reshaping.
GRADIENT_LAYERS = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Upsample, nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
)
#: Activations that are not piecewise linear: the composite's ``activation`` rule (pass-through).
PASS_ACTIVATIONS = (
    nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ReLU6, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
)
#: MONAI's own activation classes (monai.networks.blocks.activation), by class name.
MONAI_PASS_ACTIVATIONS = ("Swish", "MemoryEfficientSwish", "Mish")

#: Autograd operations allowed between layers (prefixes of ``grad_fn`` class names). Each is linear
#: without bias or positively homogeneous, or only moves values around.
ALLOWED_OPERATIONS = (
    "AccumulateGrad", "_LayerFunctionBackward", "AddBackward", "SubBackward", "NegBackward",
    "CatBackward", "StackBackward", "SplitBackward", "SplitWithSizesBackward", "UnbindBackward",
    "ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "ExpandBackward", "AliasBackward",
    "SliceBackward", "SelectBackward", "SqueezeBackward", "UnsqueezeBackward", "PermuteBackward",
    "TransposeBackward", "TBackward", "CloneBackward", "ToCopyBackward", "ContiguousBackward",
    "ReluBackward", "ThresholdBackward", "LeakyReluBackward", "PreluKernelBackward", "PreluBackward",
    "MaxPool", "AdaptiveMaxPool", "AvgPool", "AdaptiveAvgPool", "MeanBackward", "SumBackward",
    "Upsample", "ConstantPadNdBackward", "ReflectionPad", "ReplicationPad",
    "PixelShuffleBackward", "PixelUnshuffleBackward", "IndexBackward", "FlipBackward",
    # copies (VNet's channel repetition): the gradient sums the copies' signals, so R(x) = Σ R(copies)
    "RepeatBackward",
    # SwinUNETR's window shift: a cyclic reindexing, relevance follows its values
    "RollBackward",
)
#: Allowed only with one operand that carries relevance (scaling by a constant), not a product of two.
SCALING_OPERATIONS = ("MulBackward", "DivBackward", "BmmBackward", "MmBackward")

#: Blocks that multiply a signal by a gate computed from the network's features, ``x · σ(g(x))``:
#: class name → the submodule whose output is the gate (or its logit). See :func:`gate_sources`.
GATE_SOURCES = {"AttentionBlock": "psi", "ChannelSELayer": "fc", "ResidualSELayer": "fc", "MBConvBlock": "_se_expand"}
#: How relevance crosses a gate (recorded with every LRP map of a gated network), per gate split.
GATE_RULES = {
    "signal": "signal: the gate is held constant, all relevance flows to the gated signal (Arras et al. 2017)",
    "uniform": "uniform: half of the product's relevance to the signal, half into the gate (Achtibat et al. 2024)",
}
GATE_RULE = GATE_RULES["signal"]
#: Blocks whose output is exactly the gate product (the uniform split halves the relevance arriving there).
GATE_PRODUCT_BLOCKS = ("AttentionBlock", "ChannelSELayer")


#: Parameters that enter the forward pass as additive constants, by class name: MONAI ``ViT``'s class
#: token and ``PatchEmbeddingBlock``'s position embeddings (added to the patch embeddings like a bias:
#: the share of relevance the sum gives them stays there, absorbed as a bias's is), and SwinUNETR's
#: ``WindowAttention`` relative position bias (it enters only the attention logits, held constant).
CONSTANT_PARAMETERS = {
    "ViT": ("cls_token",),
    "PatchEmbeddingBlock": ("position_embeddings",),
    "WindowAttention": ("relative_position_bias_table",),
}
#: Softmax attention blocks → the submodule whose output is the attention matrix that multiplies the
#: values (a dropout, the identity in eval mode). Its output is held constant (see :func:`canonized`).
ATTENTION_WEIGHTS = {"SABlock": "drop_weights", "WindowAttention": "attn_drop"}
#: Softmax attention blocks → the submodule that receives the product ``A v`` (whose input the uniform
#: split halves).
ATTENTION_PRODUCTS = {"SABlock": "out_rearrange", "WindowAttention": "proj"}
#: How relevance crosses softmax attention (recorded with every LRP map of a transformer), per gate split.
ATTENTION_RULES = {
    "signal": "attention matrix held constant: relevance flows through the values only, a bias-free linear map "
              "(Ali et al. 2022; AttnLRP's value path, Achtibat et al. 2024)",
    "uniform": "AttnLRP (Achtibat et al. 2024): A v and q kᵀ split uniformly between their operands, the softmax "
               "rule on the logits (not conservative: its bias-like term absorbs a share)",
}
ATTENTION_RULE = ATTENTION_RULES["signal"]


def attention_weights(network: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(attention block, submodule returning its attention matrix) for each softmax attention block."""
    found = []
    for module in network.modules():
        attribute = ATTENTION_WEIGHTS.get(type(module).__name__)
        source = getattr(module, attribute, None) if attribute else None
        if isinstance(source, nn.Module):
            found.append((module, source))
    return found


def gate_sources(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every submodule that computes a multiplicative gate (see :data:`GATE_SOURCES`)."""
    found = []
    for name, module in network.named_modules():
        attribute = GATE_SOURCES.get(type(module).__name__)
        source = getattr(module, attribute, None) if attribute else None
        if isinstance(source, nn.Module):
            found.append((f"{name}.{attribute}" if name else attribute, source))
    return found


def _hold_gate(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the gate's value, detached (same forward value; no relevance flows into the gate)."""
    return output.detach()


class _Halve(torch.autograd.Function):
    """Identity forward; the backward signal halved (relevance ½ R to each operand of the product before it)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad / 2


def _split_gate(session: "_Session", name: str, block: nn.Module) -> Callable:
    """Forward hook on a gated block whose output is ``x · s``: remember the product, halve its relevance."""
    if type(block).__name__ not in GATE_PRODUCT_BLOCKS or getattr(block, "add_residual", False):
        raise ModelError(
            f"the uniform gate split needs the gate product as the block's output; '{name}' of type "
            f"{type(block).__name__} computes more after it: use the default gate rule (lrp:COMPOSITE without /uniform)"
        )

    def hook(module, inputs, output):
        session.split_products.add(id(output.grad_fn))
        return _Halve.apply(output)

    return hook


def _nearest(node, wanted: Callable[[object], bool], limit: int = 64):
    """The first autograd node below ``node`` (breadth first, ``node`` included) that is ``wanted``, or None."""
    queue, seen = [node], set()
    while queue and len(seen) < limit:
        current = queue.pop(0)
        if current is None or current in seen:
            continue
        seen.add(current)
        if wanted(current):
            return current
        queue.extend(child for child, _ in current.next_functions)
    return None


def _is_product(node) -> bool:
    """A product of two tensors that both need gradients (``q kᵀ``, ``A v``)."""
    return (type(node).__name__.startswith(SCALING_OPERATIONS)
            and sum(child is not None for child, _ in node.next_functions) > 1)


def _split_attention(session: "_Session", name: str, block: nn.Module, weights: nn.Module) -> list:
    """AttnLRP's rules in softmax attention block ``block`` (hooks; see the module's docstring): the
    signal halved at ``A v`` (the input of its :data:`ATTENTION_PRODUCTS` submodule) and where ``A``
    leaves the softmax (``weights``' output), the softmax and both products allowed by :func:`check_graph`."""
    receiver = getattr(block, ATTENTION_PRODUCTS[type(block).__name__])

    def found(node, what: str):
        if node is None:
            raise ModelError(f"the uniform attention split found no {what} in '{name}' of type {type(block).__name__}: "
                             "use the default attention rule (lrp:COMPOSITE without /uniform)")
        session.split_products.add(id(node))

    def product_input(module, args):
        found(_nearest(args[0].grad_fn, _is_product), "product A v")
        return (_Halve.apply(args[0]), *args[1:])

    def attention_matrix(module, inputs, output):
        found(_nearest(output.grad_fn, lambda node: type(node).__name__.startswith("SoftmaxBackward")), "softmax")
        found(_nearest(output.grad_fn, _is_product), "product q kᵀ")
        return _Halve.apply(output)

    return [receiver.register_forward_pre_hook(product_input), weights.register_forward_hook(attention_matrix)]



def layer_kind(module: nn.Module) -> str:
    """How LRP treats ``module``: ``"convolution"``, ``"dense"``, ``"norm"``, ``"activation"`` (a rule),
    ``"gradient"`` (plain gradient), ``"free"`` (no parameters of its own: its operations are checked
    by :func:`check_graph`) or ``"unsupported"`` (parameters LRP has no rule for)."""
    if isinstance(module, DENSE):
        return "dense"
    if isinstance(module, LINEAR_LAYERS):
        return "convolution"
    if isinstance(module, NORMS):
        return "norm"
    if isinstance(module, PASS_ACTIVATIONS) or type(module).__name__ in MONAI_PASS_ACTIVATIONS:
        return "activation"
    if isinstance(module, GRADIENT_LAYERS):
        return "gradient"
    constants = CONSTANT_PARAMETERS.get(type(module).__name__, ())
    has_own_parameters = any(p is not None and name not in constants for name, p in module._parameters.items())
    return "unsupported" if has_own_parameters else "free"


class _Relevance:
    """Relevance deposited directly on the network input by input-layer rules."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def add(self, relevance: torch.Tensor) -> None:
        self.value = relevance if self.value is None else self.value + relevance


@dataclass
class _Step:
    """One call of one layer during the LRP forward pass; its backward applies the layer's rule.

    ``run`` computes the layer's true output (no gradient); ``layer`` describes it as an affine map;
    the output is kept (as a detached alias sharing its version counter) and recomputed in the
    backward pass only if something modified it in place afterwards.
    """

    rule: object
    deposit: _Relevance
    is_input: bool
    run: Callable[[torch.Tensor], torch.Tensor]
    layer: Callable[[], Affine | None]
    recompute: Callable[[torch.Tensor], torch.Tensor]
    output: torch.Tensor | None = None
    output_version: int = -1
    input: torch.Tensor | None = None
    input_version: int = -1

    def keep(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.input, self.input_version = x, x._version
        self.output, self.output_version = out.detach(), out._version

    def current_output(self, x: torch.Tensor) -> torch.Tensor:
        if self.output is not None and self.output._version == self.output_version:
            return self.output
        with torch.no_grad():
            return self.recompute(x)

    def backward(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        x32, grad32 = x.detach().float(), grad.float()
        z = self.current_output(x32).float()
        layer = self.layer()
        if self.is_input:
            self.deposit.add(self.rule.relevance(layer, x32, grad32, z).to(x.dtype))
            return torch.zeros_like(x)
        return self.rule.gradient(layer, x32, grad32, z).to(x.dtype)


class _LayerFunction(torch.autograd.Function):
    """Forward: the layer's own output. Backward: the layer's rule (see :class:`_Step`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: _Step) -> torch.Tensor:
        ctx.step = step
        ctx.save_for_backward(x)
        out = step.run(x)
        # a view made here (e.g. InstanceNorm reshapes its result) could not be modified in place later
        return out.clone() if out._base is not None else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return ctx.step.backward(x, grad), None


def _bias(module: nn.Module, ndim: int) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    if bias is None:
        return None
    # a dense layer's output channels are its last dimension, (B, C) or (B, N, C) tokens
    return bias.detach().float() if isinstance(module, DENSE) else channel_view(bias.detach().float(), ndim)


class _Session:
    """State of one attribution: the composite, the network input, relevance deposited on it, and the
    latest output of each layer (to fold a following normalisation)."""

    def __init__(self, composite: Composite, network_input: torch.Tensor) -> None:
        self.composite = composite
        self.input = network_input
        self.relevance = _Relevance()
        self.producers: dict[int, tuple[_Step, weakref.ref, nn.Module]] = {}
        self.origins: dict[int, str] = {}
        self.gates: list[str] = []
        #: how many softmax attention blocks were crossed (attention held constant, or split by AttnLRP's rules)
        self.attention = 0
        #: ``id(grad_fn)`` of the products and attention softmaxes the uniform split handles (see :func:`check_graph`).
        self.split_products: set[int] = set()

    def record_origin(self, name: str, module: nn.Module) -> Callable:
        """Forward hook remembering which layer's output each autograd node made (for error messages)."""
        def hook(module_, inputs, output):
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                self.origins.setdefault(id(output.grad_fn), f"layer '{name}' of type {type(module).__name__}")

        return hook

    def _apply(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        out = _LayerFunction.apply(x, step)
        step.keep(x, out)
        step.run = None  # its closure may hold tensors that are no longer needed
        return out

    def linear_forward(self, module: nn.Module, original: Callable, kind: str) -> Callable:
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            is_input = x is self.input
            output_size = args[0] if args else kwargs.get("output_size")

            def layer() -> Affine:
                return Affine(module, None, _bias(module, x.ndim), output_size if isinstance(module, TRANSPOSED_CONVOLUTIONS) else None)

            step = _Step(
                self.composite.rule("first" if is_input else kind), self.relevance, is_input,
                run=lambda inputs: original(inputs, *args, **kwargs), layer=layer,
                recompute=lambda inputs: layer().output(inputs),
            )
            out = self._apply(x, step)
            self.producers[id(out)] = (step, weakref.ref(out), module)
            return out

        return forward

    def norm_forward(self, module: nn.Module, original: Callable) -> Callable:
        def forward(v: torch.Tensor) -> torch.Tensor:
            if isinstance(module, nn.LayerNorm):  # per token, over the channels: never folded
                scale, shift = layer_norm_scale_shift(v, module.normalized_shape, module.weight, module.bias,
                                                      module.eps)
                return self.elementwise_norm(v, scale.to(v.dtype), shift.to(v.dtype), original)
            scale, shift = norm_scale_shift(module, v)
            scale, shift = channel_view(scale, v.ndim), channel_view(shift, v.ndim)
            entry = self.producers.get(id(v))
            before = entry[0] if entry is not None and entry[1]() is v else None
            if before is not None and before.output_version == v._version and before.input._version == before.input_version:
                linear = entry[2]
                bias = _bias(linear, v.ndim)
                folded_shift = shift if bias is None else scale * bias + shift
                size = before.layer().output_size

                def layer() -> Affine:
                    return Affine.folded(linear, scale, folded_shift, size)

                step = _Step(
                    before.rule, self.relevance, before.is_input,
                    run=lambda inputs: original(v), layer=layer, recompute=lambda inputs: layer().output(inputs),
                )
                before.output = None  # the convolution's own output is only recomputed if still needed
                return self._apply(before.input, step)
            return self.elementwise_norm(v, scale, shift, original)

        return forward

    def elementwise_norm(self, v: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                         run: Callable) -> torch.Tensor:
        """A normalisation on its own, ``scale ⊙ v + shift`` (statistics detached), with the ``norm`` rule."""
        is_input = v is self.input

        def elementwise() -> Affine:
            return Affine(None, scale, shift)

        step = _Step(
            self.composite.rule("first" if is_input else "norm"), self.relevance, is_input,
            run=run, layer=elementwise, recompute=lambda inputs: elementwise().output(inputs),
        )
        return self._apply(v, step)

    def layer_norm(self, v: torch.Tensor, shape: tuple[int, ...], eps: float = 1e-5) -> torch.Tensor:
        """``F.layer_norm(v, shape)`` (no affine parameters) with the ``norm`` rule, as for ``nn.LayerNorm``."""
        def run(inputs: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(inputs, shape, eps=eps)

        scale, shift = layer_norm_scale_shift(v, shape, None, None, eps)
        return self.elementwise_norm(v, scale.to(v.dtype), shift.to(v.dtype), run)

    def activation_forward(self, module: nn.Module, original: Callable) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            step = _Step(self.composite.activation, self.relevance, False, run=original, layer=lambda: None,
                         recompute=original)
            return self._apply(x, step)

        return forward


def _refuse(name: str, module: nn.Module) -> Callable:
    def hook(module_, inputs):
        raise ModelError(
            f"LRP has no rule for layer '{name}' of type {type(module).__name__}; "
            "explain this model with gxi, ig or gradcam instead"
        )

    return hook


@contextlib.contextmanager
def canonized(network: nn.Module, composite: Composite, network_input: torch.Tensor) -> Iterator[_Session]:
    """Attach ``composite``'s rules to ``network`` for attributions of ``network_input``; undo on exit.

    Run the forward and backward pass inside the ``with`` block.
    """
    session = _Session(composite, network_input)
    overridden: list[tuple[object, str, object]] = []  # (object, attribute, previous own value or missing)
    handles = []
    missing = object()

    def override(owner: object, attribute: str, value: object) -> None:
        overridden.append((owner, attribute, owner.__dict__.get(attribute, missing)))
        setattr(owner, attribute, value)

    try:
        blocks = dict(network.named_modules())
        for name, module in gate_sources(network):
            if composite.gates == "uniform":
                block_name = name.rpartition(".")[0]
                block = blocks[block_name]
                handles.append(block.register_forward_hook(_split_gate(session, block_name, block)))
            else:
                handles.append(module.register_forward_hook(_hold_gate))
            session.gates.append(name)
        names = {module: name for name, module in blocks.items()}
        for block, weights in attention_weights(network):
            if composite.gates == "uniform":
                handles.extend(_split_attention(session, names[block], block, weights))
            else:
                handles.append(weights.register_forward_hook(_hold_gate))
            if getattr(block, "use_flash_attention", False):  # flash attention never forms the matrix to hold
                override(block, "use_flash_attention", False)
            session.attention += 1
        for name, module in network.named_modules():
            if type(module).__name__ == "SwinTransformer" and hasattr(module, "proj_out"):
                override(module, "proj_out", _normalized_stage_output(session))
            kind = layer_kind(module)
            if kind in ("free", "gradient"):
                handles.append(module.register_forward_hook(session.record_origin(name or "(network)", module)))
                continue
            if kind == "unsupported":
                handles.append(module.register_forward_pre_hook(_refuse(name or type(module).__name__, module)))
                continue
            original = module.forward
            if kind == "norm":
                override(module, "forward", session.norm_forward(module, original))
            elif kind == "activation":
                # VNet's in-place ELU: a layer with a rule must not overwrite its input
                if getattr(module, "inplace", False) is True:
                    override(module, "inplace", False)
                override(module, "forward", session.activation_forward(module, original))
            else:
                override(module, "forward", session.linear_forward(module, original, kind))
        yield session
    finally:
        for handle in handles:
            handle.remove()
        for owner, attribute, previous in reversed(overridden):
            if previous is missing:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, previous)
        session.producers.clear()


def _normalized_stage_output(session: _Session) -> Callable:
    """SwinUNETR's ``SwinTransformer.proj_out``: each stage's output layer-normalised over its channels
    with ``F.layer_norm`` in the forward code; here through the ``norm`` rule, as an ``nn.LayerNorm``."""
    def proj_out(x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if not normalize:
            return x
        return session.layer_norm(x.movedim(1, -1), (x.shape[1],)).movedim(-1, 1)

    return proj_out


def check_graph(output: torch.Tensor, origins: dict[int, str] | None = None, products: set[int] = frozenset()) -> None:
    """Refuse operations without an LRP rule in the autograd graph of ``output``.

    Args:
        origins: ``id(grad_fn)`` → description of the layer whose output it made (to name it).
        products: ``id(grad_fn)`` of gate and attention products, and attention softmaxes, whose relevance
            the uniform split handles by rule (allowed).
    Raises:
        ModelError: naming the operation (e.g. ``MulBackward0`` between two feature maps) and, when
            known, the layer that ran it.
    """
    origins = origins or {}
    seen: set = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        followers = [child for child, _ in node.next_functions if child is not None]
        where = origins.get(id(node), "this network's forward code")
        if name.startswith(SCALING_OPERATIONS):
            if len(followers) > 1 and id(node) not in products:
                raise ModelError(
                    f"LRP has no rule for a product or ratio of two feature maps ({name}, e.g. an attention gate) "
                    f"in {where}; explain this model with gxi, ig or gradcam instead"
                )
        elif not name.startswith(ALLOWED_OPERATIONS) and name != "_HalveBackward" and id(node) not in products:
            raise ModelError(
                f"LRP has no rule for the operation {name} in {where}; "
                "explain this model with gxi, ig or gradcam instead"
            )
        stack.extend(followers)
