"""Exact incremental inference: run a perturbed input through only what the perturbation changes and the target needs.

An occluder (or any perturbation: its box is the bounding box of the voxels it replaces) changes the
input inside one box. Through a local layer (convolution, pooling,
transposed convolution, per-voxel operations) the change stays inside a box that grows by the
kernel's reach; only a global layer (global pooling, a linear head, instance normalisation, ...)
spreads it everywhere. Conversely, a segmentation target reads only the output voxels of its region,
which need only a box of each layer's voxels. For every layer this module computes, per batch item,

    box = (voxels the occluder can change) ∩ (voxels the target can read),

evaluates the layer on that box alone (a small convolution with the padding replaced by the clean
neighbours), and takes every other voxel from one clean pass kept in memory. The result equals a
full forward pass of the occluded input up to floating-point summation order (Krypton, Nakandala et
al. 2019, does the "changed" half for classifiers).

The network is traced with ``torch.fx``; layers it does not know are run whole (still exact), and
a network that cannot be traced is run as plain forward passes by the caller.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import boxes as bx
from .boxes import Box

log = logging.getLogger(__name__)

#: ``paint(low (B, 3), size)`` → (B, C, *size): each perturbed input inside the boxes ``[low, low + size)``.
Painter = Callable[[torch.Tensor, tuple], torch.Tensor]

INPUT, CONST, WINDOW, TRANSPOSED, POINTWISE, CAT, GLOBAL = "input", "const", "window", "transposed", "pointwise", "cat", "global"

POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout3d,
    nn.AlphaDropout, nn.BatchNorm3d,
)
POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub, torch.mul,
    torch.div, torch.relu, torch.sigmoid, torch.tanh, F.relu, F.leaky_relu, F.gelu, F.silu, F.elu, F.tanh,
    F.hardtanh, F.softplus, F.mish,
}
POINTWISE_METHODS = {"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "contiguous", "clone", "float"}
CAT_FUNCTIONS = {torch.cat, torch.concat}


def trace(network: nn.Module) -> fx.GraphModule:
    """The network as a ``torch.fx`` graph (sharing its parameters); raises if it cannot be traced."""
    graph = fx.symbolic_trace(network)
    if sum(node.op == "placeholder" for node in graph.graph.nodes) != 1:
        raise ValueError("the network takes more than one input")
    return graph


def _is_volume(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 5


def _triple(value) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


@dataclass
class Step:
    """One node of the graph and how boxes pass through it.

    ``sources``: the node's inputs that depend on the network input. ``shape``: its output's spatial
    shape (None when it is not a (B, C, X, Y, Z) tensor). ``k, s, p``: per-axis kernel reach, stride
    and padding of window/transposed layers; ``fill``: the padding value they read.
    """

    node: fx.Node
    kind: str
    sources: list[fx.Node] = field(default_factory=list)
    shape: tuple[int, int, int] | None = None
    k: tuple[int, int, int] = (1, 1, 1)
    s: tuple[int, int, int] = (1, 1, 1)
    p: tuple[int, int, int] = (0, 0, 0)
    fill: float = 0.0


@dataclass
class Patch:
    """A node's values inside one box per batch item: values (B, C, *size), low (B, 3), valid (B,).

    Items that are not ``valid`` are unchanged there (their values are meaningless)."""

    values: torch.Tensor
    low: torch.Tensor
    valid: torch.Tensor

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(self.values.shape[2:])


def _window_params(module: nn.Module, in_shape, out_shape) -> tuple | None:
    """(k, s, p, fill) when ``module`` is a convolution/pooling this module can run on a box."""
    if isinstance(module, nn.Conv3d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        size, dilation, fill = module.kernel_size, module.dilation, 0.0
    elif isinstance(module, nn.MaxPool3d):
        if module.ceil_mode or module.return_indices:
            return None
        size, dilation, fill = _triple(module.kernel_size), _triple(module.dilation), float("-inf")
    elif isinstance(module, nn.AvgPool3d):
        if module.ceil_mode or module.divisor_override is not None or not (module.count_include_pad or not any(_triple(module.padding))):
            return None
        size, dilation, fill = _triple(module.kernel_size), (1, 1, 1), 0.0
    else:
        return None
    stride = _triple(module.stride if module.stride is not None else size)
    padding = _triple(module.padding)
    k = tuple(d * (n - 1) + 1 for d, n in zip(dilation, size))
    expected = tuple((n + 2 * pp - kk) // ss + 1 for n, pp, kk, ss in zip(in_shape, padding, k, stride))
    return (k, stride, padding, fill) if expected == tuple(out_shape) else None


def _transposed_params(module: nn.Module, in_shape, out_shape) -> tuple | None:
    if not isinstance(module, nn.ConvTranspose3d) or module.padding_mode != "zeros":
        return None
    k = tuple(d * (n - 1) + 1 for d, n in zip(module.dilation, module.kernel_size))
    expected = tuple((n - 1) * s - 2 * p + kk + o for n, s, p, kk, o in
                     zip(in_shape, module.stride, module.padding, k, module.output_padding))
    return (k, tuple(module.stride), tuple(module.padding)) if expected == tuple(out_shape) else None


def plan_steps(graph: fx.GraphModule, values: dict[fx.Node, Any]) -> list[Step]:
    """Classify every node from one clean run's ``values`` (output of each node)."""
    dynamic: set[fx.Node] = set()
    steps = []
    for node in graph.graph.nodes:
        if node.op == "output":
            continue
        out = values[node]
        if node.op == "placeholder":
            dynamic.add(node)
            steps.append(Step(node, INPUT, shape=tuple(out.shape[2:])))
            continue
        sources = [n for n in node.all_input_nodes if n in dynamic]
        if not sources:
            steps.append(Step(node, CONST))
            continue
        dynamic.add(node)
        shape = tuple(out.shape[2:]) if _is_volume(out) else None
        steps.append(_classify(graph, node, sources, shape, values))
    return steps


