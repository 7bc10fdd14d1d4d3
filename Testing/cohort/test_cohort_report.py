"""The cohort report: performance numbers equal scikit-learn's, seeded bootstrap intervals, and a self-contained
page with every section for a real cohort run (a LocalCluster, a MONAI DenseNet, phantoms)."""

from __future__ import annotations

import base64
import json
import re
import shutil

import numpy as np
import pytest

from support import SMALL_DENSENET, SMALL_UNET, save_spec_model
from test_cohort_run import write_cases
from xaioverlay.cohort import CaseSettings, run_cohort
from xaioverlay.cohort.performance import (bootstrap_mean, class_performance, confusion_matrix, dice, label_index,
                                           roc_auc, sensitivity_specificity)
from xaioverlay.cohort.report import write_cohort_report
from xaioverlay.errors import InputError

metrics = pytest.importorskip("sklearn.metrics", reason="the reference for ROC AUC (scikit-learn, test extra)")
pytest.importorskip("distributed", reason="cohorts need dask[distributed] (the test extra installs it)")

#: A known table: labels, scores with ties across the classes, and the decisions at 0.5.
LABELS = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0])
SCORES = np.array([0.9, 0.1, 0.4, 0.7, 0.4, 0.6, 0.8, 0.2, 0.4, 0.3, 0.55, 0.05])


def test_roc_auc_sensitivity_specificity_equal_scikit_learn():
    decided = SCORES >= 0.5
    assert roc_auc(LABELS == 1, SCORES) == pytest.approx(metrics.roc_auc_score(LABELS, SCORES), abs=1e-12)
    sensitivity, specificity = sensitivity_specificity(LABELS == 1, decided)
    assert sensitivity == pytest.approx(metrics.recall_score(LABELS, decided))
    assert specificity == pytest.approx(metrics.recall_score(LABELS, decided, pos_label=0))
    assert confusion_matrix(LABELS, decided.astype(int), 2).tolist() == metrics.confusion_matrix(
        LABELS, decided.astype(int)).tolist()
    assert np.isnan(roc_auc(np.ones(4, bool), SCORES[:4])), "one class only: undefined, not 0 or 1"


def test_three_classes_one_against_the_rest_equal_scikit_learn():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 60)
    scores = rng.dirichlet(np.ones(3), 60) + np.eye(3)[truth] * 0.3
    predicted = scores.argmax(1)
    rows = class_performance(truth, predicted, scores, ["a", "b", "c"])
    for index, row in enumerate(rows):
        assert row.auc == pytest.approx(metrics.roc_auc_score(truth == index, scores[:, index]))
        assert row.sensitivity == pytest.approx(metrics.recall_score(truth == index, predicted == index))
    assert [r.name for r in class_performance(truth % 2, predicted % 2, scores[:, :2], ["no", "yes"])] == ["yes"]


def test_labels_match_classes_by_name_or_number():
    names = ["no tumour", "tumour"]
    assert [label_index(x, names) for x in ("1", "0", "Tumour", "1.0", "2", "maybe", None)] == [1, 0, 1, 1, None,
                                                                                               None, None]


def test_bootstrap_interval_contains_the_mean_and_is_reproducible():
    values = np.random.default_rng(7).exponential(2.0, 200)
    mean, low, high = bootstrap_mean(values)
    assert mean == pytest.approx(values.mean()) and low < mean < high
    assert (mean, low, high) == bootstrap_mean(values), "seeded: the same interval every time"
    assert bootstrap_mean(values, seed=1) != (mean, low, high)
    standard_error = values.std(ddof=1) / np.sqrt(values.size)
    assert high - low == pytest.approx(2 * 1.96 * standard_error, rel=0.15)
    assert bootstrap_mean([1.0, float("nan"), 3.0])[0] == 2.0


def test_dice_of_masks():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    a[:2], b[1:3] = True, True
    assert dice(a, b) == pytest.approx(0.5)
    assert np.isnan(dice(np.zeros(3, bool), np.zeros(3, bool)))


