"""shap, kernelshap, lime and shap-guided as methods: maps on the input grid that keep their sums, records with
standard errors and R², bad sample counts and hour-long runs refused in one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from support import SMALL_UNET, blob_volume, oblique_geometry, save_spec_model
from xaioverlay.cli import main
from xaioverlay.errors import InputError
from xaioverlay.explain import explain
from xaioverlay.models import load_model
from xaioverlay.volumes import Geometry, read_volume, write_volume
from xaioverlay.worker import method_catalogue

GRID = Geometry((24, 24, 24), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def blob(geometry=GRID):
    centre = geometry.ijk_to_ras_points(np.array([[s / 2 for s in geometry.size]]))[0]
    return blob_volume(geometry, centre, 5.0, value=2.0, noise=0.3)


@pytest.fixture
def unet(tmp_path):
    spec = save_spec_model(tmp_path / "unet", SMALL_UNET, task="segmentation", class_names=["background", "tumour"])
    return load_model(spec, device="cpu")


@pytest.mark.parametrize("spec", ["shap:4:cubes:12", "kernelshap:100:cubes:12", "shap-guided:8:cubes:12"])
def test_shapley_map_on_an_oblique_input_grid_sums_to_the_score_difference(unet, spec):
    """Σ values = f(x) − f(fill) (efficiency) in the record, and the written map (moved to an oblique input grid,
    additively) still sums to it."""
    volume = blob(oblique_geometry(size=(28, 24, 20), spacing=(1.0, 1.2, 1.5)))
    explanation = explain(unet, [volume], [spec], "channel:tumour")
    (result,) = explanation.results
    extras = result.extras
    assert extras["sum_values"] == pytest.approx(extras["score_difference"], rel=1e-6, abs=1e-6)
    assert extras["score_difference"] == pytest.approx(extras["full_score"] - extras["empty_score"])
    assert len(extras["standard_errors"]) == result.parameters["segment_count"] > 1
    assert float(result.model_grid_map.double().sum()) == pytest.approx(extras["sum_values"], rel=1e-4, abs=1e-5)
    written = float(result.volume.array.astype(np.float64).sum())
    assert written == pytest.approx(extras["sum_values"], rel=2e-2, abs=1e-4)


def test_kernelshap_with_too_few_coalitions_is_refused_in_one_line_before_any_work(unet, tmp_path, capsys):
    image = write_volume(blob(), tmp_path / "blob.nrrd")
    spec = tmp_path / "unet" / "model.yaml"
    code = main(["explain", "--model", str(spec), "--input", str(image), "--methods", "kernelshap:10",
                 "--segments", "cubes:12",
                 "--target", "channel:tumour", "--out", str(tmp_path / "out"), "--progress", "none", "--no-montage"])
    err = capsys.readouterr().err
    assert code == 1
    assert "kernelshap:10 over 8 segments needs at least 16 coalitions; use kernelshap:16 or more" in err
    assert not (tmp_path / "out" / "explanation.json").exists()


def test_a_run_that_would_take_hours_is_refused_with_its_estimated_time(unet):
    unet.passes.reset()
    expected = r"shap:4000000:cubes:12 over 8 segments needs about 28,000,002 model passes, about .* h "
    with pytest.raises(InputError, match=expected):
        explain(unet, [blob()], ["shap:4000000:cubes:12"], "channel:tumour")


class WavyScore(torch.nn.Module):
    """A classifier whose logit is the parity of how many of 8 equal segments of a volume of ones are kept
    (cos(8π · mean)): no linear surrogate fits it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = torch.cos(25.132741228718345 * x.flatten(1).mean(1))
        return torch.stack([-score, score], 1)


def test_low_lime_r2_is_a_warning_in_the_record_and_on_the_command_line(tmp_path, capsys):
    folder = tmp_path / "wavy"
    folder.mkdir()
    torch.jit.script(WavyScore()).save(str(folder / "wavy.ts"))
    (folder / "wavy.yaml").write_text(yaml.safe_dump({"task": "classification", "class_names": ["a", "b"],
                                                       "activation": "none"}))
    volume = blob()
    volume.array[:] = 1.0
    image = write_volume(volume, tmp_path / "ones.nrrd")
    code = main(["explain", "--model", str(folder / "wavy.ts"), "--input", str(image), "--methods",
                 "lime:200:cubes:12",
                 "--target", "class:b", "--out", str(tmp_path / "out"), "--progress", "none", "--no-montage"])
    err = capsys.readouterr().err
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "explanation.json").read_text())
    (method,) = record["methods"]
    assert method["extras"]["r2"] < 0.5
    assert "LIME: the linear surrogate explains little of the model (R²" in err
    assert "LIME: the linear surrogate explains little" in method["extras"]["warning"]