def _classify(graph: fx.GraphModule, node: fx.Node, sources: list[fx.Node], shape, values) -> Step:
    glob = Step(node, GLOBAL, sources, shape)
    if shape is None or not all(_is_volume(values[n]) for n in sources):
        return glob
    in_shapes = {tuple(values[n].shape[2:]) for n in sources}
    constants = [values[n] for n in node.all_input_nodes if n not in sources]
    # constants must broadcast over a box (e.g. (1, C, 1, 1, 1)), not span the volume
    same = in_shapes == {shape} and not any(_is_volume(c) and any(d > 1 for d in c.shape[2:]) for c in constants)
    if node.op == "call_module":
        module = graph.get_submodule(node.target)
        if len(node.args) != 1 or node.kwargs or len(sources) != 1:
            return glob
        (in_shape,) = in_shapes
        window = _window_params(module, in_shape, shape)
        if window is not None:
            k, s, p, fill = window
            return Step(node, WINDOW, sources, shape, k, s, p, fill)
        transposed = _transposed_params(module, in_shape, shape)
        if transposed is not None:
            return Step(node, TRANSPOSED, sources, shape, *transposed)
        if isinstance(module, POINTWISE_MODULES) and not module.training and same:
            if isinstance(module, nn.BatchNorm3d) and module.running_mean is None:
                return glob
            return Step(node, POINTWISE, sources, shape)
        return glob
    if node.op == "call_function" and node.target in POINTWISE_FUNCTIONS and same and not node.kwargs.get("inplace", False):
        return Step(node, POINTWISE, sources, shape)
    if node.op == "call_method" and node.target in POINTWISE_METHODS and same and not node.kwargs:
        return Step(node, POINTWISE, sources, shape)
    if node.op == "call_function" and node.target in CAT_FUNCTIONS and same:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if dim in (1, -4):
            return Step(node, CAT, sources, shape)
    return glob


def _run_node(graph: fx.GraphModule, node: fx.Node, args, kwargs):
    if node.op == "call_module":
        return graph.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        value = graph
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    raise ValueError(f"cannot run node {node.op}")


