"""The ``attention`` method: gate coefficients and attention rollout against hand-derived answers, and refusals."""

from __future__ import annotations

import contextlib

import pytest
import torch
from monai.networks import nets

from conftest import save_spec_model
from test_transformers import SMALL_UNETR, SMALL_VIT
from xaioverlay.errors import ModelError
from xaioverlay.explain import explain
from xaioverlay.methods import build_method
from xaioverlay.methods.attention import SE_REASON, Attention, captured_attention, self_attention_modules
from xaioverlay.models import load_model
from xaioverlay.models.base import LoadedModel
from xaioverlay.targets import Target
from xaioverlay.volumes import Geometry, Volume
from xaioverlay.worker import method_catalogue

CLASS_1 = Target(1, "b", "logit", "softmax", None, {})


def loaded(network, task="segmentation") -> LoadedModel:
    return LoadedModel(network=network.eval(), device=torch.device("cpu"), task=task, class_names=["a", "b"],
                       in_channels=1)


def build(spec: dict):
    torch.manual_seed(0)
    return getattr(nets, spec["name"])(**spec["args"])


@contextlib.contextmanager
def forced_attention(network, token: int):
    """Every query of every self-attention block attends only to ``token`` (hooks on the matrix the block uses)."""
    def one_hot(module, inputs, out):
        forced = torch.zeros_like(out)
        forced[..., token] = 1
        return forced

    handles = [block.drop_weights.register_forward_hook(one_hot) for block in self_attention_modules(network)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def patch_box(index: int, grid: int, patch: int) -> torch.Tensor:
    """The voxels of patch ``index`` (C order on a grid³ of patch³ patches) as a boolean (X, Y, Z) mask."""
    i, j, k = index // (grid * grid), (index // grid) % grid, index % grid
    mask = torch.zeros(grid * patch, grid * patch, grid * patch, dtype=torch.bool)
    mask[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch, k * patch:(k + 1) * patch] = True
    return mask


def test_vit_rollout_reads_the_class_token_row_and_lands_on_the_forced_patch():
    model = loaded(build(SMALL_VIT), "classification")  # 2 blocks, 4³ patches of 8³, a class token first
    patch_index = 37
    with forced_attention(model.network, token=patch_index + 1):  # +1: the class token comes first
        attribution = Attention().attribute(model, torch.randn(1, 1, 32, 32, 32), CLASS_1)
    # by hand, 2 layers of A = ½ (one-hot column t) + ½ I: the class row is ¾ e_t + ¼ e_cls
    box = patch_box(patch_index, 4, 8)
    torch.testing.assert_close(attribution.map[box], torch.full((512,), 0.75))
    assert float(attribution.map[~box].abs().max()) == 0
    assert attribution.parameters["tokens"] == "class token row" and attribution.parameters["blocks"] == 2


def test_unetr_rollout_without_class_token_is_the_mean_row_of_the_hand_derived_product():
    model = loaded(build(SMALL_UNETR))  # 12 blocks, 2³ patches of 16³, no class token
    layers, tokens, patch_index = 12, 8, 5
    with forced_attention(model.network, token=patch_index):
        attribution = Attention().attribute(model, torch.randn(1, 1, 32, 32, 32), CLASS_1)
    # row i ≠ t of the product: ½^L e_i + (1 − ½^L) e_t; row t: e_t; the map is the mean of the rows
    half = 0.5 ** layers
    chosen = (1 + (tokens - 1) * (1 - half)) / tokens
    box = patch_box(patch_index, 2, 16)
    torch.testing.assert_close(attribution.map[box], torch.full((16 ** 3,), chosen))
    torch.testing.assert_close(attribution.map[~box], torch.full((7 * 16 ** 3,), half / tokens))
    assert attribution.parameters["tokens"] == "mean over tokens"


def test_captured_matrix_is_the_softmax_attention_monai_saves():
    network = build(SMALL_VIT).eval()
    blocks = self_attention_modules(network)
    for block in blocks:
        block.save_attn = True
    with captured_attention(blocks) as matrices, torch.no_grad():
        network(torch.randn(1, 1, 32, 32, 32))
    assert len(matrices) == 2
    for block, matrix in zip(blocks, matrices):
        torch.testing.assert_close(matrix, block.att_mat)
        torch.testing.assert_close(matrix.sum(-1), torch.ones(matrix.shape[:-1]))


def attention_unet():
    torch.manual_seed(0)
    return nets.AttentionUnet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2))