def test_segment_methods_are_in_the_method_catalogue_the_slicer_module_lists(unet):
    catalogue = {entry["name"]: entry for entry in method_catalogue(unet)}
    for name in ("shap", "kernelshap", "lime", "shap-guided"):
        assert catalogue[name]["allowed"], catalogue[name]
    assert catalogue["shap"]["signed"] and catalogue["lime"]["spec"].startswith("lime")


BN_UNET = {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
                                    "strides": [2, 2], "num_res_units": 1, "norm": "batch"}}


def test_segments_out_of_the_target_s_reach_get_exactly_zero_and_cost_no_samples(tmp_path):
    """A point target at one end of a long volume: the segments beyond the receptive field are dummy players
    (value 0, standard error 0); the game of the others still sums to the score difference."""
    model = load_model(save_spec_model(tmp_path / "bn", BN_UNET, task="segmentation", class_names=["b", "t"]),
                       device="cpu")
    geometry = Geometry((160, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    centre = geometry.ijk_to_ras_points(np.array([[6.0, 8.0, 8.0]]))[0]
    volume = blob_volume(geometry, centre, 4.0, value=2.0, noise=0.3)
    target = f"channel:t@point:{centre[0]},{centre[1]},{centre[2]},2"
    result = explain(model, [volume], ["shap:4:cubes:16"], target).results[0]
    extras, count = result.extras, result.parameters["segment_count"]
    reaching = extras["segments_reaching_target"]
    assert 2 <= reaching < count == 10
    errors = np.array(extras["standard_errors"])
    sums = [float(result.model_grid_map[16 * s:16 * (s + 1)].sum()) for s in range(count)]
    assert all(v == 0 for v in sums[reaching:]) and (errors[reaching:] == 0).all()
    assert extras["sum_values"] == pytest.approx(extras["score_difference"], rel=1e-6)
    assert extras["passes"] == 2 + 4 * (reaching - 1)


def test_shap_over_a_label_volume_given_in_the_method_spec_equals_the_two_player_shapley_values(unet, tmp_path):
    """``shap:4:labels:PATH``: two segments (label 0 and the blob); antithetic orders cover both orders of two
    players, so the values are exact: φ_blob = ½ (v(blob) − v(∅) + v(both) − v(background))."""
    volume = blob()
    labels = volume.__class__((volume.array > 1.0).astype(np.uint8), volume.geometry, "blob labels")
    path = write_volume(labels, tmp_path / "labels.nrrd")
    explanation = explain(unet, [volume], [f"shap:4:labels:{path}"], "channel:tumour")
    result = explanation.results[0]
    x, target = explanation.model_input.tensor, explanation.resolved_target
    inside = torch.from_numpy(labels.array > 0)[None, None]

    def v(keep: torch.Tensor) -> float:
        with torch.no_grad():
            return float(target(unet.forward(torch.where(keep, x, torch.zeros(())))))

    blob_value = 0.5 * (v(inside) - v(torch.zeros_like(inside)) + v(torch.ones_like(inside)) - v(~inside))
    assert result.parameters["segment_count"] == 2
    assert float(result.model_grid_map[inside[0, 0]].double().sum()) == pytest.approx(blob_value, rel=1e-4, abs=1e-5)


def test_evaluate_measures_shap_and_lime_and_puts_them_in_the_agreement_table(tmp_path):
    from support import SMALL_DENSENET

    spec = save_spec_model(tmp_path / "dense", SMALL_DENSENET, task="classification", class_names=["no", "yes"])
    image = write_volume(blob(Geometry((40, 36, 32), (1.5, 1.5, 2.0), (0.0, 0.0, 0.0))), tmp_path / "blob.nrrd")
    methods = ["gxi", "shap:6:cubes:20", "lime:40:cubes:20"]
    code = main(["evaluate", "--model", str(spec), "--input", str(image), "--methods", ",".join(methods),
                 "--target", "class:yes", "--step", "0.25", "--randomisation-depth", "2",
                 "--out", str(tmp_path / "out"),
                 "--progress", "none"])
    assert code == 0
    record = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert [m["spec"] for m in record["methods"]] == methods
    assert record["agreement"]["methods"] == methods
    for method in record["methods"][1:]:
        assert "deletion" in method["faithfulness"]["blur"]


def test_shap_guided_counts_permutations_like_shap_and_refuses_fewer_than_eight():
    from xaioverlay.methods.coalitions import GuidedShap, Shap

    assert GuidedShap.from_option("16").planned_passes(30) == Shap.from_option("16").planned_passes(30) == 2 + 16 * 29
    with pytest.raises(InputError, match="shap-guided:4 over 30 segments needs at least 8 permutations; "
                                         "use shap-guided:8 or more"):
        GuidedShap.from_option("4").check_samples(30)
