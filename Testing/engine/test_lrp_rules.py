"""Each LRP rule against its textbook formula, written out here with explicit contribution matrices.

The layer under test is a 3D convolution followed by a normalisation (folded into it, with a scale of
mixed sign) on a signed input; the formulas below are computed in NumPy from the layer's Jacobian,
independently of the engine's convolution-based implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xaioverlay.methods.lrp import AlphaBeta, Composite, Epsilon, Flat, Gamma, Pass, ZBox, lrp
from xaioverlay.models.base import LoadedModel
from xaioverlay.targets import Target

SHAPE = (4, 4, 3)


def jacobian(function, x: torch.Tensor) -> np.ndarray:
    """(outputs, inputs) matrix of a linear map, flattened."""
    matrix = torch.autograd.functional.jacobian(function, x)
    return matrix.reshape(function(x).numel(), x.numel()).double().numpy()


def layer_under_test(norm: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    conv = nn.Conv3d(2, 3, 3, padding=1)
    if norm == "batch":
        bn = nn.BatchNorm3d(3)
        bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.2]))
        bn.weight.data.copy_(torch.tensor([1.3, -0.7, 0.9]))  # one negative scale: contributions swap sign
        bn.bias.data.copy_(torch.tensor([0.2, -0.1, 0.05]))
        return nn.Sequential(conv, bn).eval()
    norm_layer = nn.InstanceNorm3d(3, affine=True) if norm == "instance" else nn.GroupNorm(1, 3)
    norm_layer.weight.data.copy_(torch.tensor([0.8, -1.1, 1.4]))
    norm_layer.bias.data.copy_(torch.tensor([-0.3, 0.2, 0.1]))
    return nn.Sequential(conv, norm_layer).eval()


def affine_of(network: nn.Sequential, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Effective weights (K, J) = s_k · ∂conv_k/∂x_j, shift (K,), and the count matrix of the flat rule."""
    conv, norm = network[0], network[1]
    x = x.detach()
    linear = jacobian(lambda t: nn.functional.conv3d(t, conv.weight, None, padding=1), x)
    ones = jacobian(lambda t: nn.functional.conv3d(t, torch.ones_like(conv.weight), None, padding=1), x)
    v = conv(x).detach()
    if isinstance(norm, nn.BatchNorm3d):
        mean, var = norm.running_mean, norm.running_var
    elif isinstance(norm, nn.InstanceNorm3d):
        var, mean = torch.var_mean(v.flatten(2), dim=2, unbiased=False)
        mean, var = mean[0], var[0]
    else:  # one group: statistics over all channels
        var, mean = torch.var_mean(v.flatten(1), dim=1, unbiased=False)
        mean, var = mean.expand(3), var.expand(3)
    scale = norm.weight / torch.sqrt(var + norm.eps)
    shift = norm.bias - mean * scale + scale * conv.bias
    voxels = int(np.prod(SHAPE))
    scale_k = np.repeat(scale.detach().double().numpy(), voxels)
    shift_k = np.repeat(shift.detach().double().numpy(), voxels)
    return scale_k[:, None] * linear, shift_k, ones


