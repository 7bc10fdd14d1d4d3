"""``xaioverlay evaluate``: the three files, their content, a segmenter run, failures, and the report as
headless Chromium renders it (screenshot)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from support import SMALL_DENSENET, SMALL_UNET, blob_volume, oblique_geometry, save_spec_model
from xaioverlay.cli import main
from xaioverlay.metrics.report import BEST_COLOUR, PALETTE
from xaioverlay.volumes import Geometry, write_volume

METHODS = ["gradcam", "hirescam", "gradcampp"]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """One evaluate run of a small DenseNet on an oblique blob volume, with a reference mask."""
    folder = tmp_path_factory.mktemp("evaluate")
    spec = save_spec_model(folder / "model", SMALL_DENSENET, task="classification", class_names=["no tumour", "tumour"])
    geometry = oblique_geometry(size=(40, 36, 32), spacing=(1.5, 1.5, 2.0))
    centre = geometry.ijk_to_ras_points([[26, 14, 18]])[0]
    image = write_volume(blob_volume(geometry, centre, 9.0, value=2.0, noise=0.2), folder / "image.nrrd")
    mask_volume = blob_volume(geometry, centre, 9.0)
    mask = write_volume(mask_volume, folder / "mask.nii.gz")
    out = folder / "out"
    code = main(["evaluate", "--model", str(spec), "--input", str(image), "--reference-mask", str(mask),
                 "--methods", ",".join(METHODS), "--target", "class:tumour", "--step", "0.1",
                 "--randomisation-depth", "3", "--tolerance-mm", "4", "--out", str(out), "--progress", "none"])
    return {"code": code, "out": out, "mask": mask_volume}


def test_evaluate_writes_metrics_json_csv_and_report(classifier_run):
    assert classifier_run["code"] == 0
    out = classifier_run["out"]
    for name in ("metrics.json", "metrics.csv", "report.html", "explanation.json", "montage.png", "gradcam.nrrd"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    record = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert [m["spec"] for m in record["methods"]] == METHODS
    mask = classifier_run["mask"].array > 0
    chance = record["reference_mask"]["chance"]
    # no preprocessing: the model grid is the input grid, so chance is the mask's share of the volume
    assert chance["relevance_mass"] == pytest.approx(mask.mean())
    assert chance["pointing_game"] > chance["relevance_mass"]  # grown by the 4 mm tolerance
    for method in record["methods"]:
        curves = method["faithfulness"]["blur"]
        assert len(curves["deletion"]["scores"]) == len(curves["insertion"]["scores"]) == 11
        assert curves["deletion"]["scores"][0] == pytest.approx(record["target"]["value"], rel=1e-4)
        assert curves["insertion"]["scores"][-1] == pytest.approx(record["target"]["value"], rel=1e-4)
        assert set(method["localisation"]) >= {"pointing_game", "relevance_mass", "relevance_rank", "chance"}
        assert len(method["randomisation"]["spearman"]) == 3 and method["randomisation"]["verdict"] in ("pass", "fail")
        assert method["random_logit"]["other_class"] == "no tumour"
        assert method["metric_cost"]["faithfulness"]["passes"]["forward"] == 20
        assert method["metric_cost"]["road"]["passes"]["forward"] == 2 + 2 * 9  # original, blurred, 9 fractions × MoRF/LeRF
        assert method["road"]["morf"]["scores"][0] == pytest.approx(record["target"]["value"], rel=1e-4)
        assert method["cost"]["passes"] == {"forward": 1, "backward": 1}
    names = record["agreement"]["methods"]
    matrix = np.array(record["agreement"]["spearman"])
    assert names == METHODS and matrix.shape == (3, 3) and np.allclose(np.diag(matrix), 1) and np.allclose(matrix, matrix.T)
    with open(out / "metrics.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["method"] for row in rows] == METHODS
    assert float(rows[0]["relevance_mass_chance"]) == pytest.approx(mask.mean())
    assert float(rows[1]["deletion_auc_blur"]) == pytest.approx(record["methods"][1]["faithfulness"]["blur"]["deletion"]["normalised_auc"])


def test_report_is_self_contained(classifier_run):
    page = (classifier_run["out"] / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<script" not in page and "@import" not in page
    assert page.count('class="method-row"') == len(METHODS)
    assert "data:image/png;base64," in page and page.count("<svg") >= 3  # curves, ROAD, randomisation


def chromium() -> str:
    """The Chromium executable; the test FAILS (never skips) without one: ``make test`` installs it."""
    for name in (os.environ.get("XAIOVERLAY_CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.fail("no headless Chromium found: run 'make test' (tools/ensure_chromium.sh installs it) or set XAIOVERLAY_CHROMIUM")


def _headless(profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--host-resolver-rules=MAP * ~NOTFOUND", *arguments]  # nothing can be fetched: the page must not need it
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)


def _colour_pixels(image: np.ndarray, hex_colour: str, tolerance: int = 6) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    pixels = (image[..., :3] * 255).round() if image.dtype != np.uint8 else image[..., :3].astype(float)
    return int((np.abs(pixels - rgb).max(-1) <= tolerance).sum())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``xaioverlay evaluate`` on a held-out demo phantom with the demo classifier (coarse steps to stay quick)."""
    from xaioverlay.demo import CLASSIFIER, DEMO_SEED, bundle_path
    from xaioverlay.phantoms import make_phantom

    folder = tmp_path_factory.mktemp("demo")
    phantom = make_phantom(DEMO_SEED)
    image = write_volume(phantom.image, folder / "phantom_t1c.nrrd")
    mask = write_volume(phantom.tumour_mask, folder / "tumour_mask.nrrd")
    brain = write_volume(phantom.brain_mask, folder / "brain_mask.nrrd")
    out = folder / "out"
    code = main(["evaluate", "--model", str(bundle_path(CLASSIFIER)), "--input", str(image), "--target", "class:tumour",
                 "--reference-mask", str(mask), "--body-mask", str(brain), "--methods", ",".join(METHODS),
                 "--step", "0.2", "--randomisation-depth", "2", "--no-road", "--out", str(out), "--progress", "none"])
    return {"code": code, "out": out}


