"""Talking to the engine worker (:mod:`xaioverlay.worker`) from Slicer: start, send, poll, cancel.

The worker is a child process speaking JSON lines. Two reader threads collect its stdout (events)
and stderr (kept as the last lines, to explain a crash); the Slicer side calls :meth:`WorkerClient.poll`
from a timer, so nothing here touches Qt or MRML and every call returns at once.

The process launcher is injected (default :class:`subprocess.Popen`), so the logic above it can be
driven by any process that speaks the protocol.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

#: The folder holding the ``xaioverlay`` package (the module's own folder in Slicer).
ENGINE_ROOT = Path(__file__).resolve().parents[1]


def default_command() -> list[str]:
    """``PythonSlicer -m xaioverlay.worker`` inside Slicer, the running interpreter elsewhere."""
    python = shutil.which("PythonSlicer", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [python or sys.executable, "-u", "-m", "xaioverlay.worker"]


def worker_environment(base: dict | None = None) -> dict:
    """The environment for the worker: ``xaioverlay`` importable, output unbuffered, text in UTF-8.

    UTF-8 mode makes the worker's pipes (which this client decodes as UTF-8) and every file a library
    opens without naming an encoding UTF-8, not the Windows code page (cp1252 and the like).
    """
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(ENGINE_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONUTF8"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


class WorkerClient:
    """One engine worker process, started on the first request and restarted after it dies.

    Events returned by :meth:`poll` are the worker's own (see :mod:`xaioverlay.worker`), plus
    ``{"event": "died", "id": ..., "message": ..., "stderr": [...], "returncode": N}`` once for every
    request that was in flight when the process ended unexpectedly (``id`` None when none was).
    """

    def __init__(
        self,
        command: list[str] | None = None,
        *,
        launcher: Callable[..., subprocess.Popen] = subprocess.Popen,
        env: dict | None = None,
        stderr_lines: int = 40,
        cancel_grace_s: float = 10.0,
    ) -> None:
        self.command = list(command or default_command())
        self.launcher = launcher
        self.env = env if env is not None else worker_environment()
        self.cancel_grace_s = cancel_grace_s
        self.process: subprocess.Popen | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self._events: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._in_flight: dict[str, dict] = {}
        self._cancel_deadlines: dict[str, float] = {}
        self._stopping = False
        self.starts = 0

    # --- process ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self.stderr_tail.clear()
        self._stopping = False
        extra = {"creationflags": subprocess.CREATE_NO_WINDOW} if sys.platform == "win32" else {}  # no console window
        self.process = self.launcher(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env, text=True, encoding="utf-8", errors="replace", bufsize=1, **extra,
        )
        self.starts += 1
        process = self.process
        threading.Thread(target=self._read_events, args=(process,), daemon=True, name="xaioverlay-events").start()
        threading.Thread(target=self._read_stderr, args=(process,), daemon=True, name="xaioverlay-stderr").start()

    def _read_events(self, process) -> None:
        for line in process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                self.stderr_tail.append(line)
                continue
            self._events.put((process, event))
        self._events.put((process, {"event": "_eof"}))

    def _read_stderr(self, process) -> None:
        for line in process.stderr:
            line = line.rstrip()
            if line:
                self.stderr_tail.append(line)

    def kill(self) -> None:
        """Stop the process now (its in-flight requests are reported by the next :meth:`poll`)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit; kill it if it has not within ``timeout`` seconds."""
        if self.process is None:
            return
        self._stopping = True
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"command": "shutdown"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=timeout)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.kill()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        self.process = None

    # --- requests ----------------------------------------------------------------------------
    def send(self, request: dict) -> str:
        """Send a request (an ``id`` is added if missing); starts the worker when needed."""
        request = dict(request)
        request.setdefault("id", f"r{next(self._ids)}")
        self.start()
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (OSError, ValueError):  # the process died before reading: poll() reports it
            pass
        self._in_flight[request["id"]] = request
        return request["id"]

    def cancel(self, request_id: str) -> None:
        """Ask the worker to stop ``request_id`` (and nothing else); if it has not answered within the
        grace period, :meth:`poll` kills the process and sends the other requests in flight again."""
        if request_id not in self._in_flight or not self.running:
            return
        try:
            self.process.stdin.write(json.dumps({"command": "cancel", "target_id": request_id}) + "\n")
            self.process.stdin.flush()
        except (OSError, ValueError):
            pass
        self._cancel_deadlines[request_id] = time.monotonic() + self.cancel_grace_s

    def poll(self, timeout: float = 0.0) -> list[dict]:
        """Events received since the last call (waiting up to ``timeout`` s for the first one)."""
        events: list[dict] = []
        try:
            item = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
            while True:
                events.extend(self._accept(*item))
                item = self._events.get_nowait()
        except queue.Empty:
            pass
        events.extend(self._overdue_cancels())
        if not events and self.process is not None and self.process.poll() is not None and self._in_flight:
            # exited without closing stdout yet (rare); wait for the reader to report the end
            try:
                events.extend(self._accept(*self._events.get(timeout=1.0)))
            except queue.Empty:
                events.extend(self._died(self.process))
        return events

    def _accept(self, process, event: dict) -> list[dict]:
        if event.get("event") == "_eof":
            if process is not self.process:
                return []
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # closed its output but kept running: not usable any more
                process.kill()
                process.wait(timeout=5)
            time.sleep(0.05)  # let the stderr reader take the last lines
            return self._died(process)
        if process is not self.process:
            return []
        rid = event.get("id")
        if event.get("event") in ("result", "error", "cancelled", "described"):
            self._in_flight.pop(rid, None)
            self._cancel_deadlines.pop(rid, None)
        return [event]

    def _died(self, process) -> list[dict]:
        code = process.returncode
        self.process = None
        lost = list(self._in_flight)
        self._in_flight.clear()
        cancelled = [rid for rid in lost if rid in self._cancel_deadlines]
        self._cancel_deadlines.clear()
        if self._stopping:
            return []
        tail = list(self.stderr_tail)[-8:]
        reason = " | ".join(tail) if tail else "no error output"
        message = f"the XAIOverlay worker stopped (exit code {code}): {reason}; the next request starts a fresh worker"
        events = [{"event": "cancelled", "id": rid} for rid in cancelled]
        died = [rid for rid in lost if rid not in cancelled] or ([None] if not cancelled else [])
        events += [{"event": "died", "id": rid, "message": message, "stderr": tail, "returncode": code} for rid in died]
        return events

    def _overdue_cancels(self) -> list[dict]:
        """Kill a worker that has not stopped a cancelled request within the grace period (stuck in
        one long step); the requests still wanted go to a fresh worker under their own ids."""
        now = time.monotonic()
        if not any(deadline < now for deadline in self._cancel_deadlines.values()):
            return []
        log.warning("the worker did not stop within %.0f s of cancel; restarting it", self.cancel_grace_s)
        self.kill()
        self.process = None  # what the killed process still reports is ignored (see _accept)
        cancelled = [rid for rid in self._in_flight if rid in self._cancel_deadlines]
        wanted = [request for rid, request in self._in_flight.items() if rid not in self._cancel_deadlines]
        self._in_flight.clear()
        self._cancel_deadlines.clear()
        events = [{"event": "cancelled", "id": rid} for rid in cancelled]
        for request in wanted:  # in the order they were first sent; the new worker loads the model again
            self.send(request)
            events.append({"event": "message", "id": request["id"], "stage": "restart",
                           "message": "worker restarted to stop a cancelled run; running again"})
        return events
