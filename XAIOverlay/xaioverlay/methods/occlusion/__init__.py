"""Occlusion sensitivity for volumes: exact (with exact speed-ups) and adaptive (coarse to fine)."""

from ..masking import BRUTE_FORCE, Speedups
from .adaptive import AdaptiveOcclusion
from .method import Occlusion

__all__ = ["AdaptiveOcclusion", "BRUTE_FORCE", "Occlusion", "Speedups"]
