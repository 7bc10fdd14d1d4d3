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

import torch

#: Why a CPU figure is missing, in the record's ``peak_memory_kind``.
NO_SOURCE = "not measured: install psutil for memory figures on this system"


def _psutil():
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def rss_source() -> str | None:
    """Where :func:`rss_bytes` reads from: ``psutil``, ``/proc`` or None (no figure on this system)."""
    if _psutil() is not None:
        return "psutil"
    try:
        with open("/proc/self/statm", encoding="ascii"):
            return "/proc"
    except OSError:
        return None


def rss_bytes(source: str | None) -> int:
    """This process's resident set size now, read from ``source`` (see :func:`rss_source`)."""
    if source == "psutil":
        return int(_psutil().Process().memory_info().rss)
    if source == "/proc":
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * mmap.PAGESIZE
    return 0


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
        self._source: str | None = None
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes(self._source))

    def __enter__(self) -> Measurement:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._source = rss_source()
            self._base = self._peak = rss_bytes(self._source)
            if self._source is not None:
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
        if self._source is None:
            self.result.peak_memory_bytes, self.result.memory_kind = None, NO_SOURCE
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes(self._source))
        self.result.peak_memory_bytes = self._peak - self._base
        self.result.memory_kind = "cpu rss"
