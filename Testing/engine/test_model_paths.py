"""A file picked inside a MONAI bundle stands for the bundle (file dialogs hand over files, a bundle is a
folder); every other model path is taken as given."""

from __future__ import annotations

import json

import pytest

from xaioverlay.cli import main
from xaioverlay.demo import bundle_path
from xaioverlay.model_files import resolve_model_path
from xaioverlay.phantoms import make_phantom
from xaioverlay.volumes import write_volume


@pytest.fixture
def bundle(tmp_path):
    root = tmp_path / "spleen_ct"
    for name in ("configs/inference.json", "configs/metadata.json", "configs/train.yaml", "models/model.pt",
                 "models/model.ts", "docs/README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("{}", encoding="utf-8")
    return root


@pytest.mark.parametrize("picked", ["configs/inference.json", "configs/metadata.json", "configs/train.yaml",
                                    "configs", "models/model.pt", "models", "."])
def test_a_file_or_folder_inside_a_bundle_resolves_to_the_bundle(bundle, picked):
    assert resolve_model_path(bundle / picked) == bundle / "." == bundle


def test_torchscript_inside_a_bundle_and_files_elsewhere_stay_themselves(bundle, tmp_path):
    assert resolve_model_path(bundle / "models" / "model.ts") == bundle / "models" / "model.ts"
    assert resolve_model_path(bundle / "docs" / "README.md") == bundle / "docs" / "README.md"
    spec_folder = tmp_path / "project" / "configs"  # a spec kept in a folder named configs, no bundle around it
    spec_folder.mkdir(parents=True)
    (spec_folder / "net.yaml").write_text("{}", encoding="utf-8")
    (spec_folder / "net.pt").write_text("{}", encoding="utf-8")
    assert resolve_model_path(spec_folder / "net.yaml") == spec_folder / "net.yaml"
    missing = tmp_path / "missing" / "configs" / "inference.json"
    assert resolve_model_path(missing) == missing


def test_explain_accepts_a_bundles_inference_json_as_the_model(tmp_path, capsys):
    image = write_volume(make_phantom(seed=7).image, tmp_path / "case.nrrd")
    picked = bundle_path("tumour_classifier") / "configs" / "inference.json"
    code = main(["explain", "--model", str(picked), "--input", str(image), "--methods", "gradcam",
                 "--out", str(tmp_path / "out"), "--progress", "none", "--no-montage"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "explanation.json").read_text(encoding="utf-8"))
    assert record["model"]["format"] == "monai-bundle" and record["model"]["source"] == str(picked.parents[1])


def test_the_workers_model_cache_keys_a_picked_config_file_as_its_bundle(bundle):
    from xaioverlay.worker import ModelCache

    loaded = []
    cache = ModelCache(loader=lambda path, device, amp: loaded.append(path) or object())
    first, hit = cache.get(str(bundle / "configs" / "inference.json"))
    assert not hit and loaded == [str(bundle)]
    assert cache.get(str(bundle)) == (first, True)
    (bundle / "models" / "model.pt").write_text("retrained", encoding="utf-8")  # new weights: a new key
    assert cache.get(str(bundle / "configs" / "inference.json"))[1] is False
