"""Runtime and peak memory of a piece of work (used for every map's record and the benchmarks)."""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass

import torch


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process's lifetime peak is the best available
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    memory_kind: str = ""

    @property
    def peak_memory_mb(self) -> float:
        return round(self.peak_memory_bytes / 2**20, 1)


class measure:
    """Context manager timing a block and recording its peak memory above the level at entry.

    On CUDA: peak allocated device memory (``torch.cuda.max_memory_allocated``). On CPU: peak resident
    set size of the process, sampled every few milliseconds.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval = interval_s
        self.result = Measurement()
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __enter__(self) -> Measurement:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._peak = _rss_bytes()
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
        else:
            self.result.seconds = time.perf_counter() - self._start
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.result.peak_memory_bytes = self._peak - self._base
            self.result.memory_kind = "cpu rss"
