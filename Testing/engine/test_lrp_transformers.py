"""LRP through transformer blocks (softmax attention, LayerNorm, GELU, patch and position embeddings,
SwinUNETR's shifted windows and patch merging) and VNet's channel repetition: rules against
hand-derived references, conservation on bias-free UNETR, SwinUNETR, ViT and VNet, the network left
untouched."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from monai.networks import nets
from monai.networks.blocks import SABlock
from torch import nn

from test_lrp import assert_untouched, loaded, snapshot
from xaioverlay.errors import ModelError
from xaioverlay.methods.lrp import COMPOSITES, LRP, Composite, Epsilon, lrp
from xaioverlay.methods.lrp.canonizers import ATTENTION_RULE, ATTENTION_RULES
from xaioverlay.targets import Target

#: LRP-0 everywhere, with the default identity rule on standalone normalisations (LayerNorm): every
#: layer of a bias-free network then conserves relevance exactly
ZERO_IDENTITY_NORMS = Composite("zero-identity-norms", first=Epsilon(0), convolution=Epsilon(0), dense=Epsilon(0))


class TinyAttention(nn.Module):
    """Four voxels → four tokens (a 1→2 embedding), one MONAI self-attention block (one head, flash
    attention on), the class read from token 0 by a bias-free dense head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Linear(1, 2, bias=False)
        self.attention = SABlock(hidden_size=2, num_heads=1, use_flash_attention=True)
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([[1.0], [-0.5]]))
            self.attention.qkv.weight.copy_(torch.randn(6, 2))
            self.attention.out_proj.weight.copy_(torch.randn(2, 2))
            self.attention.out_proj.bias.zero_()
            self.head.weight.copy_(torch.randn(2, 2))

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)  # (B, 4, 1)
        return self.head(self.attention(self.embed(tokens))[:, 0])