def test_evaluate_on_a_demo_phantom_writes_the_three_files(demo_run):
    assert demo_run["code"] == 0
    record = json.loads((demo_run["out"] / "metrics.json").read_text(encoding="utf-8"))
    assert record["model"]["format"] == "monai-bundle" and record["target"]["name"] == "tumour"
    assert record["comparison_region"]["name"] == "brain_mask"
    for name in ("metrics.csv", "report.html"):
        assert (demo_run["out"] / name).is_file()
    for method in record["methods"]:  # the trained classifier's score falls as its most relevant voxels go
        deletion = method["faithfulness"]["blur"]["deletion"]
        assert deletion["scores"][-1] < deletion["scores"][0]


def test_report_renders_in_headless_chromium(demo_run, tmp_path):
    from matplotlib.image import imread

    report = (demo_run["out"] / "report.html").resolve()
    dom = _headless(tmp_path / "profile-dom", "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-500:]
    assert dom.stdout.count('class="method-row"') == len(METHODS)
    assert '<table id="metrics">' in dom.stdout and "<svg" in dom.stdout
    shot = tmp_path / "report.png"
    result = _headless(tmp_path / "profile-shot", "--window-size=1400,3400", "--hide-scrollbars", f"--screenshot={shot}", report.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-500:]
    image = imread(shot)
    assert image.shape[0] == 3400 and image.shape[1] == 1400
    # the table: best cells are shaded; the plots: each method's line colour; the montage: inferno's yellow
    assert _colour_pixels(image, BEST_COLOUR) > 500
    for colour in PALETTE[: len(METHODS)]:
        assert _colour_pixels(image, colour, tolerance=10) > 40, colour  # legend swatches at least
    assert len(np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 500  # a rendered page, not blank


def test_evaluate_a_sliding_window_segmenter(tmp_path):
    spec = save_spec_model(tmp_path / "unet", SMALL_UNET, task="segmentation", class_names=["background", "tumour"],
                           sliding_window={"roi_size": [16, 16, 16], "overlap": 0.25})
    geometry = Geometry((24, 20, 16), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    centre = tuple(geometry.ijk_to_ras_points([[12, 10, 8]])[0])
    image = write_volume(blob_volume(geometry, centre, 6.0, noise=0.1), tmp_path / "image.nrrd")
    mask = write_volume(blob_volume(geometry, centre, 6.0), tmp_path / "mask.nrrd")
    body = write_volume(blob_volume(geometry, centre, 14.0), tmp_path / "body.nrrd")
    out = tmp_path / "out"
    code = main(["evaluate", "--model", str(spec), "--input", str(image), "--reference-mask", str(mask), "--body-mask", str(body),
                 "--methods", "gradcam", "--target", f"channel:tumour@mask:{mask}", "--step", "0.25", "--block", "4",
                 "--baselines", "zero,mean", "--randomisation-depth", "2", "--out", str(out), "--progress", "none"])
    assert code == 0
    record = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    method = record["methods"][0]
    assert set(method["faithfulness"]) == {"zero", "mean"}
    assert len(method["faithfulness"]["zero"]["deletion"]["scores"]) == 5
    assert method["random_logit"] is None  # a segmenter has no classes to swap
    assert record["agreement"]["region"] == "body mask" and record["comparison_region"]["voxels"] > 0
    assert "deletion AUC (zero)" in (out / "report.html").read_text(encoding="utf-8")


def test_a_bad_reference_mask_fails_in_one_line_and_writes_no_metrics(classifier_run, tmp_path, capsys):
    folder = classifier_run["out"].parent
    empty = blob_volume(Geometry((8, 8, 8), (1.0, 1.0, 1.0), (500.0, 500.0, 500.0)), (0, 0, 0), 1.0)  # far away, empty
    path = write_volume(empty, tmp_path / "empty.nrrd")
    out = tmp_path / "out"
    code = main(["evaluate", "--model", str(folder / "model" / "model.yaml"), "--input", str(folder / "image.nrrd"),
                 "--reference-mask", str(path), "--methods", "gradcam", "--out", str(out), "--progress", "none"])
    assert code == 1
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "reference mask" in message and "empty" in message
    assert not (out / "metrics.json").exists() and not (out / "report.html").exists()


def test_bad_metric_options_are_refused_before_any_work(tmp_path, capsys):
    code = main(["evaluate", "--model", str(tmp_path / "missing.yaml"), "--input", str(tmp_path / "x.nrrd"),
                 "--baselines", "noise", "--out", str(tmp_path / "out")])
    assert code == 1
    assert "unknown baseline" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_batched_windows_score_as_the_models_own_inferer(tmp_path):
    import torch

    from xaioverlay.metrics.faithfulness import target_scores
    from xaioverlay.models import load_model
    from xaioverlay.targets import Target

    spec = save_spec_model(tmp_path / "unet", SMALL_UNET, task="segmentation", class_names=["background", "tumour"],
                           sliding_window={"roi_size": [16, 16, 16], "overlap": 0.5, "mode": "gaussian"})
    model = load_model(spec, device="cpu")
    inputs = torch.randn((3, 1, 24, 20, 16), generator=torch.Generator().manual_seed(0))
    weights = torch.rand((24, 20, 16), generator=torch.Generator().manual_seed(1))
    target = Target(1, "tumour", weights=weights)
    batched = target_scores(model, target, inputs)
    one_by_one = torch.stack([target(model.infer(item[None]))[0] for item in inputs])
    assert model.sliding_window.sw_batch_size == 1  # the user's model is not changed
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("score", ["logit", "probability"])
def test_faithfulness_never_builds_a_sliding_window_models_whole_output(tmp_path, monkeypatch, score):
    import torch

    from xaioverlay.metrics import faithfulness
    from xaioverlay.models import load_model
    from xaioverlay.targets import Target

    spec = save_spec_model(tmp_path / "unet", SMALL_UNET, task="segmentation", class_names=["background", "tumour"],
                           sliding_window={"roi_size": [16, 16, 16], "overlap": 0.5, "mode": "gaussian"})
    model = load_model(spec, device="cpu")
    generator = torch.Generator().manual_seed(2)
    x = torch.randn((1, 1, 40, 32, 16), generator=generator)
    relevance = torch.randn((40, 32, 16), generator=generator)
    region = torch.zeros((40, 32, 16))
    region[2:8, 3:8, 4:12] = 1  # inside the first of the 4 × 3 windows only
    target = Target(1, "tumour", score, "softmax", weights=region)

    def whole_output(model, target, inputs):  # the reference: the target of the model's whole blended output
        return target(model.infer(inputs)).float()

    with monkeypatch.context() as patch:
        patch.setattr(faithfulness, "target_scores", whole_output)
        expected = faithfulness.deletion_insertion(model, x, relevance, target, step_fraction=0.1)

    def refuse(*args, **kwargs):
        raise AssertionError("the whole multi-channel output was built")

    monkeypatch.setattr(model, "infer", refuse)
    if score == "logit":  # a logit's region score adds up over windows: only the window holding it runs
        monkeypatch.setattr(model, "output_blocks", refuse)
    model.passes.reset()
    curves = faithfulness.deletion_insertion(model, x, relevance, target, step_fraction=0.1)
    for kind in ("deletion", "insertion"):
        np.testing.assert_allclose(curves[kind].scores, expected[kind].scores, rtol=1e-5, atol=1e-5)
        assert curves[kind].normalised_auc == pytest.approx(expected[kind].normalised_auc, rel=1e-4)
    inputs = 2 + 2 * 9  # the original, the baseline, 9 inner steps per curve
    assert model.passes.forward == inputs * (1 if score == "logit" else 12)


@pytest.mark.parametrize("sigma", [0.0, -2.0])
def test_a_blur_baseline_without_width_is_refused_in_one_line(sigma):
    from xaioverlay.errors import InputError
    from xaioverlay.metrics.evaluate import MetricOptions

    with pytest.raises(InputError, match="--blur-sigma-mm") as caught:
        MetricOptions(blur_sigma_mm=sigma)
    assert "\n" not in str(caught.value)
