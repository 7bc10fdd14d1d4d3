"""The committed demo bundles: layout, configs MONAI can parse, weights that load, recorded figures.

Fast checks only (a few forward passes on one phantom); the held-out figures themselves are measured
by tools/train_demo_models.py and recorded in each bundle's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose

from support import assert_bundle_layout
from xaioverlay.phantoms import DEFAULT_GEOMETRY, make_phantom

BUNDLES = Path(__file__).resolve().parents[2] / "Resources" / "bundles"
NAMES = ("tumour_classifier", "tumour_segmenter")
EXPECTED_TRANSFORMS = [
    ("LoadImaged", {"keys": "image"}),
    ("EnsureChannelFirstd", {"keys": "image"}),
    ("Orientationd", {"keys": "image", "axcodes": "RAS"}),
    ("Spacingd", {"keys": "image", "pixdim": [2.5, 2.5, 2.5], "mode": "bilinear"}),
    ("NormalizeIntensityd", {"keys": "image", "nonzero": True}),
    ("EnsureTyped", {"keys": "image"}),
]


def _config(name: str, file: str) -> dict:
    return json.loads((BUNDLES / name / "configs" / file).read_text())


def _load(name: str):
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / name / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLES / name)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(BUNDLES / name / "models" / "model.pt", weights_only=True))
    return parser, network.eval()


def _preprocess(parser, volume) -> torch.Tensor:
    transforms = parser.get_parsed_content("preprocessing").transforms
    loaded = MetaTensor(
        torch.from_numpy(volume.array),
        affine=torch.from_numpy(volume.geometry.ijk_to_ras()),
        meta={"original_channel_dim": "no_channel"},
    )
    return Compose(transforms[1:])({"image": loaded})["image"]


@pytest.mark.parametrize("name", NAMES)
def test_bundle_layout_and_size(name):
    assert_bundle_layout(BUNDLES / name)


@pytest.mark.parametrize("name", NAMES)
def test_inference_config_has_the_agreed_keys_and_preprocessing(name):
    config = _config(name, "inference.json")
    for key in ("imports", "bundle_root", "device", "network_def", "network", "preprocessing", "inferer", "postprocessing"):
        assert key in config, key
    assert config["network"] == "$@network_def.to(@device)"
    transforms = [(t["_target_"], {k: v for k, v in t.items() if k != "_target_"}) for t in config["preprocessing"]["transforms"]]
    assert transforms == EXPECTED_TRANSFORMS
    post = config["postprocessing"]["transforms"]
    assert post[0] == {"_target_": "Activationsd", "keys": "pred", "softmax": True}
    if name == "tumour_classifier":
        assert config["inferer"]["_target_"] == "SimpleInferer" and len(post) == 1
        assert config["network_def"]["_target_"].endswith("ResNet")
    else:
        assert config["inferer"] == {
            "_target_": "SlidingWindowInferer", "roi_size": [64, 64, 64], "sw_batch_size": 1, "overlap": 0.25
        }
        assert post[1] == {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}
        assert config["network_def"]["_target_"].endswith("UNet")


@pytest.mark.parametrize("name", NAMES)
def test_metadata_records_format_and_held_out_figures(name):
    meta = _config(name, "metadata.json")
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "task", "description", "authors", "copyright"):
        assert meta[key], key
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["type"], image["modality"], image["num_channels"], image["dtype"]) == ("image", "MR", 1, "float32")
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 2
    block = meta["xaioverlay"]
    if name == "tumour_classifier":
        assert pred["type"] == "probabilities"
        assert pred["channel_def"] == {"0": "no tumour", "1": "tumour"}
        assert block["task"] == "classification"
        assert block["held_out"]["accuracy"] >= 0.95 and block["held_out"]["n_phantoms"] >= 20
        assert block["held_out"]["twin_flip_rate"] >= 0.9
    else:
        assert pred["type"] == "image"
        assert pred["channel_def"] == {"0": "background", "1": "tumour"}
        assert block["task"] == "segmentation"
        assert block["held_out"]["dice"] >= 0.7 and block["held_out"]["n_phantoms"] >= 20
    for key in ("steps", "seed", "command"):
        assert key in block["training"], key
    assert block["training"]["norm"] == "batch"


@torch.no_grad()
def test_classifier_sees_the_tumour_and_not_its_absence():
    parser, network = _load("tumour_classifier")
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing")
    probabilities = []
    for tumour in (True, False):
        image = _preprocess(parser, make_phantom(100_098, tumour=tumour).image)
        pred = post({"pred": inferer(image[None], network)[0]})["pred"]
        assert pred.shape == (2,) and abs(float(pred.sum()) - 1.0) < 1e-5
        probabilities.append(float(pred[1]))
    assert probabilities[0] > 0.5 > probabilities[1]


@torch.no_grad()
def test_segmenter_finds_the_tumour_with_its_sliding_window():
    parser, network = _load("tumour_segmenter")
    phantom = make_phantom(100_098)
    image = _preprocess(parser, phantom.image)
    assert tuple(image.shape) == (1, *DEFAULT_GEOMETRY.size)  # larger than the 64^3 window along A-P
    logits = parser.get_parsed_content("inferer")(image[None], network)
    label = parser.get_parsed_content("postprocessing")({"pred": logits[0]})["pred"]
    assert tuple(label.shape) == (1, *DEFAULT_GEOMETRY.size)
    predicted, truth = label[0].numpy() > 0.5, phantom.tumour_mask.array > 0
    assert 2 * np.logical_and(predicted, truth).sum() / (predicted.sum() + truth.sum()) > 0.6