def expected_relevance(rule, weights: np.ndarray, shift: np.ndarray, ones: np.ndarray, x: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Relevance of each input by the rule's formula. ``start``: R_k at the outputs (K,)."""
    contributions = weights * x[None, :]  # z_jk, (K, J)
    z = contributions.sum(1) + shift

    def share(matrix, denominator):
        safe = np.where(denominator != 0, denominator, 1.0)
        return (matrix * np.where(denominator != 0, start / safe, 0.0)[:, None]).sum(0)

    positive, negative = np.clip(contributions, 0, None), np.clip(contributions, None, 0)
    if isinstance(rule, Epsilon):
        return share(contributions, z + rule.epsilon * np.where(z >= 0, 1, -1))
    if isinstance(rule, AlphaBeta):
        return rule.alpha * share(positive, positive.sum(1)) - rule.beta * share(negative, negative.sum(1))
    if isinstance(rule, Gamma):
        up, down = (z > 0)[:, None], (z < 0)[:, None]
        boosted = contributions + rule.gamma * (up * positive + down * negative)
        denominator = z + rule.gamma * (up[:, 0] * (positive.sum(1) + np.clip(shift, 0, None))
                                        + down[:, 0] * (negative.sum(1) + np.clip(shift, None, 0)))
        return share(boosted * (up | down), denominator)
    if isinstance(rule, ZBox):
        channels = x.reshape(2, -1)  # the rule's data bounds: each input channel's extremes
        low, high = np.repeat(channels.min(1), channels.shape[1]), np.repeat(channels.max(1), channels.shape[1])
        boxed = contributions - low * np.clip(weights, 0, None) - high * np.clip(weights, None, 0)
        return share(boxed, boxed.sum(1))
    if isinstance(rule, Flat):
        return share(ones, ones.sum(1))
    raise AssertionError(rule)


RULES = [Epsilon(0.0), Epsilon(0.3), AlphaBeta(1, 0), AlphaBeta(2, 1), Gamma(0.25), ZBox(), Flat()]
CASES = [(rule, first) for rule in RULES for first in (True, False) if first or not rule.input_only]


def run_rule(network: nn.Module, x: torch.Tensor, rule, first: bool, weights: torch.Tensor) -> np.ndarray:
    model = LoadedModel(network=network, device=torch.device("cpu"), task="segmentation", class_names=["a", "b", "c"], in_channels=2)
    target = Target(1, "b", "logit", "none", weights, {})
    if first:
        composite = Composite("test", first=rule, convolution=Epsilon(0), dense=Epsilon(0))
    else:
        composite = Composite("test", first=Epsilon(0), convolution=rule, dense=Epsilon(0))
    return lrp(model, x, target, composite).input[0].double().numpy().ravel()


def check_rule(rule, first: bool, norm: str, non_negative: bool = False) -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 2, *SHAPE)
    if non_negative:  # as after a ReLU (the α-β rule has a shortcut for it)
        x = x.clamp(min=0)
    layer = layer_under_test(norm)
    region = (torch.rand(SHAPE) > 0.3).float() * torch.rand(SHAPE)
    weights_matrix, shift, ones = affine_of(layer, x)
    with torch.no_grad():
        z = layer(x)
    start = (z[0] * torch.stack([torch.zeros(SHAPE), region, torch.zeros(SHAPE)])).double().numpy().ravel()
    expected = expected_relevance(rule, weights_matrix, shift, ones, x.double().numpy().ravel(), start)
    if first:
        network = layer
    else:  # an identity 1×1×1 convolution in front: the rule now acts through the rewritten gradient
        identity = nn.Conv3d(2, 2, 1, bias=False)
        identity.weight.data.copy_(torch.eye(2).reshape(2, 2, 1, 1, 1))
        network = nn.Sequential(identity, *layer).eval()
    actual = run_rule(network, x, rule, first, region)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
@pytest.mark.parametrize("rule, first", CASES, ids=[f"{r.describe()}-{'input' if f else 'inner'}" for r, f in CASES])
def test_rule_matches_its_formula_on_a_folded_conv_norm_layer(rule, first, norm):
    check_rule(rule, first, norm)


@pytest.mark.parametrize("rule", [AlphaBeta(1, 0), AlphaBeta(2, 1), Gamma(0.25)], ids=lambda r: r.describe())
def test_rule_matches_its_formula_on_non_negative_inputs(rule):
    check_rule(rule, False, "batch", non_negative=True)


def test_pass_rule_hands_relevance_through_standalone_norm_and_smooth_activation_unchanged():
    torch.manual_seed(2)
    norm = nn.BatchNorm3d(2).eval()
    norm.running_mean.copy_(torch.tensor([0.5, -0.5]))
    norm.weight.data.copy_(torch.tensor([1.5, -0.8]))
    norm.bias.data.copy_(torch.tensor([0.3, 0.1]))
    # conv → ELU → BN → 1×1 conv: the BN does not follow a conv directly, so it is not folded
    network = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1, bias=False), nn.ELU(), norm, nn.Conv3d(2, 1, 1, bias=False)).eval()
    model = LoadedModel(network=network, device=torch.device("cpu"), task="segmentation", class_names=["a"], in_channels=1)
    x = torch.randn(1, 1, *SHAPE)
    target = Target(0, "a", "logit", "none", torch.ones(SHAPE), {})
    composite = Composite("pass", first=Epsilon(0), convolution=Epsilon(0), dense=Epsilon(0), norm=Pass(), activation=Pass())
    result = lrp(model, x, target, composite)

    with torch.no_grad():
        hidden = network[:3](x)  # input of the last (1×1, bias-free) layer
        out = network(x)
    hidden_relevance = hidden * network[3].weight.reshape(1, 2, 1, 1, 1)  # LRP-0 of a 1×1 conv: h_c w_c
    # through BN and ELU unchanged; then LRP-0 of the first conv: R_x = x ⊙ Wᵀ(R / z)
    x_leaf = x.clone().requires_grad_(True)
    z = nn.functional.conv3d(x_leaf, network[0].weight, padding=1)
    (grad,) = torch.autograd.grad((z * (hidden_relevance / z).detach()).sum(), x_leaf)
    expected = (x * grad)[0]
    torch.testing.assert_close(result.input[0], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert float(result.input.sum()) == pytest.approx(float(out.sum()), rel=1e-4)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.describe())
