"""Running LRP: one forward and one rewritten backward pass; the :class:`LRP` method."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ... import sliding
from ...errors import InputError
from ...models.base import LoadedModel
from ...progress import NO_PROGRESS, Progress
from ...targets import Target
from ..base import NO_CONTEXT, Attribution, Context, Method, relative_error
from ..precision import full_float32
from .canonizers import ATTENTION_RULES, GATE_RULES, canonized, check_graph
from .composites import COMPOSITES, DEFAULT, GATE_SPLITS, Composite
from .rules import Epsilon, ZBox


@dataclass
class Relevance:
    """LRP's result for a batch.

    Attributes:
        input: (B, C, X, Y, Z) relevance of every input value.
        output: (B,) relevance the explanation started from: Σ y ⊙ ∂T/∂y over the network output
            (the explained logit — or the region's weighted sum of logits — for a logit target).
        gates: names of the multiplicative gates crossed (see :data:`.canonizers.GATE_RULES`).
        attention: how many softmax attention blocks were crossed (see :data:`.canonizers.ATTENTION_RULES`).
    """

    input: torch.Tensor
    output: torch.Tensor
    gates: tuple[str, ...] = ()
    attention: int = 0


#: Relative conservation error above which the map's total is off by more than the explained score itself.
UNCONSERVED = 1.0


def conservation_extras(output_relevance: float, input_relevance: float) -> dict:
    """The ``conservation`` record (starting and input relevance, each summed over the batch, and the input's
    relative error) and, where that error exceeds :data:`UNCONSERVED`, a ``warning`` line: relevance was
    created or lost on the way, typically by a tiny ε over near-zero pre-activations (a trained transformer's
    dense layers)."""
    error = relative_error(input_relevance, output_relevance)
    extras = {"conservation": {"output_relevance": output_relevance, "input_relevance": input_relevance,
                               "relative_error": error}}
    if error is not None and error > UNCONSERVED:
        extras["warning"] = (f"LRP did not conserve relevance (input relevance {input_relevance:.4g} for an explained "
                             f"score of {output_relevance:.4g}, relative error {error:.3g}); the map is unreliable: "
                             "raise the dense layers' epsilon (lrp:/eps=0.25 on transformers) or use gxi or ig")
    return extras


def input_bounds(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Each channel's minimum and maximum over ``x`` (B, C, X, Y, Z): two tuples of C numbers."""
    channels = x.detach().transpose(0, 1).flatten(1)
    return tuple(channels.amin(1).tolist()), tuple(channels.amax(1).tolist())


def lrp(model: LoadedModel, x: torch.Tensor, target: Target, composite: Composite) -> Relevance:
    """Layer-wise relevance propagation of ``target`` for ``x`` with ``composite``'s rules.

    The network runs through ``model.forward`` once; the backward pass is autograd with each layer's
    gradient rewritten by its rule (see :mod:`.rules` and :mod:`.canonizers`). The network is restored
    on return, also on error. Both passes run in full float32 (no TF32, see :mod:`..precision`): the
    rules divide by pre-activations that must match the forward pass's.

    Args:
        x: (B, C, X, Y, Z) input on the model's device.
    Returns:
        A :class:`Relevance`.
    """
    network_input = x.detach().requires_grad_(True)
    with full_float32(), canonized(model.network, composite, network_input) as session, torch.enable_grad():
        output = model.forward(network_input)
        check_graph(output, session.origins, session.split_products)
        score = target(output)
        grad_input, grad_output = torch.autograd.grad(score.sum(), [network_input, output], allow_unused=True)
        deposited = session.relevance.value
        gates, attention = tuple(session.gates), session.attention
    relevance = torch.zeros_like(network_input) if grad_input is None else network_input.detach() * grad_input
    if deposited is not None:
        relevance = relevance + deposited
    start = (output.detach() * grad_output).flatten(1).sum(1)
    return Relevance(relevance.detach(), start.detach(), gates, attention)


class LRP(Method):
    """Layer-wise relevance propagation with a composite of rules (default: epsilon-plus-flat).

    Option ``COMPOSITE``, then optional ``/GATES`` with GATES ``signal`` (default) or ``uniform`` (how relevance
    crosses multiplicative gates and softmax attention: held constant, or AttnLRP's rules) and ``/eps=E`` (the
    ε of the dense layers' rule instead of the composite's 1e-6; transformers need a larger one), e.g.
    ``lrp:epsilon-gamma-box/uniform``, ``lrp:/eps=0.25``.
    """

    name = "lrp"
    label = "LRP"
    signed = True
    additive = True
    needs_internals = True
    summary = (f"layer-wise relevance propagation (option: composite, default {DEFAULT}; or "
               f"{', '.join(c for c in COMPOSITES if c != DEFAULT)}; "
               "/uniform splits gates' and attention's relevance (AttnLRP), /eps=E sets the dense layers' epsilon, "
               "e.g. lrp:zero/uniform, lrp:/eps=0.25)")

    def __init__(self, composite: str | Composite = DEFAULT, gates: str | None = None,
                 dense_epsilon: float | None = None) -> None:
        if isinstance(composite, str):
            if composite not in COMPOSITES:
                raise InputError(f"unknown LRP composite {composite!r}; use one of: {', '.join(COMPOSITES)}")
            composite = COMPOSITES[composite]
        if gates is not None:
            if gates not in GATE_SPLITS:
                raise InputError(f"unknown LRP gate split {gates!r}; "
                                 f"use one of: {', '.join(GATE_SPLITS)} (e.g. lrp:zero/uniform)")
            composite = replace(composite, gates=gates)
        if dense_epsilon is not None:
            if not (math.isfinite(dense_epsilon) and dense_epsilon >= 0):
                raise InputError(f"LRP's dense epsilon must be a number >= 0 (got {dense_epsilon}); e.g. lrp:/eps=0.25")
            composite = replace(composite, dense=Epsilon(dense_epsilon))
        self.composite, self.dense_epsilon = composite, dense_epsilon
        name = self.option()
        self.label = "LRP" if not name else f"LRP ({name})"

    @classmethod
    def from_option(cls, option: str | None, *, layer: str | None = None) -> "LRP":
        composite, *parts = [part.strip() for part in (option or "").strip().lower().split("/")]
        gates = epsilon = None
        for part in parts:
            if part.startswith("eps="):
                try:
                    epsilon = float(part[4:])
                except ValueError:
                    raise InputError(f"cannot read LRP option {part!r}; give eps=NUMBER, e.g. lrp:/eps=0.25") from None
            elif part:
                gates = part
        return cls(composite or DEFAULT, gates, epsilon)

    def option(self) -> str:
        """``COMPOSITE[/GATES][/eps=E]`` as given; empty for the default composite alone."""
        parts = [] if self.composite.gates == "signal" else [self.composite.gates]
        parts += [] if self.dense_epsilon is None else [f"eps={self.dense_epsilon:g}"]
        if self.composite.name == DEFAULT and not parts:
            return ""
        return "/".join([self.composite.name, *parts])

    @property
    def spec(self) -> str:
        option = self.option()
        return f"{self.name}:{option}" if option else self.name

    def begin_windows(self, x: torch.Tensor, pads) -> tuple[tuple[float, ...], tuple[float, ...]]:
        # z^B bounds of the whole volume as padded for the windows: each window's own extremes differ (seams)
        return input_bounds(sliding.pad(x, pads))

    def bounded(self, x: torch.Tensor, context: Context) -> tuple[Composite, dict | None]:
        """The composite with a z^B first rule's data bounds set to numbers: each channel's minimum and
        maximum over the whole volume (also in a window-by-window run), and those numbers for the record."""
        first = self.composite.first
        if not isinstance(first, ZBox) or (first.low is not None and first.high is not None):
            return self.composite, None
        whole = context.whole_volume if context.window is not None else None
        low, high = whole or input_bounds(x)
        rule = replace(first, low=low if first.low is None else first.low,
                       high=high if first.high is None else first.high)
        return replace(self.composite, first=rule), {"low": list(low), "high": list(high), "from": "whole volume"}

    def attribute(self, model: LoadedModel, x: torch.Tensor, target: Target, progress: Progress = NO_PROGRESS,
                  context: Context = NO_CONTEXT) -> Attribution:
        composite, bounds = self.bounded(x, context)
        result = lrp(model, x, target, composite)
        progress(1, 1, unit="passes")
        parameters = {"composite": self.composite.name, "rules": self.composite.describe()}
        if bounds is not None:
            parameters["input_bounds"] = bounds
        if result.gates:
            parameters["gates"] = {"rule": GATE_RULES[composite.gates], "count": len(result.gates)}
        if result.attention:
            parameters["attention"] = {"rule": ATTENTION_RULES[composite.gates], "count": result.attention}
        extras = conservation_extras(float(result.output.sum()), float(result.input.sum()))
        return Attribution(result.input[0].sum(0), signed=True, parameters=parameters, extras=extras)

    @classmethod
    def combine_extras(cls, extras: list[dict]) -> dict:
        """Window by window: relevances add up, so the conservation error is that of the sums."""
        start = sum(e["conservation"]["output_relevance"] for e in extras)
        end = sum(e["conservation"]["input_relevance"] for e in extras)
        return conservation_extras(start, end)