def resources(text: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)['"]""", text)


@pytest.fixture(scope="module")
def classifier_cohort(tmp_path_factory):
    """A real run: 8 phantoms (half with tumour, labelled), gxi and gradcam, 3 similar cases, one missing file."""
    root = tmp_path_factory.mktemp("report")
    model = save_spec_model(root / "model", SMALL_DENSENET, task="classification", class_names=["no tumour", "tumour"])
    lines = write_cases(root / "volumes", 8)
    lines.append("lost,nowhere.nrrd,1,")
    (root / "volumes" / "cases.csv").write_text("\n".join(lines) + "\n")
    settings = CaseSettings(model=str(model), methods="gxi,gradcam", device="cpu", similar=3)
    result = run_cohort(root / "volumes" / "cases.csv", settings, root / "out", workers=1)
    assert (result.done, result.failed) == (8, 1)
    return root / "out"


def test_report_of_a_real_cohort_has_every_section_and_no_network_resource(classifier_cohort, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(classifier_cohort, out)
    write_cohort_report(out)
    page = (out / "report.html").read_text(encoding="utf-8")
    for section in ("section-performance", "section-metrics", "section-disagreement", "section-cases"):
        assert f"id='{section}'" in page
    assert "section-strategies" not in page, "no strategies.json: no section"
    assert "id='confusion'" in page and "<td>tumour</td>" in page
    for key in ("runtime_s",):
        assert f"id='metric-{key}'" in page
    assert page.count("id='case-") == 9 and "failed: " in page and "nowhere.nrrd" in page

    links = resources(page)
    assert links and not [link for link in links if re.match(r"(?i)(https?:)?//", link)]
    for link in links:
        if link.startswith("data:"):
            assert link.startswith("data:image/png;base64,")
        elif not link.startswith("#"):
            assert (out / link).is_file(), f"relative link {link} leads to a file"
        else:
            assert f"id='{link[1:]}'" in page, f"anchor {link} exists"
    assert "cases/case_00/montage.png" in links and "cases/lost/montage.png" not in links
    similar_to_case_00 = re.search(r"<tr id='case-case_00'>(.*?)</tr>", page).group(1)
    assert similar_to_case_00.count("href='#case-case_") == 3

    # the classifier's numbers are scikit-learn's on the cases' own outputs
    truth, positive_probability = [], []
    for number in range(8):
        output = json.loads((out / "cases" / f"case_{number:02d}" / "explanation.json").read_text())["output"]
        truth.append(number % 2 == 0)
        positive_probability.append(output["probabilities"][1])
    expected = metrics.roc_auc_score(truth, positive_probability)
    auc_cell = re.search(r"<table id='performance'>.*?<td>tumour</td><td>4</td><td>4</td><td>([0-9.]+)</td>", page)
    assert auc_cell and float(auc_cell.group(1)) == pytest.approx(expected, abs=5e-4)


def test_report_shows_strategies_when_the_file_exists(classifier_cohort, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(classifier_cohort, out)
    (out / "strategies").mkdir()
    png = (out / "cases" / "case_00" / "montage.png").read_bytes()
    (out / "strategies" / "cluster_0.png").write_bytes(png)
    (out / "strategies.json").write_text(json.dumps({
        "method": "gxi", "descriptor": "grid 4x4x4", "chosen_k": 2, "eigenvalues": [0.0, 0.01, 0.9],
        "reference_case": "case_00",
        "clusters": [{"id": 0, "members": ["case_00", "case_02"], "mean_map": "strategies/cluster_0.nii.gz",
                      "mean_map_png": "strategies/cluster_0.png", "relevance_inside": 0.8, "relevance_outside": 0.2},
                     {"id": 1, "members": ["case_01"]}],  # optional keys missing: tolerated
    }))
    write_cohort_report(out)
    page = (out / "report.html").read_text(encoding="utf-8")
    strategies = page[page.index("id='section-strategies'"):page.index("id='section-cases'")]
    assert base64.b64encode(png).decode("ascii") in strategies, "the cluster's PNG is embedded"
    assert "Cluster 0 — 2 cases" in strategies and "Cluster 1 — 1 cases" in strategies
    assert "inside the reference masks: 0.800" in strategies and "outside the reference masks: 0.200" in strategies
    assert "href='#case-case_02'" in strategies and "clusters (eigengap): <b>2</b>" in strategies


def test_report_of_a_folder_without_a_cohort_is_refused_in_one_line(tmp_path):
    with pytest.raises(InputError, match="holds no cohort.csv"):
        write_cohort_report(tmp_path)


def test_segmenter_cohort_reports_dice_against_the_reference_mask(tmp_path):
    model = save_spec_model(tmp_path / "unet", SMALL_UNET, task="segmentation", class_names=["background", "tumour"])
    lines = write_cases(tmp_path / "volumes", 2)
    (tmp_path / "volumes" / "cases.csv").write_text("\n".join(lines) + "\n")
    settings = CaseSettings(model=str(model), methods="gxi", device="cpu", similar=0)
    result = run_cohort(tmp_path / "volumes" / "cases.csv", settings, tmp_path / "out", workers=1)
    assert result.done == 2
    page = write_cohort_report(tmp_path / "out").read_text(encoding="utf-8")
    record = json.loads((tmp_path / "out" / "cases" / "case_00" / "case.json").read_text())
    value = record["rows"][0]["dice"]
    assert value is not None and 0.0 <= value <= 1.0
    assert "Dice overlap of the predicted foreground" in page and f"{value:.3f}" in page


def test_report_of_a_cohort_where_every_case_failed_says_so(tmp_path):
    from xaioverlay.cohort.case import FAILED, failed_rows, write_case_folder
    from xaioverlay.cohort.manifest import Case
    from xaioverlay.cohort.table import write_table

    (tmp_path / "cases").mkdir()
    cases = [Case("a", (str(tmp_path / "a.nrrd"),), "1"), Case("b", (str(tmp_path / "b.nrrd"),), "0")]
    for case in cases:
        error = "cannot read it"
        write_case_folder(case, tmp_path / "cases", FAILED, failed_rows(case, "gxi", error), error)
    write_table(cases, tmp_path, 5)
    page = write_cohort_report(tmp_path).read_text(encoding="utf-8")
    assert "2 cases: 0 done, 2 failed" in page and "No done case: no model output to measure." in page
    assert page.count("failed: cannot read it") == 2
