"""Runtime and peak memory of a piece of work (used for every map's record and the benchmarks).

Memory comes from portable sources only: ``psutil`` where it is importable (Slicer ships it; it is a
dependency of the package), else Linux's ``/proc``; with neither, the figure is left out and the record
says why — measuring never stops an explanation. Nothing here exists only on one operating system.
"""

from __future__ import annotations

import mmap
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

#: Why a CPU figure is missing, in the record's ``peak_memory_kind``.
NO_SOURCE = "not measured: install psutil for memory figures on this system"


def _psutil():
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def _proc_rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * mmap.PAGESIZE


def rss_reader() -> tuple[str, Callable[[], int]] | None:
    """(source name, a function giving this process's resident set size in bytes now), from ``psutil``
    or ``/proc``; None where neither exists."""
    psutil = _psutil()
    if psutil is not None:
        process = psutil.Process()
        return "psutil", lambda: int(process.memory_info().rss)
    try:
        _proc_rss()
    except OSError:
        return None
    return "/proc", _proc_rss


def available_memory_bytes(default: int = 4 * 2**30) -> int:
    """Memory the system can still give this process (``default`` where it cannot be read)."""
    psutil = _psutil()
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return default


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_memory_bytes: int | None = 0
    memory_kind: str = ""

    @property
    def peak_memory_mb(self) -> float | None:
        return None if self.peak_memory_bytes is None else round(self.peak_memory_bytes / 2**20, 1)


class measure:
    """Context manager timing a block and recording its peak memory above the level at entry.

    On CUDA: peak allocated device memory (``torch.cuda.max_memory_allocated``). On CPU: peak resident
    set size of the process, sampled every few milliseconds (``None`` with a note where no source exists).
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval = interval_s
        self.result = Measurement()
        self._stop = threading.Event()
        self._rss: Callable[[], int] | None = None
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._rss())

    def __enter__(self) -> Measurement:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            reader = rss_reader()
            if reader is not None:
                self._rss = reader[1]
                self._base = self._peak = self._rss()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        self._start = time.perf_counter()
        return self.result

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result.seconds = time.perf_counter() - self._start
            self.result.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            self.result.memory_kind = "cuda allocated"
            return
        self.result.seconds = time.perf_counter() - self._start
        if self._rss is None:
            self.result.peak_memory_bytes, self.result.memory_kind = None, NO_SOURCE
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.result.peak_memory_bytes = self._peak - self._base
        self.result.memory_kind = "cpu rss"
