"""Helpers of the browser tests (a plain module: every folder's conftest.py is imported as ``conftest``, so
names imported from one depend on which was loaded last)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def with_our_code() -> dict:
    """The environment for a subprocess running this checkout's ``xaioverlay``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "XAIOverlay"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def serve_process(arguments: list[str], folder: Path):
    """Start ``xaioverlay serve ARGUMENTS`` on a free port, yield the URL it printed, stop it (its stderr in
    ``folder``)."""
    command = [sys.executable, "-m", "xaioverlay", "-v", "serve", *arguments, "--port", "0"]
    env = with_our_code()
    log = open(folder / "stderr.txt", "w+", encoding="utf-8")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, process.stdout), lines.put("")], daemon=True).start()
    try:
        url = lines.get(timeout=180).strip()  # "": the process ended first
    except queue.Empty:
        url = ""
    if not url:
        process.kill()
        log.seek(0)
        pytest.fail(f"xaioverlay serve printed no address within 180 s; stderr:\n{log.read()[-3000:]}")
    try:
        yield url
    finally:  # also when the test using it fails
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
