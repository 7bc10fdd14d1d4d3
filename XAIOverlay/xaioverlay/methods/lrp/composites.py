"""Composites: which rule each kind of layer gets, by type and position.

Kinds (decided in :mod:`.canonizers`):

- ``first``: a convolution or dense layer reading the network input itself;
- ``convolution``: other convolutions and transposed convolutions (with any normalisation folded in);
- ``dense``: other ``nn.Linear`` layers;
- ``norm``: a normalisation that does not directly follow a convolution or dense layer (so it cannot
  be folded into one, e.g. DenseNet's and SegResNet's pre-activation BN/GN);
- ``activation``: an activation that is not piecewise linear (ELU, GELU, SiLU, tanh, ...).

ReLU, PReLU, LeakyReLU, pooling, upsampling, concatenation and sums need no rule (see :mod:`.rules`).
The named composites follow Kohlbrenner et al. (2020) and zennit's defaults (ε = 1e-6, γ = 0.25).
"""

from __future__ import annotations

from dataclasses import dataclass

from .rules import AlphaBeta, Epsilon, Flat, Gamma, Pass, Rule, ZBox

KINDS = ("first", "convolution", "dense", "norm", "activation")
#: How relevance crosses a multiplicative gate ``x · σ(g(x))`` (see :mod:`.canonizers`): ``signal`` —
#: the gate held constant, all to ``x`` (Arras et al. 2017, default); ``uniform`` — half to ``x``, half
#: into the gate's branch (AttnLRP's rule for products, Achtibat et al. 2024). The same choice decides softmax
#: attention: the attention matrix held constant, or AttnLRP's softmax and product rules.
GATE_SPLITS = ("signal", "uniform")


@dataclass(frozen=True)
class Composite:
    """A rule per layer kind (see the module docstring)."""

    name: str
    first: Rule
    convolution: Rule
    dense: Rule
    norm: Rule = Pass()
    activation: Rule = Pass()
    gates: str = "signal"

    def __post_init__(self) -> None:
        if self.gates not in GATE_SPLITS:
            raise ValueError(f"unknown gate split {self.gates!r}; use one of {', '.join(GATE_SPLITS)}")
        for kind in KINDS[1:]:
            if self.rule(kind).input_only:
                raise ValueError(f"{self.rule(kind).describe()} applies to the input layer only, not to {kind} layers")

    def rule(self, kind: str) -> Rule:
        return getattr(self, kind)

    def describe(self) -> dict[str, str]:
        return {kind: self.rule(kind).describe() for kind in KINDS}


DEFAULT = "epsilon-plus-flat"

COMPOSITES: dict[str, Composite] = {
    composite.name: composite
    for composite in (
        Composite("epsilon-plus-flat", first=Flat(), convolution=AlphaBeta(1, 0), dense=Epsilon(1e-6)),
        Composite("epsilon-gamma-box", first=ZBox(), convolution=Gamma(0.25), dense=Epsilon(1e-6)),
        Composite("epsilon-alpha2-beta1-flat", first=Flat(), convolution=AlphaBeta(2, 1), dense=Epsilon(1e-6)),
        Composite("epsilon-plus", first=AlphaBeta(1, 0), convolution=AlphaBeta(1, 0), dense=Epsilon(1e-6)),
        # LRP-0: the plain gradient through every layer (normalisations with detached statistics);
        # equals gradient × input on piecewise-linear networks — a sanity check, not a recommendation.
        Composite("zero", first=Epsilon(0), convolution=Epsilon(0), dense=Epsilon(0), norm=Epsilon(0)),
    )
}
