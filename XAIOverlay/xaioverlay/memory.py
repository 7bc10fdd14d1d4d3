"""Running out of memory: recognising it, telling the user in one line how much is needed and how to need less,
and batches that follow free memory (as many items as fit, halved when memory runs out anyway)."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Callable, Iterator

import torch

from .errors import ModelError
from .measure import available_memory_bytes

_REQUEST = re.compile(r"(?:tried to allocate|allocate)\s+([\d.]+)\s*(bytes|[KMGT]i?B)", re.IGNORECASE)
log = logging.getLogger(__name__)

#: Share of the free memory one batch of work may take: the rest is for what the caller already holds,
#: the backward pass's transient gradients, and other programs.
BATCH_SHARE = 0.25

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


def batch_that_fits(device: torch.device, item_bytes: int, most: int, share: float = BATCH_SHARE) -> int:
    """Items per batch: as many as fit in ``share`` of ``device``'s free memory at ``item_bytes`` each,
    at least 1 and at most ``most``."""
    return max(1, min(most, int(free_memory_bytes(device) * share // max(item_bytes, 1))))


@contextlib.contextmanager
def saved_for_backward() -> Iterator[dict[int, int]]:
    """Measure what autograd keeps for the backward pass of the graph built inside the block.

    Yields a dict that fills up as the block runs: one entry per distinct storage saved
    (data pointer → bytes). Its sum is what one backward pass holds until it runs (a network's
    activations), whatever the device and without sampling memory; gradients made during the backward
    pass come on top. Graphs that autograd does not see (a fused TorchScript graph) may be counted short.
    """
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor.detach()  # the same storage; no reference back to the graph (no cycle)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


def run_in_batches(count: int, run: Callable[[int, int], None], size: Callable[[], int], doing: str) -> None:
    """Call ``run(start, stop)`` on consecutive batches covering items ``0 .. count − 1``.

    ``size()`` is asked before every batch, so it may follow what earlier batches measured. A batch that
    runs out of memory is run again with half as many items, and no later batch is larger; ``run`` must
    change nothing before it succeeds. One item out of memory is raised as it is (see
    :func:`out_of_memory_as_error` for the one line the user sees).
    """
    largest, start = count, 0
    while start < count:
        stop = min(start + max(1, min(size(), largest)), count)
        try:
            run(start, stop)
        except Exception as error:  # MemoryError is an Exception too
            if not is_out_of_memory(error) or stop - start <= 1:
                raise
            largest = (stop - start) // 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.info("%s: out of memory with %d items at once; trying %d", doing, stop - start, largest)
            continue
        start = stop