def test_gate_map_is_the_mean_of_levels_and_one_level_on_request():
    network = attention_unet()
    box = torch.zeros(1, 1, 32, 32, 32)
    box[..., 4:12, 8:20, 10:14] = 1

    def force(module, inputs, out):  # finest gate (32³) = the box; the coarser one (16³) = 0.2 everywhere
        return box.clone() if out.shape[-1] == 32 else torch.full_like(out, 0.2)

    handles = [m.psi.register_forward_hook(force) for m in network.modules() if type(m).__name__ == "AttentionBlock"]
    model, x = loaded(network), torch.randn(1, 1, 32, 32, 32)
    try:
        mean = Attention().attribute(model, x, CLASS_1)
        finest = build_method("attention:level=0").attribute(model, x, CLASS_1)
        coarse = build_method("attention:level=1").attribute(model, x, CLASS_1)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(mean.map, (box[0, 0] + 0.2) / 2)
    torch.testing.assert_close(finest.map, box[0, 0])
    torch.testing.assert_close(coarse.map, torch.full((32, 32, 32), 0.2))
    assert mean.parameters["levels"] == 2 and finest.parameters["level"] == 0
    with pytest.raises(Exception, match=r"level=2 does not exist.*levels 0 to 1"):
        build_method("attention:level=2").attribute(model, x, CLASS_1)


def test_gate_map_of_an_untrained_attention_unet_stays_in_the_unit_interval():
    model = loaded(attention_unet())
    attribution = Attention().attribute(model, torch.randn(1, 1, 32, 32, 32), CLASS_1)
    assert attribution.map.shape == (32, 32, 32) and not attribution.signed
    assert 0 < float(attribution.map.min()) and float(attribution.map.max()) < 1
    assert float(attribution.map.std()) > 0  # the gates vary over positions


@pytest.mark.parametrize("network, reason", [
    (lambda: nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=2), SE_REASON),
    (lambda: nets.EfficientNetBN("efficientnet-b0", spatial_dims=3, in_channels=1, num_classes=2), SE_REASON),
    (lambda: nets.UNet(3, 1, 2, (4, 8), (2,)), "UNet has no attention gates or self-attention blocks; use gradcam"),
])
def test_method_is_unavailable_with_a_one_line_reason(network, reason):
    model = loaded(network())
    why = Attention.unavailable(model)
    assert why is not None and reason in why and "\n" not in why
    entry = next(m for m in method_catalogue(model) if m["name"] == "attention")  # what the Slicer module lists
    assert entry["allowed"] is False and entry["reason"] == why
    with pytest.raises(ModelError, match="reweight channels|no attention"):
        Attention().attribute(model, torch.randn(1, 1, 64, 64, 64), CLASS_1)