def clean_run(graph: fx.GraphModule, x: torch.Tensor) -> tuple[dict[fx.Node, Any], Any]:
    """Every node's output for input ``x``, and the network output (first item of a tuple/list)."""
    values: dict[fx.Node, Any] = {}
    output = None
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            values[node] = x
        elif node.op == "output":
            output = fx.node.map_arg(node.args[0], lambda n: values[n])
        else:
            args = fx.node.map_arg(node.args, lambda n: values[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
            values[node] = _run_node(graph, node, args, kwargs)
    if isinstance(output, (tuple, list)):
        output = output[0]
    return values, output


def output_node(graph: fx.GraphModule) -> fx.Node:
    """The graph node whose value the network returns (the first one for tuples/lists)."""
    (out,) = [n for n in graph.graph.nodes if n.op == "output"]
    value = out.args[0]
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


class IncrementalRun:
    """One clean pass of a traced network on one input, ready to evaluate occluded copies of it.

    Args:
        graph: from :func:`trace`.
        x: (1, C, X, Y, Z) the clean input.
        needed_output: the output voxels the target reads, as a box ((1, 3), (1, 3)); None: all of it
            (classifiers, or when cropping is off).
        crop: compute only what the target reads (the "needed" half).
        incremental: compute only what the occluder changes (the "changed" half).
    """

    def __init__(self, graph: fx.GraphModule, x: torch.Tensor, needed_output: Box | None = None,
                 crop: bool = True, incremental: bool = True) -> None:
        self.graph = graph
        self.values, self.output = clean_run(graph, x)
        self.steps = plan_steps(graph, self.values)
        self.by_node = {step.node: step for step in self.steps}
        self.out_node = output_node(graph)
        self.incremental = incremental
        self.device = x.device
        self.needed = self._needed(needed_output if crop else None)
        self.target_box = (self.needed if crop else self._needed(needed_output)).get(self.out_node)

    # --- boxes -------------------------------------------------------------------------------
    def _shape(self, node: fx.Node) -> tuple[int, int, int]:
        return self.by_node[node].shape or (1, 1, 1)

    def _needed(self, output_box: Box | None) -> dict[fx.Node, Box]:
        """Per node, the voxels the target can read (one box, shared by the batch)."""
        def whole(node: fx.Node) -> Box:
            return bx.whole(self._shape(node), 1, self.device)

        if self.out_node not in self.by_node:
            return {}
        needed = {self.out_node: whole(self.out_node) if output_box is None or self.by_node[self.out_node].shape is None
                  else bx.clip(output_box, self._shape(self.out_node))}
        for step in reversed(self.steps):
            box = needed.get(step.node)
            if box is None or step.kind in (INPUT, CONST):
                continue
            for source in step.sources:
                src_shape = self._shape(source)
                if output_box is None or step.kind == GLOBAL:
                    reach = whole(source)
                elif step.kind == WINDOW:
                    reach = bx.window_backward(box, step.k, step.s, step.p, src_shape)
                elif step.kind == TRANSPOSED:
                    reach = bx.transposed_backward(box, step.k, step.s, step.p, src_shape)
                else:
                    reach = box
                needed[source] = bx.union(needed[source], reach) if source in needed else reach
        return needed

    def changed(self, occluders: Box, incremental: bool | None = None) -> dict[fx.Node, Box]:
        """Per node, the voxels each occluder can change ((B, 3), (B, 3)); absent: none.

        ``incremental=False`` (default: as constructed) marks a layer wholly changed as soon as an
        input is: every layer is then recomputed whole."""
        incremental = self.incremental if incremental is None else incremental
        changed: dict[fx.Node, Box] = {}
        batch = occluders[0].shape[0]
        for step in self.steps:
            if step.kind == CONST:
                continue
            if step.kind == INPUT:
                changed[step.node] = bx.clip(occluders, step.shape)
                continue
            inputs = [changed[n] for n in step.sources if n in changed]
            if not inputs:
                continue
            if step.kind == GLOBAL or not incremental:
                touched = torch.stack([~bx.empty(b) for b in inputs]).any(0)
                low, high = bx.whole(self._shape(step.node), batch, self.device)
                changed[step.node] = (torch.where(touched[:, None], low, 0), torch.where(touched[:, None], high, 0))
            elif step.kind == WINDOW:
                changed[step.node] = bx.window_forward(inputs[0], step.k, step.s, step.p, step.shape)
            elif step.kind == TRANSPOSED:
                changed[step.node] = bx.transposed_forward(inputs[0], step.k, step.s, step.p, step.shape)
            else:
                box = inputs[0]
                for other in inputs[1:]:
                    box = bx.union(box, other)
                changed[step.node] = box
        return changed

    def reaches_output(self, occluders: Box) -> torch.Tensor:
        """(B,) True where an occluder can change what the target reads (the receptive-field bound:
        boxes carried through every layer, whatever the other switches)."""
        changed = self.changed(occluders, incremental=True).get(self.out_node)
        if changed is None:
            return torch.zeros(occluders[0].shape[0], dtype=torch.bool, device=self.device)
        return ~bx.empty(bx.intersect(changed, self.target_box))

    # --- values ------------------------------------------------------------------------------
    def read(self, node: fx.Node, patches: dict, low: torch.Tensor, size, fill: float = 0.0) -> torch.Tensor:
        """Values of ``node`` in the boxes ``[low, low + size)``: the item's patch where it has one,
        the clean pass elsewhere, ``fill`` outside the volume. Returns (B, C, *size)."""
        patch = patches.get(node)
        if patch is not None and patch.size == tuple(size) and bool(patch.valid.all()) and torch.equal(patch.low, low):
            return patch.values
        values = bx.read_box(self.values[node], low, size, fill)
        if patch is None:
            return values
        return bx.paste(values, low, patch.values.to(values.dtype), patch.low, patch.valid)

    def _batched(self, node: fx.Node, patches: dict, batch: int):
        """A dynamic node's whole value for every item (for layers run whole)."""
        step = self.by_node[node]
        value = patches.get(node)
        if step.shape is not None:
            return self.read(node, patches, torch.zeros((batch, 3), dtype=torch.long, device=self.device), step.shape)
        if value is None:  # unchanged for every item: the clean value, batch dimension repeated
            clean = self.values[node]
            return clean.expand(batch, *clean.shape[1:]) if isinstance(clean, torch.Tensor) and clean.shape[:1] == (1,) else clean
        return value

    def evaluate(self, occluders: Box, paint: Painter) -> Patch | torch.Tensor | None:
        """The network output for each perturbed input.

        Args:
            occluders: per item the box of input voxels its perturbation changes, ((B, 3), (B, 3)).
            paint: each perturbed input inside boxes ``[low, low + size)`` (see :data:`Painter`).
        Returns:
            a :class:`Patch` of a spatial output, a (B, ...) tensor of a non-spatial output, or None
            when no occluder changes the output.
        """
        batch = occluders[0].shape[0]
        changed = self.changed(occluders)
        patches: dict[fx.Node, Any] = {}
        for step in self.steps:
            node = step.node
            if node not in changed or node not in self.needed:
                continue
            if step.shape is not None:
                low, size, valid = bx.fit(bx.intersect(changed[node], self.needed[node]), step.shape)
                if not bool(valid.any()):
                    continue
            if step.kind == INPUT:
                values = paint(low, size)
            elif step.kind == WINDOW:
                values = self._window(step, patches, low, size)
            elif step.kind == TRANSPOSED:
                values = self._transposed(step, patches, low, size)
            elif step.kind in (POINTWISE, CAT):  # the same operation on the box of every input
                values = self._replay(node, lambda n: self.read(n, patches, low, size))
            else:  # a global layer: run whole on every item
                values = self._replay(node, lambda n: self._batched(n, patches, batch))
                if step.shape is None:
                    patches[node] = values
                    continue
                low, size = torch.zeros_like(low), step.shape
            patches[node] = Patch(values, low, valid)
        return patches.get(self.out_node)

    def _replay(self, node: fx.Node, read) -> Any:
        """Run ``node`` with its inputs that depend on the network input replaced by ``read(input)``."""
        def value(n: fx.Node):
            return read(n) if self.by_node[n].kind != CONST else self.values[n]

        return _run_node(self.graph, node, fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value))

    def _window(self, step: Step, patches: dict, low: torch.Tensor, size) -> torch.Tensor:
        module = self.graph.get_submodule(step.node.target)
        s, p = (torch.as_tensor(v, device=self.device) for v in (step.s, step.p))
        in_size = tuple((n - 1) * ss + kk for n, ss, kk in zip(size, step.s, step.k))
        x = self.read(step.sources[0], patches, low * s - p, in_size, step.fill)
        if isinstance(module, nn.Conv3d):
            return F.conv3d(x, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
        if isinstance(module, nn.MaxPool3d):
            return F.max_pool3d(x, module.kernel_size, step.s, 0, module.dilation)
        return F.avg_pool3d(x, module.kernel_size, step.s, 0)

    def _transposed(self, step: Step, patches: dict, low: torch.Tensor, size) -> torch.Tensor:
        module = self.graph.get_submodule(step.node.target)
        k, s, p = (torch.as_tensor(v, device=self.device) for v in (step.k, step.s, step.p))
        first = bx.floor_div(low + p - k + 1, s)  # first input voxel that writes into the box
        in_size = tuple((n + kk - 2) // ss + 3 for n, kk, ss in zip(size, step.k, step.s))
        x = self.read(step.sources[0], patches, first, in_size)
        y = F.conv_transpose3d(x, module.weight, module.bias, module.stride, 0, 0, module.groups, module.dilation)
        return bx.read_box(y, low - (first * s - p), size)
