"""A slow stand-in for the engine worker, for tests: the real worker (:func:`xaioverlay.worker.serve` and
:class:`~xaioverlay.worker.Worker`, real models and maps) with deliberate sleeps, as a user's machine
shows them (importing PyTorch, loading a large model, a long run).

    python slow_worker.py [--start S] [--describe S] [--explain S]

``--start`` sleeps before serving, ``--describe`` before every description, ``--explain`` before every
explanation. A request carrying ``"stuck": true`` hangs in one long step that neither reports progress
nor checks for cancel (as one pass of a TorchScript network would), until the process is killed.
"""

from __future__ import annotations

import argparse
import sys
import time

from xaioverlay import worker


class SlowWorker(worker.Worker):
    def __init__(self, delays: argparse.Namespace) -> None:
        super().__init__(send=lambda event: None)
        self.delays = delays

    def describe(self, request: dict) -> None:
        time.sleep(self.delays.describe)
        super().describe(request)

    def explain(self, request: dict, cancelled) -> None:
        if request.get("stuck"):
            time.sleep(3600)
        time.sleep(self.delays.explain)
        super().explain(request, cancelled)


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("start", "describe", "explain"):
        parser.add_argument(f"--{name}", type=float, default=0.0)
    delays = parser.parse_args()
    time.sleep(delays.start)
    return worker.serve(sys.stdin, sys.stdout, SlowWorker(delays))


if __name__ == "__main__":
    sys.exit(main())
