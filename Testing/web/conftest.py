"""Fixtures for the browser tests: ``xaioverlay serve`` as a real process on a free port (two demo phantoms, the
demo segmenter) and Debian's Chromium driven through Playwright (no browser download: ``tools/ensure_chromium.sh``
installs the system package)."""

from __future__ import annotations

import os
import shutil

import pytest

from web_support import serve_process
from xaioverlay.demo import DEMO_SEED
from xaioverlay.phantoms import make_phantom
from xaioverlay.volumes import write_volume


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    """(the two demo phantoms, the folder holding them as NRRD files)."""
    folder = tmp_path_factory.mktemp("cases")
    made = [make_phantom(DEMO_SEED + index) for index in range(2)]
    for index, phantom in enumerate(made):
        write_volume(phantom.image, folder / f"phantom_{index}.nrrd")
    return made, folder


@pytest.fixture(scope="session")
def served(phantoms, tmp_path_factory):
    """The URL (with its token) that ``xaioverlay serve`` printed, for the session's server process."""
    _, folder = phantoms
    yield from serve_process(["--cases", str(folder), "--cache", str(tmp_path_factory.mktemp("cache"))],
                             tmp_path_factory.mktemp("serve"))


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
