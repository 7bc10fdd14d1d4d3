"""``xaioverlay serve`` clicked through in a real Chromium: the token, Explain with three methods, the rendered
views' pixels over the phantom's tumour and elsewhere, next / previous case (previous from the cache), Cancel.

The tests share one server and one page and run in file order, as a user would click.
"""

from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # about two minutes in all on two shared cores; still part of `make test`

METHODS = ("gradcam", "gxi", "lrp")
DONE_TIMEOUT_MS = 240_000


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def view_pixels(page, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(the view's screenshot as (rows, columns, 3) uint8, its pixel → RAS matrix 4×4) of ``view-<method>``."""
    from PIL import Image

    view = page.get_by_test_id(f"view-{method}")
    matrix = np.array(json.loads(view.get_attribute("data-xy-to-ras"))).reshape(4, 4)
    pixels = np.asarray(Image.open(io.BytesIO(view.screenshot())).convert("RGB"))
    return pixels, matrix


def pixel_of(matrix: np.ndarray, rows: int, ras) -> tuple[int, int]:
    """(row, column) showing RAS point ``ras`` (projected on the slice) in a view of ``rows`` rows."""
    x, y, _, _ = np.linalg.inv(matrix) @ np.r_[np.asarray(ras, float), 1.0]
    return rows - 1 - int(round(y)), int(round(x))


def patch(pixels: np.ndarray, centre: tuple[int, int], radius: int) -> np.ndarray:
    """(N, 3) int: the pixels within ``radius`` of ``centre``."""
    rows, columns = np.ogrid[: pixels.shape[0], : pixels.shape[1]]
    inside = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius ** 2
    return pixels[inside].astype(int)


def coloured(rgb: np.ndarray) -> np.ndarray:
    """Overlay colours (heat or diverging tables) are far from grey; anatomy is grey."""
    return rgb.max(axis=-1) - rgb.min(axis=-1) > 60


def far_from_tumour(phantom, matrix: np.ndarray) -> np.ndarray:
    """RAS of the brain voxel on the view's slice farthest from the tumour (3 voxels inside the brain)."""
    from scipy.ndimage import binary_erosion

    geometry = phantom.image.geometry
    ras = geometry.ijk_to_ras_points(np.argwhere(binary_erosion(phantom.brain_mask.array > 0, iterations=3)))
    depth = (np.linalg.inv(matrix) @ np.c_[ras, np.ones(len(ras))].T)[2]  # in slices from the view's plane
    ras = ras[np.abs(depth) < 0.5]
    return ras[np.argmax(np.linalg.norm(ras - np.array(phantom.tumour_centre_ras), axis=1))]


def view_problems(page, phantom, methods) -> list[str]:
    """What is wrong with the views: each method's view must show the overlay over the tumour and plain anatomy
    on the other side of the head."""
    problems = []
    for method in methods:
        pixels, matrix = view_pixels(page, method)
        spacing = float(np.linalg.norm(matrix[:3, 0]))  # mm per pixel
        tumour = patch(pixels, pixel_of(matrix, pixels.shape[0], phantom.tumour_centre_ras),
                       int(0.6 * phantom.tumour_radius_mm / spacing))
        far = patch(pixels, pixel_of(matrix, pixels.shape[0], far_from_tumour(phantom, matrix)), 3)
        if coloured(tumour).mean() < 0.3:
            problems.append(f"{method}: no overlay over the tumour ({coloured(tumour).mean():.2f} of its pixels)")
        if coloured(far).any() or far.mean() < 40:
            problems.append(f"{method}: far from the tumour, not plain anatomy: {far.mean(axis=0).round()}")
    return problems


def check_views(page, phantom, methods=METHODS, timeout: float = 10.0) -> None:
    """:func:`view_problems` is empty within ``timeout`` seconds (the views' images stream in after the
    progress reads done)."""
    deadline = time.monotonic() + timeout
    while (problems := view_problems(page, phantom, methods)) and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    if problems and os.environ.get("XAIOVERLAY_SCREENSHOTS"):
        page.screenshot(path=str(Path(os.environ["XAIOVERLAY_SCREENSHOTS"]) / "failed.png"))
    assert not problems, problems


def run_and_wait(page, button: str, timeout_ms: int = DONE_TIMEOUT_MS, outcome: str = "done") -> float:
    """Click ``button`` and wait for the run it starts to end; the seconds from the click until the page's progress
    reads ``outcome`` (failing with the page's error if it ends otherwise)."""
    progress = page.get_by_test_id("progress")
    before = int(progress.get_attribute("data-run"))
    start = time.monotonic()
    page.get_by_test_id(button).click()
    page.wait_for_function(
        "before => { const p = document.querySelector('[data-testid=progress]');"
        " return Number(p.dataset.run) > before && ['done', 'failed', 'cancelled'].includes(p.textContent.trim()); }",
        arg=before, timeout=timeout_ms, polling=20)
    elapsed = time.monotonic() - start
    error = page.get_by_test_id("error").inner_text()
    assert progress.inner_text().strip() == outcome, f"{progress.inner_text()}: {error}"
    return elapsed


def tick(page, methods, ticked: bool = True) -> None:
    for method in methods:
        box = page.get_by_test_id(f"method-{method}").locator("input")
        box.check() if ticked else box.uncheck()


def test_requests_without_the_token_are_refused(served):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import aiohttp

    base = served.split("?")[0]
    assert served.startswith("http://127.0.0.1:")
    assert [status_of(base), status_of(base + "index.html"), status_of(base + "index.html?token=wrong")] == [403] * 3
    assert status_of(served) == 200

    async def websocket(cookies: dict) -> str:
        async with aiohttp.ClientSession(cookies=cookies) as session:
            try:
                async with session.ws_connect(base.replace("http", "ws") + "ws"):
                    return "open"
            except aiohttp.WSServerHandshakeError as error:
                return str(error.status)

    def opens(cookies: dict) -> str:  # on its own thread: a Playwright page of another test runs this one's loop
        with ThreadPoolExecutor(1) as thread:
            return thread.submit(asyncio.run, websocket(cookies)).result()

    token = served.split("token=")[1]
    assert opens({}) == "403"
    assert opens({"xaioverlay_token": "wrong"}) == "403"
    assert opens({"xaioverlay_token": token}) == "open"


def test_explain_three_methods_shows_maps_over_the_tumour(page, phantoms):
    tick(page, METHODS)
    run_and_wait(page, "explain")
    check_views(page, phantoms[0][0])
    rows = page.get_by_test_id("metrics-table").locator("tbody tr")
    assert rows.count() == 3
    labels = sorted(rows.nth(i).locator("td").first.inner_text() for i in range(3))
    assert labels == ["Grad-CAM", "Gradient × input", "LRP"]
    folder = os.environ.get("XAIOVERLAY_SCREENSHOTS")
    if folder:  # the README's picture: XAIOVERLAY_SCREENSHOTS=Docs/screenshots pytest Testing/web
        from PIL import Image

        shot = Image.open(io.BytesIO(page.screenshot(clip={"x": 0, "y": 0, "width": 1400, "height": 920})))
        shot.convert("RGB").quantize(256).save(Path(folder) / "browser.png", optimize=True)


def test_next_case_shows_its_maps_and_previous_comes_from_the_cache(page, phantoms):
    made, _ = phantoms
    run_and_wait(page, "case-next")
    assert "v-list-item--active" in page.get_by_test_id("case-1").get_attribute("class")
    check_views(page, made[1])
    elapsed = run_and_wait(page, "case-previous", 10_000)
    assert elapsed < 1.0, f"previous case's cached maps took {elapsed:.2f} s"
    assert "v-list-item--active" in page.get_by_test_id("case-0").get_attribute("class")
    check_views(page, made[0])


def test_orientation_reslices_every_view_and_a_row_click_enlarges_its_view(page, phantoms):
    axial = np.array(json.loads(page.get_by_test_id("view-gxi").get_attribute("data-xy-to-ras"))).reshape(4, 4)
    assert abs(axial[1, 1]) > 0 and axial[2, 1] == 0  # screen up is anterior
    page.get_by_test_id("orientation").click()
    page.get_by_role("option", name="Coronal").click()
    page.wait_for_function("() => [...document.querySelectorAll('[data-xy-to-ras]')].filter(e => e.dataset.xyToRas"
                           " !== '[]').every(e => JSON.parse(e.dataset.xyToRas)[9] !== 0)", timeout=30_000)  # up: S
    check_views(page, phantoms[0][0])  # each view resliced through the tumour, maps and anatomy in place
    widths = {method: page.get_by_test_id(f"view-{method}").bounding_box()["width"] for method in METHODS}
    rows = page.get_by_test_id("metrics-table").locator("tbody tr")
    row = next(i for i in range(rows.count()) if rows.nth(i).locator("td").first.inner_text() == "LRP")
    rows.nth(row).click()
    page.wait_for_function("() => !document.querySelector('[data-testid=view-gxi]').checkVisibility()", timeout=10_000)
    assert page.get_by_test_id("view-lrp").bounding_box()["width"] > 1.8 * widths["lrp"]
    assert not page.get_by_test_id("view-gradcam").is_visible()
    check_views(page, phantoms[0][0], ["lrp"])  # the enlarged view is rendered again at its new size
    rows.nth(row).click()
    page.get_by_test_id("view-gxi").wait_for(state="visible", timeout=10_000)


def test_cancel_during_a_run_leaves_a_working_page(page, phantoms):
    tick(page, METHODS, ticked=False)
    tick(page, ["ig"])
    page.get_by_test_id("explain").click()
    page.wait_for_function("() => document.querySelector('[data-testid=progress]').textContent.includes('/')",
                           timeout=120_000, polling=50)  # running: the progress counts passes
    page.get_by_test_id("cancel").click()
    page.wait_for_function("() => document.querySelector('[data-testid=progress]').textContent.trim() === 'cancelled'",
                           timeout=60_000, polling=50)
    assert page.get_by_test_id("explain").is_enabled()
    tick(page, ["ig"], ticked=False)
    tick(page, ["hirescam"])
    run_and_wait(page, "explain")
    check_views(page, phantoms[0][0], ["hirescam"])


def test_a_lower_threshold_shows_more_of_the_map(page):
    def overlay_pixels() -> int:
        return int(coloured(view_pixels(page, "hirescam")[0]).sum())

    before = overlay_pixels()
    page.get_by_test_id("threshold").get_by_role("slider").focus()
    page.keyboard.press("Home")  # the 50th percentile
    deadline = time.monotonic() + 10
    while (after := overlay_pixels()) < 1.3 * before and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    assert after >= 1.3 * before, (before, after)


def test_the_page_loads_nothing_from_another_host(page, served, requested):
    origin = served.split("/?")[0]
    assert len(requested) > 5  # the page, its scripts and styles, the websocket's images
    assert [url for url in requested if not url.startswith((origin + "/", "data:", "blob:"))] == []