def test_batch_with_per_sample_statistics_gives_each_sample_its_own_relevance(rule):
    # InstanceNorm statistics differ per sample, so the scale cannot be multiplied into one weight
    # for the batch: the per-sample scale path must agree with single-sample runs
    torch.manual_seed(3)
    layer = layer_under_test("instance")
    identity = nn.Conv3d(2, 2, 1, bias=False)
    identity.weight.data.copy_(torch.eye(2).reshape(2, 2, 1, 1, 1))
    network = layer if rule.input_only else nn.Sequential(identity, *layer).eval()
    x = torch.randn(2, 2, *SHAPE) * torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1, 1)
    region = torch.rand(SHAPE)
    model = LoadedModel(network=network, device=torch.device("cpu"), task="segmentation", class_names=["a", "b", "c"], in_channels=2)
    if rule.input_only:
        composite = Composite("test", first=rule, convolution=Epsilon(0), dense=Epsilon(0))
    else:
        composite = Composite("test", first=Epsilon(0), convolution=rule, dense=Epsilon(0))
    target = Target(1, "b", "logit", "none", region, {})
    batch = lrp(model, x, target, composite).input
    for sample in range(2):
        single = lrp(model, x[sample:sample + 1], target, composite).input[0]
        torch.testing.assert_close(batch[sample], single, rtol=1e-4, atol=1e-5 * float(single.abs().max()))


def test_the_dense_layers_epsilon_is_an_option_and_matches_the_epsilon_formula():
    """``lrp:COMPOSITE/eps=E`` sets the ε of the dense rule only; on one dense layer ``y = W x + b`` the
    relevance of input j for output k is ``x_j W_kj · y_k / (y_k + ε sign y_k)`` (hand-derived; the bias keeps
    the rest)."""
    from xaioverlay.errors import InputError
    from xaioverlay.methods import build_method

    method = build_method("lrp:/eps=0.25")
    assert method.spec == "lrp:epsilon-plus-flat/eps=0.25" and build_method(method.spec).spec == method.spec
    assert method.composite.dense == Epsilon(0.25) and method.composite.convolution == AlphaBeta(1, 0)
    assert build_method("lrp:epsilon-gamma-box/uniform/eps=1").spec == "lrp:epsilon-gamma-box/uniform/eps=1"
    for bad in ("lrp:/eps=x", "lrp:/eps=-1"):
        with pytest.raises(InputError, match="eps"):
            build_method(bad)

    torch.manual_seed(0)
    dense = nn.Linear(8, 3)
    network = nn.Sequential(nn.Flatten(), dense)
    model = LoadedModel(network=network, device=torch.device("cpu"), task="classification", class_names=["a", "b", "c"],
                        in_channels=1)
    x = torch.randn(1, 1, 2, 2, 2)
    with torch.no_grad():  # a pre-activation near 0, where ε matters
        dense.bias[1] = 0.05 - float(dense.weight[1] @ x.flatten())
    target = Target(1, "b", "logit", "none", None, {})
    relevance = build_method("lrp:zero/eps=0.3").attribute(model, x, target).map.double().flatten()
    y = float(network(x)[0, 1])
    expected = (x.flatten() * dense.weight[1]).double() * y / (y + 0.3)
    np.testing.assert_allclose(relevance.numpy(), expected.detach().numpy(), rtol=1e-5, atol=1e-9)
    assert abs(float(relevance.sum())) < 0.2 * abs(y - float(dense.bias[1]))  # LRP-0 would give y − b in all