def test_attention_rule_sends_relevance_through_the_values_with_the_attention_held_constant_by_hand():
    network = TinyAttention()
    model = loaded(network, "classification")
    x = torch.tensor([0.8, -1.5, 2.0, 0.3]).reshape(1, 1, 4, 1, 1)
    target = Target(1, "c1", "logit", "softmax", None, {})
    before = snapshot(network, x)
    result = lrp(model, x, target, COMPOSITES["zero"])
    # by hand: tokens t_j = x_j, h_j = E t_j, [q; k; v] = W_qkv h (rows 0-1, 2-3, 4-5), one head of size 2;
    # a = softmax(q_0 · k_j / √2) over j; logit = w_1 · W_o Σ_j a_j v_j. With a constant the logit is
    # linear in x: R(x_j) = a_j (w_1 W_o W_v E) x_j
    tokens = x.reshape(4, 1)
    embed, qkv = network.embed.weight, network.attention.qkv.weight
    hidden = tokens @ embed.T
    q, k = hidden @ qkv[0:2].T, hidden @ qkv[2:4].T
    a = torch.softmax(q[0] @ k.T / 2 ** 0.5, dim=0)
    coefficient = network.head.weight[1] @ network.attention.out_proj.weight @ qkv[4:6] @ embed
    expected = (a * coefficient[0] * tokens[:, 0]).reshape(1, 1, 4, 1, 1)
    torch.testing.assert_close(result.input, expected.detach(), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        logit = float(network(x)[0, 1])
    assert float(result.input.sum()) == pytest.approx(logit, rel=1e-5)
    assert result.attention == 1
    assert_untouched(before, network, x)
    assert network.attention.use_flash_attention is True  # switched off for the run only


def test_uniform_split_gives_attnlrp_softmax_and_product_rules_by_hand():
    """``lrp:zero/uniform`` on one attention block against AttnLRP's rules written out with divisions:
    the relevance of A v split half to A, half to v (each term in proportion to its share of the sum), the
    softmax rule R(z_ij) = z_ij (R(A_ij) - A_ij Σ_j' R(A_ij')), then q kᵀ split half to q, half to k."""
    network = TinyAttention()
    model = loaded(network, "classification")
    x = torch.tensor([0.8, -1.5, 2.0, 0.3]).reshape(1, 1, 4, 1, 1)
    before = snapshot(network, x)
    result = lrp(model, x, Target(1, "c1", "logit", "softmax", None, {}), replace(COMPOSITES["zero"], gates="uniform"))
    with torch.no_grad():
        t = x.reshape(4, 1).double()
        embed, qkv = network.embed.weight.double(), network.attention.qkv.weight.double()
        w_out, w_head = network.attention.out_proj.weight.double(), network.head.weight[1].double()
        h = t @ embed.T  # (4 tokens, 2)
        q, k, v = h @ qkv[0:2].T, h @ qkv[2:4].T, h @ qkv[4:6].T
        z = q @ k.T / 2 ** 0.5
        a = torch.softmax(z, dim=1)
        y = a @ v
        o = y @ w_out.T
        r_o = torch.zeros_like(o)
        r_o[0] = o[0] * w_head  # the head reads token 0; LRP-0 of a bias-free dense layer
        r_y = y * ((r_o / o) @ w_out)
        terms = a[:, :, None] * v[None, :, :] / y[:, None, :] * r_y[:, None, :]  # [i, j, d]: a_ij v_jd's share
        r_a, r_v = terms.sum(2) / 2, terms.sum(0) / 2
        r_z = z * (r_a - a * r_a.sum(1, keepdim=True))
        products = q[:, None, :] * k[None, :, :] / (z * 2 ** 0.5)[:, :, None] * r_z[:, :, None]  # [i, j, m]
        r_q, r_k = products.sum(1) / 2, products.sum(0) / 2
        r_h = sum(h * ((r / p) @ w) for r, p, w in ((r_q, q, qkv[0:2]), (r_k, k, qkv[2:4]), (r_v, v, qkv[4:6])))
        expected = r_h.sum(1).reshape(1, 1, 4, 1, 1)  # LRP-0 of the 1 -> 2 embedding: each token's R summed
    torch.testing.assert_close(result.input.double(), expected, rtol=1e-4, atol=1e-7)
    assert abs(float(result.input.sum()) - float(o[0] @ w_head)) > 1e-3  # the softmax rule does not conserve
    assert result.attention == 1
    assert_untouched(before, network, x)
    assert network.attention.use_flash_attention is True


def test_attention_settings_are_restored_when_a_later_layer_is_refused():
    network = TinyAttention()
    network.head = nn.Sequential(nn.RMSNorm(2), nn.Linear(2, 2, bias=False))  # no LRP rule for RMSNorm
    model = loaded(network, "classification")
    x = torch.tensor([0.8, -1.5, 2.0, 0.3]).reshape(1, 1, 4, 1, 1)
    before = snapshot(network, x)
    with pytest.raises(ModelError, match="of type RMSNorm"):
        lrp(model, x, Target(1, "c1", "logit", "softmax", None, {}), COMPOSITES["zero"])
    assert network.attention.use_flash_attention is True
    assert not network.attention.drop_weights._forward_hooks
    assert_untouched(before, network, x)


class TinyEmbedding(nn.Module):
    """MONAI's patch embedding (a 2×2×2 convolution to 2 channels, bias 0) with non-zero position
    embeddings on a 4³ input: 8 tokens; their mean through a bias-free dense head."""

    def __init__(self) -> None:
        super().__init__()
        from monai.networks.blocks import PatchEmbeddingBlock

        torch.manual_seed(5)
        self.embedding = PatchEmbeddingBlock(in_channels=1, img_size=4, patch_size=2, hidden_size=2, num_heads=1)
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.embedding.patch_embeddings.bias.zero_()
            self.embedding.position_embeddings.copy_(torch.randn(1, 8, 2))

    def forward(self, x):
        return self.head(self.embedding(x).mean(1))


def test_position_embeddings_take_their_share_like_a_bias_and_voxels_the_rest_by_hand():
    network = TinyEmbedding()
    model = loaded(network, "classification")
    torch.manual_seed(6)
    x = torch.randn(1, 1, 4, 4, 4)
    result = lrp(model, x, Target(1, "c1", "logit", "softmax", None, {}), COMPOSITES["zero"])
    # by hand: logit = w · mean_n (E x_n + p_n); LRP-0 gives voxel v of patch n the share
    # x_v (w · E[:, v]) / 8, and the position embeddings keep w · mean_n p_n
    w = network.head.weight[1].detach()
    kernel = network.embedding.patch_embeddings.weight.detach()  # (2, 1, 2, 2, 2)
    per_voxel = torch.einsum("c,cijk->ijk", w, kernel[:, 0]).repeat(2, 2, 2)
    torch.testing.assert_close(result.input[0, 0], x[0, 0] * per_voxel / 8, rtol=1e-5, atol=1e-7)
    absorbed = float(w @ network.embedding.position_embeddings[0].detach().mean(0))
    with torch.no_grad():
        logit = float(network(x)[0, 1])
    assert float(result.input.sum()) == pytest.approx(logit - absorbed, rel=1e-5)
    assert abs(absorbed) > 0.05 * abs(logit)  # the share is not negligible here


class TinyLayerNorm(nn.Module):
    """Three channels of four voxels → four tokens, LayerNorm(3) with its own γ and β, mean over
    tokens, bias-free dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.norm.weight.copy_(torch.tensor([1.5, -0.7, 0.9]))
            self.norm.bias.copy_(torch.tensor([0.2, 0.4, -0.3]))
            self.head.weight.copy_(torch.tensor([[0.3, 1.1, -0.6], [0.8, -1.2, 0.5]]))

    def forward(self, x):
        return self.head(self.norm(x.flatten(2).transpose(1, 2)).mean(1))


def test_layer_norm_identity_rule_hands_each_output_relevance_to_its_input_by_hand():
    network = TinyLayerNorm()
    model = loaded(network, "classification")
    x = torch.tensor([[0.5, -1.0, 2.0, 0.1], [1.5, 0.3, -0.4, 2.2], [-0.9, 0.6, 1.1, -2.0]]).reshape(1, 3, 4, 1, 1)
    result = lrp(model, x, Target(1, "c1", "logit", "softmax", None, {}), COMPOSITES["epsilon-plus-flat"])
    # by hand: n_j = γ ⊙ (t_j − mean t_j) / √(var t_j + 1e-5) + β per token t_j (3 channels); the dense
    # head (ε rule, ε → 0, no bias) gives R(n_ji) = w_1i n_ji / 4; the identity rule: R(t_ji) = R(n_ji)
    tokens = x.reshape(3, 4).T
    mean, var = tokens.mean(1, keepdim=True), tokens.var(1, unbiased=False, keepdim=True)
    normed = network.norm.weight * (tokens - mean) / torch.sqrt(var + 1e-5) + network.norm.bias
    expected = (network.head.weight[1] * normed / 4).T.reshape(1, 3, 4, 1, 1)
    torch.testing.assert_close(result.input, expected.detach(), rtol=1e-5, atol=1e-6)


class Repeated(nn.Module):
    """VNet's input transition in small: the input repeated over three channels, a 1×1×1 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]).reshape(2, 3, 1, 1, 1))

    def forward(self, x):
        return self.conv(x.repeat(1, 3, 1, 1, 1))


def test_repeated_channels_send_their_relevance_back_to_the_source_summed_by_hand():
    model = loaded(Repeated(), "segmentation")
    x = torch.tensor([0.3, -1.2, 2.5, 0.8, -1.9, 0.1, 3.0, 0.6]).reshape(1, 1, 2, 2, 2)
    result = lrp(model, x, Target(1, "c1", "logit", "softmax", torch.ones(2, 2, 2), {}), COMPOSITES["zero"])
    # by hand: output channel 1 = Σ_k w_1k x; copy k gets w_1k x, and the source the sum of its copies
    torch.testing.assert_close(result.input, (1.5 + 0.25 - 0.75) * x, rtol=1e-6, atol=1e-7)


class Rolled(nn.Module):
    """SwinUNETR's window shift in small: a cyclic shift by one voxel along x, then a 1×1×1 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.7, -1.3]).reshape(2, 1, 1, 1, 1))

    def forward(self, x):
        return self.conv(torch.roll(x, shifts=1, dims=2))


def test_window_shift_moves_relevance_with_the_values_it_moved_by_hand():
    model = loaded(Rolled(), "segmentation")
    x = torch.arange(1.0, 9.0).reshape(1, 1, 4, 2, 1)
    region = torch.zeros(4, 2, 1)
    region[1] = 1  # the output row at x = 1 holds the input row at x = 0
    result = lrp(model, x, Target(1, "c1", "logit", "softmax", region, {}), COMPOSITES["zero"])
    expected = torch.zeros_like(x)
    expected[0, 0, 0] = -1.3 * x[0, 0, 0]
    torch.testing.assert_close(result.input, expected, rtol=1e-6, atol=1e-7)


def bias_free(network: nn.Module) -> nn.Module:
    """Every bias, position embedding, class token and relative position bias set to zero (BatchNorm's
    fresh statistics are the identity), so that no layer absorbs relevance."""
    for name, parameter in network.named_parameters():
        if name.rpartition(".")[2] in ("bias", "position_embeddings", "cls_token", "relative_position_bias_table"):
            nn.init.zeros_(parameter)
    return network


BIAS_FREE = {
    "UNETR": (lambda: nets.UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=12, hidden_size=48,
                                 mlp_dim=96, num_heads=4, norm_name="batch"), "segmentation", 12),
    # 32³ halves to 1 voxel in the last stage: batch norm (instance norm needs more than one voxel)
    "SwinUNETR": (lambda: nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(2, 2, 2, 2),
                                         num_heads=(3, 3, 3, 3), norm_name="batch"), "segmentation", 8),
    "ViT": (lambda: nets.ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2,
                             num_heads=4, classification=True, num_classes=2), "classification", 2),
    "VNet": (lambda: nets.VNet(spatial_dims=3, in_channels=1, out_channels=2), "segmentation", 0),
}


@pytest.mark.parametrize("name", sorted(BIAS_FREE))
def test_relevance_is_conserved_through_a_bias_free_transformer_or_vnet(name):
    build, task, attention_blocks = BIAS_FREE[name]
    torch.manual_seed(0)
    network = bias_free(build()).eval()
    model = loaded(network, task)
    x = torch.randn(1, 1, 32, 32, 32)
    if task == "segmentation":
        region = torch.zeros(32, 32, 32)
        region[8:20, 6:22, 10:26] = 1
        target = Target(1, "c1", "logit", "softmax", region, {})
    else:
        target = Target(1, "c1", "logit", "softmax", None, {})
    before = snapshot(network, x)
    inplace = [m for m in network.modules() if getattr(m, "inplace", False) is True]
    result = lrp(model, x, target, ZERO_IDENTITY_NORMS)
    with torch.no_grad():
        explained = float(target(model.forward(x)).sum())
    assert float(result.output[0]) == pytest.approx(explained, rel=1e-5)
    assert abs(float(result.input.sum()) - explained) <= 1e-4 * abs(explained)
    assert result.attention == attention_blocks
    assert_untouched(before, network, x)
    assert all(m.inplace is True for m in inplace)  # VNet's in-place ELUs, switched off for the run only
    assert all("proj_out" not in m.__dict__ for m in network.modules())  # SwinUNETR's stage norm restored


def test_lrp_records_the_attention_rule_and_conservation_on_a_transformer():
    torch.manual_seed(0)
    model = loaded(BIAS_FREE["ViT"][0]().eval(), "classification")
    attribution = LRP().attribute(model, torch.randn(1, 1, 32, 32, 32), Target(1, "c1", "logit", "softmax", None, {}))
    assert attribution.parameters["attention"] == {"rule": ATTENTION_RULE, "count": 2}
    assert attribution.parameters["rules"]["norm"] == "pass"
    assert set(attribution.extras["conservation"]) == {"output_relevance", "input_relevance", "relative_error"}


@pytest.mark.parametrize("name", ["SwinUNETR", "UNETR", "ViT"])
def test_uniform_split_runs_attnlrp_through_every_attention_block_of_monai_transformers(name):
    """The hooks find A v, the softmax and q kᵀ in MONAI's SABlock and WindowAttention: the map differs from
    the held-attention one, the rule is recorded per block, and the network is left as it was."""
    build, task, attention_blocks = BIAS_FREE[name]
    torch.manual_seed(0)
    network = bias_free(build()).eval()
    model = loaded(network, task)
    x = torch.randn(1, 1, 32, 32, 32)
    region = torch.zeros(32, 32, 32) if task == "segmentation" else None
    if region is not None:
        region[8:20, 6:22, 10:26] = 1
    target = Target(1, "c1", "logit", "softmax", region, {})
    before = snapshot(network, x)
    uniform = LRP("zero", gates="uniform").attribute(model, x, target)
    held = LRP("zero").attribute(model, x, target)
    assert uniform.parameters["attention"] == {"rule": ATTENTION_RULES["uniform"], "count": attention_blocks}
    assert held.parameters["attention"] == {"rule": ATTENTION_RULES["signal"], "count": attention_blocks}
    assert torch.isfinite(uniform.map).all()
    assert not torch.allclose(uniform.map, held.map, rtol=1e-3, atol=1e-6)
    assert_untouched(before, network, x)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in network.modules())
