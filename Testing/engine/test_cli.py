"""The command line: outputs, progress lines, and one clear line for every bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

from support import blob_volume
from xaioverlay.cli import main
from xaioverlay.volumes import Geometry, Volume, read_volume, write_volume

GRID = Geometry((64, 64, 48), (1.5, 1.5, 2.0), (10.0, -5.0, 3.0))


@pytest.fixture
def case(tmp_path, densenet_spec):
    image = write_volume(blob_volume(GRID, GRID.ijk_to_ras_points([[30, 34, 20]])[0], 8.0, noise=0.1), tmp_path / "case.nrrd")
    return densenet_spec, image


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_explain_writes_maps_json_and_montage_and_leaves_inputs_alone(tmp_path, capsys, case):
    model, image = case
    before = digest(image)
    code, out, err = run(capsys, "explain", "--model", model, "--input", image, "--methods", "gradcam,hirescam",
                         "--target", "class:tumour", "--out", tmp_path / "out", "--progress", "none")
    assert code == 0, err
    assert digest(image) == before
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["explanation.json", "gradcam.nrrd", "hirescam.nrrd", "montage.png"]  # no staging left behind
    record = json.loads((tmp_path / "out" / "explanation.json").read_text())
    assert record["target"]["name"] == "tumour" and record["target"]["kind"] == "class"
    assert record["output"]["predicted"] in ("no tumour", "tumour")
    assert {m["file"] for m in record["methods"]} == {"gradcam.nrrd", "hirescam.nrrd"}
    for method in record["methods"]:
        assert method["runtime_s"] > 0 and method["passes"] == {"forward": 1, "backward": 1}
        assert method["parameters"]["layer"] == "class_layers.relu" and "peak_memory_mb" in method
    png = sitk.ReadImage(str(tmp_path / "out" / "montage.png"))
    assert png.GetSize()[0] > 400


def test_progress_json_prints_one_event_per_line(tmp_path, capsys, case):
    model, image = case
    code, out, _ = run(capsys, "explain", "--model", model, "--input", image, "--methods", "gradcam",
                       "--out", tmp_path / "out", "--progress", "json")
    assert code == 0
    events = [json.loads(line) for line in out.strip().splitlines()]
    assert any(e["event"] == "progress" and e["method"] == "gradcam" and e["done"] == e["total"] for e in events)
    assert events[-1]["event"] == "result" and "explanation.json" in events[-1]["files"]


def test_layers_lists_candidates_and_marks_the_default(capsys, case):
    model, image = case
    code, out, _ = run(capsys, "layers", "--model", model, "--input", image)
    assert code == 0
    assert "class_layers.relu" in out and "(default)" in out.splitlines()[-1] and "features.denseblock4" in out


def write_raw(tmp_path, name, array, geometry=GRID):
    return write_volume(Volume(array, geometry), tmp_path / name)


@pytest.mark.parametrize("problem", ["missing", "truncated", "2d", "channels", "nan", "layer", "class", "empty_mask", "out_is_file"])
def test_bad_input_gives_one_line_and_non_zero_exit(tmp_path, capsys, case, problem):
    model, image = case
    args = {"--model": model, "--input": [image], "--methods": "gradcam", "--out": tmp_path / "out"}
    expected = {
        "missing": "no such file", "truncated": "cut.nii.gz is truncated or corrupt (the compressed stream ends early)",
        "2d": "not a 3D volume",
        "channels": "expects 1 input channel(s) but got 2", "nan": "NaN or infinite voxels",
        "layer": "unknown layer 'features.denseblok4'; close matches: features.denseblock4",
        "class": "unknown class 'tumor'; did you mean 'tumour'", "empty_mask": "is empty",
        "out_is_file": "is a file; give a folder",
    }[problem]
    if problem == "missing":
        args["--input"] = [tmp_path / "nowhere.nii.gz"]
    elif problem == "truncated":
        data = write_volume(read_volume(image), tmp_path / "whole.nii.gz").read_bytes()  # read without error today
        (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 3])
        args["--input"] = [tmp_path / "cut.nii.gz"]
    elif problem == "2d":
        sitk.WriteImage(sitk.Image(32, 32, sitk.sitkFloat32), str(tmp_path / "plane.nrrd"))
        args["--input"] = [tmp_path / "plane.nrrd"]
    elif problem == "channels":
        args["--input"] = [image, image]
    elif problem == "nan":
        array = np.ones(GRID.size, np.float32)
        array[3, 3, 3] = np.nan
        args["--input"] = [write_raw(tmp_path, "nan.nrrd", array)]
    elif problem == "layer":
        args["--layer"] = "features.denseblok4"
    elif problem == "class":
        args["--target"] = "class:tumor"
    elif problem == "empty_mask":
        from support import save_spec_model, SMALL_UNET

        args["--model"] = save_spec_model(tmp_path / "unet", SMALL_UNET, task="segmentation", class_names=["bg", "tumour"])
        args["--target"] = f"channel:1@mask:{write_raw(tmp_path, 'empty.nrrd', np.zeros(GRID.size, np.uint8))}"
    elif problem == "out_is_file":
        (tmp_path / "taken").write_text("x")
        args["--out"] = tmp_path / "taken"
    argv = ["explain"]
    for key, value in args.items():
        argv += [key, *(value if isinstance(value, list) else [value])]
    code, out, err = run(capsys, *argv, "--progress", "none")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xaioverlay: error: ") and expected in lines[0], err
    assert not (tmp_path / "out" / "explanation.json").exists()


def test_interrupt_leaves_no_partial_outputs(tmp_path, capsys, case, monkeypatch):
    from xaioverlay.methods.cam import HiResCAM

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(HiResCAM, "attribute", interrupted)  # Ctrl-C while the second method runs
    model, image = case
    code, _, err = run(capsys, "explain", "--model", model, "--input", image, "--methods", "gradcam,hirescam",
                       "--out", tmp_path / "out", "--progress", "none")
    assert code == 130 and "no partial outputs" in err
    assert list((tmp_path / "out").iterdir()) == []