def test_attention_runs_through_explain_on_a_sliding_window_unetr_spec(tmp_path):
    spec = save_spec_model(tmp_path / "unetr", SMALL_UNETR, task="segmentation", class_names=["background", "tumour"],
                           sliding_window={"roi_size": [32, 32, 32], "overlap": 0.5})
    model = load_model(spec, device="cpu")
    assert next(m for m in method_catalogue(model) if m["name"] == "attention")["allowed"]
    array = torch.rand(48, 32, 32).numpy()
    image = Volume(array, Geometry((48, 32, 32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    result = explain(model, [image], "attention", "channel:tumour").results[0]
    assert result.parameters["windows"]["used"] == 2  # 48 voxels in windows of 32 at half overlap: 0:32, 16:48
    assert result.volume.array.shape == (48, 32, 32) and float(result.model_grid_map.min()) > 0


def test_explain_refuses_attention_on_a_cnn_with_the_reason_and_the_default_methods_leave_it_out(unet_spec):
    from xaioverlay.demo import demo_methods

    model = load_model(unet_spec, device="cpu")
    assert "attention" not in demo_methods(model) and "gxi" in demo_methods(model)
    image = Volume(torch.rand(32, 32, 32).numpy(), Geometry((32, 32, 32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    with pytest.raises(ModelError,
                       match="^UNet has no attention gates or self-attention blocks; use gradcam/lrp/occlusion"):
        explain(model, [image], "attention", "channel:tumour")


def test_flash_attention_is_switched_off_for_the_rollout_and_restored():
    model = loaded(build(SMALL_VIT), "classification")
    x = torch.randn(1, 1, 32, 32, 32)
    reference = Attention().attribute(model, x, CLASS_1).map
    blocks = self_attention_modules(model.network)
    for block in blocks:
        block.use_flash_attention = True  # it never forms the attention matrix
    flashed = Attention().attribute(model, x, CLASS_1).map
    torch.testing.assert_close(flashed, reference)
    assert all(block.use_flash_attention for block in blocks)
    assert all(not block.drop_weights._forward_hooks for block in blocks)


def test_cli_writes_the_attention_map_for_unetr_and_exits_1_with_the_reason_for_a_unet(tmp_path, unet_spec, capsys):
    import json

    from xaioverlay.cli import main
    from xaioverlay.volumes import write_volume

    volume = Volume(torch.rand(32, 32, 32).numpy(), Geometry((32, 32, 32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    image = write_volume(volume, tmp_path / "case.nrrd")
    unetr = save_spec_model(tmp_path / "unetr", SMALL_UNETR, task="segmentation", class_names=["background", "tumour"])
    code = main(["explain", "--model", str(unetr), "--input", str(image), "--target", "channel:tumour",
                 "--methods", "attention", "--out", str(tmp_path / "out"), "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "explanation.json").read_text())["methods"][0]
    assert record["method"] == "attention" and record["parameters"]["tokens"] == "mean over tokens"
    code = main(["explain", "--model", str(unet_spec), "--input", str(image), "--target", "channel:tumour",
                 "--methods", "attention", "--out", str(tmp_path / "out2"), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "UNet has no attention gates or self-attention blocks; use gradcam/lrp/occlusion" in err


def swin_attending_to_one_token(token: tuple[int, int, int], strength: float = 5.0):
    """A SwinUNETR (16³ tokens from 32³ voxels, windows of 4³ shifted by 2 in every second block) whose
    first stage attends only to ``token`` wherever the token is in a query's window, set by hand:

    - the patch embedding maps a patch of ones to (8, −8, 0, …) and a patch of zeros to 0; the input is
      zero except ``token``'s patch, so after each block's LayerNorm only that token is non-zero;
    - first stage: queries are a constant (bias 1, weight 0), keys ``strength`` × (n₀ − n₁) in every
      channel, so the token's logit is about 10·strength and every other token's 0 (softmax ≈ one-hot);
    - later stages: queries zero, so attention is uniform within each window;
    - values, the attention output projection and the MLP's output are zero, so every block passes its
      tokens on unchanged (the token stays the only non-zero one in both blocks of the first stage).
    """
    torch.manual_seed(0)
    network = nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(2, 2, 2, 2),
                             num_heads=(3, 3, 3, 3), window_size=(4, 4, 4), norm_name="batch")
    swin = network.swinViT
    with torch.no_grad():
        swin.patch_embed.proj.weight.zero_()
        swin.patch_embed.proj.weight[0] = 1.0
        swin.patch_embed.proj.weight[1] = -1.0
        swin.patch_embed.proj.bias.zero_()
        for number, stage in enumerate((swin.layers1[0], swin.layers2[0], swin.layers3[0], swin.layers4[0])):
            for block in stage.blocks:
                channels = block.attn.qkv.in_features
                block.attn.qkv.weight.zero_()
                block.attn.qkv.bias.zero_()
                block.attn.relative_position_bias_table.zero_()
                if number == 0:
                    block.attn.qkv.bias[:channels] = 1.0
                    block.attn.qkv.weight[channels:2 * channels, 0] = strength
                    block.attn.qkv.weight[channels:2 * channels, 1] = -strength
                for layer in (block.attn.proj, block.mlp.linear2):
                    layer.weight.zero_()
                    layer.bias.zero_()
    x = torch.zeros(1, 1, 32, 32, 32)
    x[0, 0, 2 * token[0]: 2 * token[0] + 2, 2 * token[1]: 2 * token[1] + 2, 2 * token[2]: 2 * token[2] + 2] = 1
    return network, x


def test_swin_window_rollout_peaks_at_the_token_every_window_attends_to_and_follows_the_shifted_windows():
    token = (5, 9, 3)
    network, x = swin_attending_to_one_token(token)
    model = loaded(network)
    attribution = Attention().attribute(model, x, CLASS_1)
    assert attribution.parameters["blocks"] == 8 and attribution.parameters["stages"] == 4
    scores = attribution.map[::2, ::2, ::2]  # one value per 2×2×2 patch token
    assert torch.equal(attribution.map, scores.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2))
    peak = float(scores[token])
    others = scores.clone()
    others[token] = 0
    assert peak > 10 * float(others.max())  # half of every query's row in the token's windows goes to it
    # by hand, the windows around the token: unshifted [4,8)×[8,12)×[0,4); shifted by 2 (rolled back):
    # [2,6)×[6,10)×[2,6). Queries there gave half their share to the token, so they keep less than
    # tokens in neither window (0.72 of their mean here; a rollout ignoring the shift gave 0.96, and a
    # peak only 1.9× the next token)
    unshifted = torch.zeros(16, 16, 16, dtype=torch.bool)
    unshifted[4:8, 8:12, 0:4] = True
    shifted = torch.zeros(16, 16, 16, dtype=torch.bool)
    shifted[2:6, 6:10, 2:6] = True
    shifted_only, neither = shifted & ~unshifted, ~shifted & ~unshifted
    shifted_only[token] = neither[token] = False
    assert float(scores[shifted_only].mean()) < 0.85 * float(scores[neither].mean())
    assert float(attribution.map.sum()) == pytest.approx(8.0, rel=1e-4)  # scores sum to 1, 8 voxels each
    assert not attribution.signed


def test_swin_window_rollout_is_available_and_runs_on_a_stock_swin_unetr_spec(tmp_path):
    from test_transformers import SMALL_SWINUNETR

    spec = save_spec_model(tmp_path / "swin", SMALL_SWINUNETR, task="segmentation",
                           class_names=["background", "tumour"])
    model = load_model(spec, device="cpu")
    assert Attention.unavailable(model) is None
    attribution = build_method("attention").attribute(model, torch.randn(1, 1, 64, 64, 64), CLASS_1)
    assert attribution.map.shape == (64, 64, 64) and float(attribution.map.min()) > 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.network.modules())
