"""Occlusion sensitivity for volumes: exact (with exact speed-ups) and adaptive (coarse to fine)."""

from .adaptive import AdaptiveOcclusion
from .method import Occlusion
from ..masking import BRUTE_FORCE, Speedups

__all__ = ["AdaptiveOcclusion", "BRUTE_FORCE", "Occlusion", "Speedups"]
