"""``xaioverlay serve --cohort DIR`` in a real Chromium: a two-case cohort's stored maps shown with nothing sent
to the worker, Next showing the second case's stored maps, the cohort table's values in the page's table, and
the similar-cases list jumping back."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from web_support import serve_process, with_our_code
from test_browser_workflow import check_views, run_and_wait, tick

pytestmark = pytest.mark.slow  # a cohort run, a server start and a browser: about two minutes on two shared cores

METHODS = ["gradcam", "gxi"]


@pytest.fixture(scope="module")
def cohort(phantoms, tmp_path_factory):
    """The cohort folder of the demo segmenter on the two phantoms (Grad-CAM and gradient × input)."""
    from xaioverlay.demo import SEGMENTER, bundle_path

    _, folder = phantoms
    out = tmp_path_factory.mktemp("cohort") / "out"
    done = subprocess.run([sys.executable, "-m", "xaioverlay", "cohort", "--model", str(bundle_path(SEGMENTER)),
                           "--cases", str(folder), "--out", str(out), "--methods", ",".join(METHODS),
                           "--workers", "1", "--similar", "1", "--no-montage", "--progress", "none"],
                          capture_output=True, text=True, env=with_our_code(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def cohort_page(browser, cohort, tmp_path_factory):
    """The page of ``serve --cohort`` with the cohort's model: the worker could compute, and must not."""
    from xaioverlay.demo import SEGMENTER, bundle_path

    arguments = ["--cohort", str(cohort), "--model", str(bundle_path(SEGMENTER)),
                 "--cache", str(tmp_path_factory.mktemp("cache"))]  # an empty cache: nothing computed before
    for url in serve_process(arguments, tmp_path_factory.mktemp("serve-cohort")):
        tab = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
        tab.goto(url)
        tab.wait_for_function("() => document.querySelector('[data-testid=progress]')?.textContent.trim() === 'done'",
                              timeout=60_000)
        yield tab
        tab.close()


def requests_sent(page) -> str:
    return page.get_by_test_id("progress").get_attribute("data-requests-sent")


def table_column(page, title: str) -> list[str]:
    table = page.get_by_test_id("metrics-table")
    titles = [cell.inner_text() for cell in table.locator("thead th").all()]
    assert title in titles, titles
    return [row.locator("td").nth(titles.index(title)).inner_text() for row in table.locator("tbody tr").all()]


def test_the_first_case_shows_its_stored_maps_and_table_rows_with_nothing_computed(cohort_page, cohort, phantoms):
    check_views(cohort_page, phantoms[0][0], METHODS)
    assert requests_sent(cohort_page) == "0"
    assert "stored maps" in cohort_page.get_by_test_id("status").inner_text()
    with open(cohort / "cohort.csv", newline="", encoding="utf-8") as stream:
        stored = [row for row in csv.DictReader(stream) if row["case_id"] == "phantom_0"]
    shown = table_column(cohort_page, "predicted_volume_ml_tumour")
    assert [float(value) for value in shown] == pytest.approx([float(row["predicted_volume_ml_tumour"])
                                                               for row in stored], rel=1e-3)


def test_next_shows_the_second_cases_stored_maps_and_a_similar_case_jumps_back(cohort_page, phantoms):
    made, _ = phantoms
    elapsed = run_and_wait(cohort_page, "case-next", 20_000)
    assert "v-list-item--active" in cohort_page.get_by_test_id("case-1").get_attribute("class")
    check_views(cohort_page, made[1], METHODS)
    assert requests_sent(cohort_page) == "0", f"the worker was asked to compute ({elapsed:.1f} s)"
    similar = cohort_page.get_by_test_id("similar-phantom_0")
    assert "0.9" in similar.inner_text()  # its cosine similarity
    similar.click()
    cohort_page.wait_for_function("() => document.querySelector('[data-testid=case-0]')"
                                  ".classList.contains('v-list-item--active')", timeout=20_000)
    check_views(cohort_page, made[0], METHODS, timeout=20.0)
    assert requests_sent(cohort_page) == "0"


def test_with_the_model_explain_computes_a_method_the_cohort_did_not_run(cohort_page, phantoms):
    tick(cohort_page, METHODS, ticked=False)
    tick(cohort_page, ["lrp"])  # offered after the cohort's methods, from the model
    run_and_wait(cohort_page, "explain")
    check_views(cohort_page, phantoms[0][0], ["lrp"])
    assert requests_sent(cohort_page) == "1"


def test_without_a_model_the_stored_maps_show_and_explain_is_disabled_with_its_reason(browser, cohort, phantoms,
                                                                                       tmp_path):
    for url in serve_process(["--cohort", str(cohort), "--cache", str(tmp_path / "cache")], tmp_path):
        tab = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
        tab.goto(url)
        tab.wait_for_function("() => document.querySelector('[data-testid=progress]')?.textContent.trim() === 'done'",
                              timeout=60_000)
        check_views(tab, phantoms[0][0], METHODS)
        assert tab.get_by_test_id("explain").is_disabled()
        assert "needs a model" in tab.get_by_test_id("explain-reason").inner_text()
        offered = tab.locator("[data-testid^=method-]").evaluate_all("boxes => boxes.map(b => b.dataset.testid)")
        assert offered == [f"method-{method}" for method in METHODS]  # the cohort's methods only: none computes
        tab.close()
