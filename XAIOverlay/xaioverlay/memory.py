"""Running out of memory: recognising it, and telling the user in one line how much is needed and how to need less."""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch

from .errors import ModelError
from .measure import available_memory_bytes

_REQUEST = re.compile(r"(?:tried to allocate|allocate)\s+([\d.]+)\s*(bytes|[KMGT]i?B)", re.IGNORECASE)
_UNITS = {"bytes": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30,
          "tb": 2**40, "tib": 2**40}


def is_out_of_memory(error: BaseException) -> bool:
    """True for PyTorch's and Python's out-of-memory errors (CPU or CUDA)."""
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        words in text for words in ("out of memory", "not enough memory", "can't allocate memory"))


def free_memory_bytes(device: torch.device) -> int:
    """Memory still available on ``device``.

    CUDA: free device memory; CPU: see :func:`~.measure.available_memory_bytes`."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_memory_bytes()


def requested_bytes(error: BaseException) -> int | None:
    """The size of the allocation that failed, when the error message says it (PyTorch's do)."""
    match = _REQUEST.search(str(error))
    if not match:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def out_of_memory_message(error: BaseException, device: torch.device, doing: str) -> str:
    """One line: what ran out, about how much more was needed, and how to need less."""
    free = free_memory_bytes(device)
    asked = requested_bytes(error)
    where = "GPU" if device.type == "cuda" else "memory"
    need = f"one allocation of {asked / 2**30:.1f} GB failed with {free / 2**30:.1f} GB free, so at least " \
        f"{(asked - free) / 2**30 + 0.1:.1f} GB more is needed" if asked else f"{free / 2**30:.1f} GB was free"
    fixes = ("explain a smaller target region (@point:R,A,S,RADIUS or @box:...), run fewer methods at once, "
             "close other programs")
    if device.type == "cuda":
        fixes += ", or use --device cpu (or turn on mixed precision)"
    return f"out of {where} while {doing} on {device}: {need}; to need less: {fixes}"


@contextlib.contextmanager
def out_of_memory_as_error(device: torch.device, doing: str) -> Iterator[None]:
    """Turn an out-of-memory error raised inside the block into one :class:`ModelError` line (no traceback)."""
    try:
        yield
    except Exception as error:  # MemoryError is an Exception too
        if not is_out_of_memory(error):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise ModelError(out_of_memory_message(error, device, doing)) from None
