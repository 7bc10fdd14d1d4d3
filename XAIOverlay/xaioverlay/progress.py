"""Progress reporting: library code calls :class:`Progress`; the CLI draws a bar, the worker prints JSON.

A callback receives plain dicts (JSON-ready), for example::

    {"event": "progress", "method": "occlusion", "done": 120, "total": 640, "unit": "passes"}

A callback may raise :class:`~xaioverlay.errors.Cancelled` to stop the run; methods report often
enough that cancelling is prompt.
"""

from __future__ import annotations

from typing import Callable

ProgressCallback = Callable[[dict], None]


class Progress:
    """Reports steps of one piece of work, tagged with its context (method, stage, ...)."""

    def __init__(self, callback: ProgressCallback | None = None, **context) -> None:
        self.callback = callback
        self.context = context

    def __call__(self, done: int, total: int, unit: str = "steps", **info) -> None:
        if self.callback is not None:
            self.callback({"event": "progress", **self.context, "done": int(done), "total": int(total), "unit": unit, **info})

    def message(self, text: str, **info) -> None:
        if self.callback is not None:
            self.callback({"event": "message", **self.context, "message": text, **info})

    def child(self, **context) -> "Progress":
        return Progress(self.callback, **{**self.context, **context})


NO_PROGRESS = Progress()
