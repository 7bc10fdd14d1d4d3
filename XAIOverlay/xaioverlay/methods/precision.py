"""Full float32 arithmetic for the methods whose results are exact by construction.

On NVIDIA GPUs since Ampere, PyTorch may run float32 convolutions and matrix products in TF32 (10-bit
mantissa); cuDNN convolutions do so by default. Occlusion's incremental engine compares a box's
recomputed activations with the clean ones, and LRP's rules divide by pre-activations recomputed with
other weights: with TF32 both carry rounding errors of about 1e-3 that the CPU never shows. Inside
:func:`full_float32` those computations run in IEEE float32; the user's settings come back on exit.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def float32_settings() -> tuple[bool, bool, str]:
    """(cuBLAS TF32 allowed, cuDNN TF32 allowed, float32 matmul precision) as they are now."""
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Run the block with TF32 (and reduced-precision float32 matmul) disabled; restore on exit, also on error.

    Mixed precision (``--amp``) is unaffected: it is the user's explicit choice of float16.
    """
    matmul, cudnn, precision = float32_settings()
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
