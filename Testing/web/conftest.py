"""Fixtures for the browser tests: ``xaioverlay serve`` as a real process on a free port (two demo phantoms, the
demo segmenter) and Debian's Chromium driven through Playwright (no browser download: ``tools/ensure_chromium.sh``
installs the system package)."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from xaioverlay.demo import DEMO_SEED
from xaioverlay.phantoms import make_phantom
from xaioverlay.volumes import write_volume

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    """(the two demo phantoms, the folder holding them as NRRD files)."""
    folder = tmp_path_factory.mktemp("cases")
    made = [make_phantom(DEMO_SEED + index) for index in range(2)]
    for index, phantom in enumerate(made):
        write_volume(phantom.image, folder / f"phantom_{index}.nrrd")
    return made, folder


def with_our_code() -> dict:
    """The environment for a subprocess running this checkout's ``xaioverlay``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "XAIOverlay"), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.fixture(scope="session")
def served(phantoms, tmp_path_factory):
    """The URL (with its token) that ``xaioverlay serve`` printed, for the session's server process."""
    _, folder = phantoms
    yield from serve_process(["--cases", str(folder), "--cache", str(tmp_path_factory.mktemp("cache"))],
                             tmp_path_factory.mktemp("serve"))


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


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    executable = os.environ.get("XAIOVERLAY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("no Chromium on the PATH; run tools/ensure_chromium.sh (or apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def requested() -> list[str]:
    """Every URL the page has requested so far."""
    return []


@pytest.fixture(scope="session")
def page(browser, served, requested):
    """One page for the whole workflow (cases explained earlier stay in the server's cache)."""
    tab = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
    tab.on("request", lambda request: requested.append(request.url))
    tab.goto(served)
    tab.get_by_test_id("explain").wait_for(timeout=60_000)
    yield tab
    tab.close()
