"""A state-dict spec stays data: only network classes that download nothing and an allow-list of
preprocessing transforms; anything that writes, downloads or takes code is refused in one line."""

from __future__ import annotations

import pytest
import yaml

from support import SMALL_DENSENET, SMALL_UNET, save_spec_model
from xaioverlay.errors import ModelError
from xaioverlay.models import load_model


def spec_with(tmp_path, preprocessing=None, network=None):
    path = save_spec_model(tmp_path / "s", SMALL_UNET, task="segmentation", class_names=["a", "b"])
    content = yaml.safe_load(path.read_text())
    content["preprocessing"] = preprocessing or []
    if network is not None:
        content["network"] = network
    path.write_text(yaml.safe_dump(content))
    return path


def refused(path, *fragments) -> None:
    with pytest.raises(ModelError) as error:
        load_model(path, device="cpu")
    message = str(error.value)
    assert "\n" not in message and all(f in message for f in fragments), message


@pytest.mark.parametrize("transform", [
    {"name": "SaveImaged", "args": {"keys": "image", "output_dir": "written_by_a_spec"}},
    {"name": "DataStatsd", "args": {"keys": "image", "prefix": "spec"}},
    {"name": "Lambdad", "args": {"keys": "image", "func": "print"}},
    {"_target_": "monai.transforms.SaveImaged", "keys": "image", "output_dir": "written_by_a_spec"},
])
def test_a_transform_that_writes_logs_or_takes_code_is_refused_naming_it_and_the_allowed_set(tmp_path, transform):
    name = transform.get("name") or transform["_target_"].rsplit(".", 1)[-1]
    path = spec_with(tmp_path, [{"name": "Orientationd", "args": {"keys": "image", "axcodes": "RAS"}}, transform])
    refused(path, f"transform {name} is not allowed", "allowed: ", "Spacingd", "NormalizeIntensityd")
    assert not (tmp_path / "written_by_a_spec").exists() and not (path.parent / "written_by_a_spec").exists()


def test_a_network_that_would_download_weights_is_refused(tmp_path):
    path = spec_with(tmp_path, network={"name": "DenseNet121", "args": {**SMALL_DENSENET["args"], "pretrained": True}})
    refused(path, "DenseNet121 with pretrained=True would download weights", "set pretrained: false")


def test_a_network_whose_default_downloads_weights_must_say_pretrained_false(tmp_path):
    args = {"model_name": "efficientnet-b0", "spatial_dims": 3, "in_channels": 1, "num_classes": 2}
    network = {"name": "EfficientNetBN", "args": args}
    refused(spec_with(tmp_path, network=network), "EfficientNetBN with pretrained=True")


def test_a_function_of_the_networks_module_is_refused(tmp_path):
    network = {"name": "get_pretrained_resnet_medicalnet", "args": {"resnet_depth": 10}}  # it downloads weights
    refused(spec_with(tmp_path, network=network), "get_pretrained_resnet_medicalnet is not a network class")


def test_a_spec_with_the_usual_preprocessing_still_loads(tmp_path):
    preprocessing = [
        {"name": "LoadImaged", "args": {"keys": "image"}}, {"name": "EnsureChannelFirstd", "args": {"keys": "image"}},
        {"name": "Orientationd", "args": {"keys": "image", "axcodes": "RAS"}},
        {"name": "Spacingd", "args": {"keys": "image", "pixdim": [1.5, 1.5, 2.0]}},
        {"name": "ScaleIntensityRanged",
         "args": {"keys": "image", "a_min": -100, "a_max": 200, "b_min": 0, "b_max": 1, "clip": True}},
        {"name": "CropForegroundd", "args": {"keys": "image", "source_key": "image"}},
        {"name": "DivisiblePadd", "args": {"keys": "image", "k": 4}},
        {"name": "EnsureTyped", "args": {"keys": "image"}},
    ]
    model = load_model(spec_with(tmp_path, preprocessing), device="cpu")
    assert [type(t).__name__ for t in model.transforms.transforms] == [
        "Orientationd", "Spacingd", "ScaleIntensityRanged", "CropForegroundd", "DivisiblePadd", "EnsureTyped"]
