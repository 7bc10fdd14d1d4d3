"""MONAI's transformer networks (they need einops) load from a data-only spec and run through the engine."""

from __future__ import annotations

import re

import pytest
import torch

from support import save_spec_model
from xaioverlay.methods import build_method
from xaioverlay.models import load_model
from xaioverlay.targets import Target

SMALL_UNETR = {"name": "UNETR", "args": {"in_channels": 1, "out_channels": 2, "img_size": [32, 32, 32],
                                         "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4,
                                         "spatial_dims": 3}}
SMALL_SWINUNETR = {"name": "SwinUNETR", "args": {"in_channels": 1, "out_channels": 2, "feature_size": 12,
                                                 "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 3], "spatial_dims": 3}}
SMALL_VIT = {"name": "ViT", "args": {"in_channels": 1, "img_size": [32, 32, 32], "patch_size": [8, 8, 8],
                                     "hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 4,
                                     "classification": True, "num_classes": 2}}
#: network, task, input size (SwinUNETR's instance norm needs more than one voxel after five halvings)
TRANSFORMERS = {"UNETR": (SMALL_UNETR, "segmentation", 32), "SwinUNETR": (SMALL_SWINUNETR, "segmentation", 64),
                "ViT": (SMALL_VIT, "classification", 32)}


def transformer_model(tmp_path, name):
    network, task, _ = TRANSFORMERS[name]
    saved = save_spec_model(tmp_path / name, network, task=task, class_names=["background", "tumour"])
    return load_model(saved, device="cpu")


def target_for(model, size=32):
    if model.task == "classification":
        return Target(1, "tumour", "logit", "softmax", None, {})
    region = torch.zeros(size, size, size)
    region[8:20, 10:22, 6:18] = 1
    return Target(1, "tumour", "logit", "softmax", region, {})


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_transformer_loads_from_spec_and_runs_gradient_times_input_and_gradcam(tmp_path, name):
    model = transformer_model(tmp_path, name)
    assert type(model.network).__name__ == name
    size = TRANSFORMERS[name][2]
    x = torch.randn(1, 1, size, size, size)
    target = target_for(model, size)
    for spec in ("gxi", "gradcam"):
        method = build_method(spec)
        method.prepare(model, x)
        attribution = method.attribute(model, x, target)
        assert attribution.map.shape == (size, size, size)
        assert torch.isfinite(attribution.map).all() and float(attribution.map.abs().sum()) > 0, spec


def test_gradcam_defaults_to_a_convolutional_decoder_map_on_unetr_and_swinunetr_and_layers_lists_it(tmp_path, capsys):
    from xaioverlay.cli import main
    from xaioverlay.volumes import Geometry, Volume, write_volume

    for name, decoder in (("UNETR", "decoder3"), ("SwinUNETR", "decoder2")):
        model = transformer_model(tmp_path, name)
        size = TRANSFORMERS[name][2]
        method = build_method("gradcam")
        method.prepare(model, torch.zeros(1, 1, size, size, size))
        assert method.layer_in_use == decoder  # UnetrUpBlock: convolutions on a (B, K, X, Y, Z) map
        volume = Volume(torch.rand(size, size, size).numpy(), Geometry((size,) * 3, (1.0,) * 3, (0.0,) * 3))
        image = write_volume(volume, tmp_path / f"{name}.nrrd")
        code = main(["layers", "--model", str(tmp_path / name / "model.yaml"), "--input", str(image)])
        listing = capsys.readouterr().out.splitlines()
        assert code == 0
        assert any(line.split()[0] == decoder and line.endswith("(default)") for line in listing[1:])
        # inside SwinUNETR's stages tensors are channel-last (B, D, H, W, C), inside UNETR's transformer
        # blocks they are tokens or rearranged queries/keys/values: none is listed as a feature map
        names = [line.split()[0] for line in listing[1:]]
        inside = re.compile(r"(vit\.blocks\.\d+\.|swinViT\.layers\d\.0\.)")
        assert not [n for n in names if inside.match(n)]
        assert (name == "UNETR") == ("vit.blocks.11" in names)  # UNETR's tokens, as the map they form


def test_vit_tokens_are_listed_as_the_feature_map_they_form_and_gradcam_reads_them(tmp_path):
    from xaioverlay.layers import candidate_layers

    model = transformer_model(tmp_path, "ViT")
    x = torch.randn(1, 1, 32, 32, 32)
    tokens = {layer.name: layer.output_shape for layer in candidate_layers(model, x) if layer.tokens}
    # 8³ patches of 32³, class token dropped
    assert tokens == {"blocks.0": (1, 48, 4, 4, 4), "blocks.1": (1, 48, 4, 4, 4)}
    method = build_method("gradcam")
    method.prepare(model, x)
    # the class token is read after the last block: the tokens entering it are the last that reach the decision
    assert method.layer_in_use == "blocks.0"
    attribution = method.attribute(model, x, target_for(model))
    assert attribution.parameters["layer_shape"] == [48, 4, 4, 4]
    assert float(attribution.map.std()) > 0


@pytest.mark.parametrize("name", ["UNETR", "ViT"])
def test_layers_without_a_volume_probes_at_the_networks_fixed_image_size(tmp_path, capsys, name):
    """UNETR's and ViT's position embeddings fix the input size (``img_size``, here 32³): probing at the
    generic 64³ ended in a shape error from the patch embedding."""
    from xaioverlay.cli import main

    transformer_model(tmp_path, name)
    assert main(["layers", "--model", str(tmp_path / name / "model.yaml")]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert any(line.endswith("(default)") for line in listing[1:])
    if name == "UNETR":  # the decoder's maps at full resolution: 32³, the network's img_size
        assert any(line.split()[0] == "decoder2" and line.split()[2].endswith("x32x32x32") for line in listing[1:])
