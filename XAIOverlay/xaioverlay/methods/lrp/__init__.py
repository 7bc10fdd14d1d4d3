"""Layer-wise relevance propagation for 3D networks, built like zennit: rules (:mod:`.rules`) say how
relevance crosses a layer, composites (:mod:`.composites`) say which rule each layer gets, canonizers
(:mod:`.canonizers`) attach them to a network for one attribution and restore it afterwards."""

from .attribution import LRP, Relevance, lrp
from .composites import COMPOSITES, DEFAULT, Composite
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Pass, Rule, ZBox

__all__ = ["LRP", "Relevance", "lrp", "COMPOSITES", "DEFAULT", "Composite",
           "AlphaBeta", "Epsilon", "Flat", "Gamma", "Pass", "Rule", "ZBox"]
