"""LRP through multiplicative gates x · σ(g(x)) (attention gates, squeeze-excitation): the gate is held
constant (Arras et al. 2017). Hand-derived reference, conservation, the network left untouched."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks import nets
from monai.networks.nets.attentionunet import AttentionBlock
from torch import nn

from test_lrp import assert_untouched, loaded, snapshot
from dataclasses import replace

from xaioverlay.errors import ModelError
from xaioverlay.methods import build_method
from xaioverlay.methods.lrp import COMPOSITES, lrp
from xaioverlay.methods.lrp.canonizers import GATE_RULE, GATE_RULES
from xaioverlay.targets import Target

BN = 1 / math.sqrt(1 + 1e-5)  # a fresh BatchNorm in eval mode: (v − 0) / √(1 + eps)


class TinyGate(nn.Module):
    """One MONAI AttentionBlock gating the input by itself, then a 1×1×1 head: out = w · x · σ(ψ(x))."""

    def __init__(self, a: float, b: float, c: float, w: float) -> None:
        super().__init__()
        self.gate = AttentionBlock(spatial_dims=3, f_int=1, f_g=1, f_l=1)
        self.head = nn.Conv3d(1, 1, 1, bias=False)
        with torch.no_grad():
            for conv, value in ((self.gate.W_g[0].conv, a), (self.gate.W_x[0].conv, b), (self.gate.psi[0].conv, c)):
                conv.weight.fill_(value)
                conv.bias.zero_()
            self.head.weight.fill_(w)

    def forward(self, x):
        return self.head(self.gate(g=x, x=x))


@pytest.mark.parametrize("composite", ["zero", "epsilon-plus-flat"])
def test_gate_rule_matches_the_hand_derived_relevance(composite):
    a, b, c, w = 0.7, -0.4, 2.0, 1.5
    model = loaded(TinyGate(a, b, c, w), "segmentation", 1)
    x = torch.tensor([0.3, 1.2, 2.5, 0.8, 1.9, 0.1, 3.0, 0.6]).reshape(1, 1, 2, 2, 2)
    target = Target(0, "c0", "logit", "softmax", torch.ones(2, 2, 2), {})
    result = lrp(model, x, target, COMPOSITES[composite])
    # by hand: s = σ(BN c ReLU(BN a x + BN b x)); the gate is a constant weight, so the relevance of
    # each output w·x·s goes to x entirely: R_x = w · x · s (x, w > 0: α1β0 and LRP-0 agree)
    s = torch.sigmoid(BN * c * torch.relu(BN * a * x + BN * b * x))
    torch.testing.assert_close(result.input, w * x * s, rtol=1e-5, atol=1e-7)
    assert float(result.input.sum()) == pytest.approx(float(result.output[0]), rel=1e-6)
    assert result.gates == ("gate.psi",)


def bias_free_attention_unet(seed: int = 0) -> nn.Module:
    """A stock AttentionUnet with every bias 0 and the merge convolutions' InstanceNorm (whose mean
    subtraction is an input-dependent bias) replaced by an identity: LRP must then conserve exactly."""
    torch.manual_seed(seed)
    network = nets.AttentionUnet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2))
    for module in network.modules():
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            nn.init.zeros_(module.bias)
        if hasattr(module, "N") and isinstance(module.N, nn.modules.instancenorm._InstanceNorm):
            module.N = nn.Identity()
    return network


# α1β0 (epsilon-plus-flat's convolution rule) passes only positive contributions: it conserves positive
# scores only, so a random region's (negative) logit sum is checked with LRP-0 and γ, as for the UNet
@pytest.mark.parametrize("composite", ["zero", "epsilon-gamma-box"])
def test_relevance_is_conserved_through_the_gates_of_a_bias_free_attention_unet(composite):
    network = bias_free_attention_unet()
    model = loaded(network, "segmentation")
    x = torch.randn(1, 1, 32, 32, 32)
    region = torch.zeros(32, 32, 32)
    region[8:20, 6:22, 10:26] = 1
    target = Target(1, "c1", "logit", "softmax", region, {})
    before = snapshot(network, x)
    result = lrp(model, x, target, COMPOSITES[composite])
    with torch.no_grad():
        explained = float((network(x)[0, 1] * region).sum())
    assert float(result.output[0]) == pytest.approx(explained, rel=1e-6)
    assert abs(float(result.input.sum()) - explained) <= 1e-4 * abs(explained), composite
    assert len(result.gates) == 2
    assert_untouched(before, network, x)  # gate hooks removed, forwards restored


def test_lrp0_equals_gradient_times_input_with_the_gates_held_constant():
    network = bias_free_attention_unet(1)
    model = loaded(network, "segmentation")
    x = torch.randn(1, 1, 32, 32, 32)
    target = Target(0, "c0", "logit", "softmax", torch.ones(32, 32, 32), {})
    relevance = lrp(model, x, target, COMPOSITES["zero"]).input
    # the reference: plain autograd on the same network with each gate's value detached
    handles = [m.psi.register_forward_hook(lambda mod, i, out: out.detach())
               for m in network.modules() if isinstance(m, AttentionBlock)]
    try:
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(target(network(xg)).sum(), xg)
    finally:
        for handle in handles:
            handle.remove()
    reference = x * grad
    assert float((relevance - reference).abs().max() / reference.abs().max()) <= 1e-5


def test_squeeze_excitation_network_runs_and_conserves_with_the_gates_held_constant():
    torch.manual_seed(0)
    network = nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=2, layers=(1, 1, 1, 1))
    for module in network.modules():
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            nn.init.zeros_(module.bias)
    model = loaded(network, "classification")
    x = torch.randn(1, 1, 32, 32, 32)
    target = Target(1, "c1", "logit", "softmax", None, {})
    result = lrp(model, x, target, COMPOSITES["epsilon-plus-flat"])
    with torch.no_grad():
        logit = float(network(x)[0, 1])
    assert float(result.output[0]) == pytest.approx(logit, rel=1e-6)
    assert abs(float(result.input.sum()) - logit) <= 1e-4 * abs(logit)
    assert len(result.gates) == 4  # one ChannelSELayer per bottleneck


def test_lrp_records_the_gate_rule_on_gated_networks_only():
    from xaioverlay.methods.lrp import LRP

    x = torch.randn(1, 1, 32, 32, 32)
    target = Target(1, "c1", "logit", "softmax", torch.ones(32, 32, 32), {})
    gated = LRP().attribute(loaded(bias_free_attention_unet(), "segmentation"), x, target)
    assert gated.parameters["gates"] == {"rule": GATE_RULE, "count": 2}
    plain = LRP().attribute(loaded(nets.UNet(3, 1, 2, (4, 8), (2,)), "segmentation"), x, target)
    assert "gates" not in plain.parameters


def test_lrp_runs_on_efficientnet_with_its_inline_squeeze_excitation():
    torch.manual_seed(0)
    network = nets.EfficientNetBN("efficientnet-b0", spatial_dims=3, in_channels=1, num_classes=2)
    model = loaded(network, "classification")
    x = torch.randn(1, 1, 32, 32, 32)
    before = snapshot(network, x)
    result = lrp(model, x, Target(1, "c1", "logit", "softmax", None, {}), COMPOSITES["epsilon-plus-flat"])
    assert torch.isfinite(result.input).all() and float(result.input.abs().sum()) > 0
    assert len(result.gates) == 16  # every MBConv block of b0 has SE
    assert_untouched(before, network, x)


def test_uniform_split_gives_half_to_the_signal_and_half_through_the_gate_by_hand():
    a, b, c, w = 0.7, -1.0, 2.0, 1.5  # a + b < 0: the gate branch's ReLU is dead where x > 0
    model = loaded(TinyGate(a, b, c, w), "segmentation", 1)
    x = torch.tensor([0.3, -1.2, 2.5, -0.8, 1.9, 0.1, -3.0, 0.6]).reshape(1, 1, 2, 2, 2)
    target = Target(0, "c0", "logit", "softmax", torch.ones(2, 2, 2), {})
    result = lrp(model, x, target, replace(COMPOSITES["zero"], gates="uniform"))
    # by hand (LRP-0): ½ w·x·s to x through the product; the other ½ enters the gate: σ passes it to
    # z = BN c h, the 1×1 convs and the sum route all of it back to x (both branches read x) where
    # h = ReLU(BN (a + b) x) > 0, i.e. x < 0; where h = 0 (z = 0) it cannot be carried and is dropped
    s = torch.sigmoid(BN * c * torch.relu(BN * (a + b) * x))
    expected = w * x * s * (0.5 + 0.5 * (x < 0).float())
    torch.testing.assert_close(result.input, expected, rtol=1e-5, atol=1e-7)
    dropped = float((0.5 * w * x * s)[x > 0].sum())
    assert float(result.input.sum()) == pytest.approx(float(result.output[0]) - dropped, rel=1e-5)


def test_uniform_split_is_an_option_recorded_with_the_map_and_refused_where_the_product_is_inline():
    method = build_method("lrp:epsilon-gamma-box/uniform")
    assert method.spec == "lrp:epsilon-gamma-box/uniform"
    assert build_method("lrp:/uniform").spec == "lrp:epsilon-plus-flat/uniform"
    x = torch.randn(1, 1, 32, 32, 32)
    target = Target(1, "c1", "logit", "softmax", torch.ones(32, 32, 32), {})
    gated = loaded(bias_free_attention_unet(), "segmentation")
    attribution = build_method("lrp:zero/uniform").attribute(gated, x, target)
    assert attribution.parameters["gates"] == {"rule": GATE_RULES["uniform"], "count": 2}
    model = loaded(nets.EfficientNetBN("efficientnet-b0", spatial_dims=3, in_channels=1, num_classes=2),
                   "classification")
    network = model.network
    before = snapshot(network, x)
    with pytest.raises(ModelError,
                       match="uniform gate split needs the gate product as the block's output.*MBConvBlock"):
        build_method("lrp:zero/uniform").attribute(model, x, Target(1, "c1", "logit", "softmax", None, {}))
    assert_untouched(before, network, x)
    with pytest.raises(Exception, match="unknown LRP gate split 'half'"):
        build_method("lrp:zero/half")
