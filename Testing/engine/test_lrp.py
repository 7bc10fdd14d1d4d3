"""LRP on whole networks: stock MONAI 3D networks, LRP-0 = gradient × input, conservation, the
residual split in closed form, agreement with Captum, unsupported layers, the network left untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks import nets
from torch import nn

from xaioverlay.errors import Cancelled, ModelError
from xaioverlay.methods.lrp import COMPOSITES, AlphaBeta, Composite, Epsilon, lrp
from xaioverlay.models.base import LoadedModel
from xaioverlay.targets import Target

# tiny instances of each stock network, with the input size it needs (its total downsampling)
STOCK = {
    "UNet-instance-PReLU": (lambda: nets.UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=1, dropout=0.1), "segmentation", 16),
    "UNet-batch-PReLU": (lambda: nets.UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=2, norm="batch", dropout=0.1), "segmentation", 16),
    "BasicUNet": (lambda: nets.BasicUNet(3, 1, 2, features=(2, 2, 4, 4, 8, 2)), "segmentation", 32),
    "SegResNet": (lambda: nets.SegResNet(3, init_filters=4, in_channels=1, out_channels=2, blocks_down=(1, 2), blocks_up=(1,),
                                         norm=("group", {"num_groups": 2})), "segmentation", 16),
    "DenseNet121": (lambda: nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                                             block_config=(2, 2, 2, 2)), "classification", 32),
    "ResNet-basic": (lambda: nets.ResNet("basic", [1, 1, 1, 1], [4, 8, 8, 16], spatial_dims=3, n_input_channels=1, num_classes=2),
                     "classification", 32),
    "ResNet-bottleneck": (lambda: nets.ResNet("bottleneck", [1, 1, 1, 1], [4, 4, 8, 8], spatial_dims=3, n_input_channels=1,
                                              num_classes=2), "classification", 32),
}
STATS_FROM_INPUT = {"UNet-instance-PReLU", "BasicUNet", "SegResNet"}  # Instance/GroupNorm


def randomise_batch_norms(network: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters (fresh ones are the identity map)."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            channels = module.num_features
            module.running_mean.copy_(torch.rand(channels, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(channels, generator=generator) * 2.5 - 0.8)
            module.bias.data.copy_(torch.rand(channels, generator=generator) * 0.6 - 0.3)
    return network


def loaded(network: nn.Module, task: str, channels: int = 2) -> LoadedModel:
    return LoadedModel(network=network.eval(), device=torch.device("cpu"), task=task,
                       class_names=[f"c{i}" for i in range(channels)], in_channels=1)


def stock(name: str, seed: int = 0) -> tuple[LoadedModel, torch.Tensor, Target]:
    build, task, size = STOCK[name]
    torch.manual_seed(seed)
    network = randomise_batch_norms(build(), seed)
    x = torch.randn(1, 1, size, size, size)
    if task == "segmentation":
        region = torch.zeros(size, size, size)
        region[size // 4: size // 2, size // 4: 3 * size // 4, size // 2:] = 1
        target = Target(1, "c1", "logit", "softmax", region, {})
    else:
        target = Target(1, "c1", "logit", "softmax", None, {})
    return loaded(network, task), x, target


def gradient_times_input(network: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(target(network(x)).sum(), x)
    return (x * grad).detach()


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def snapshot(network: nn.Module, x: torch.Tensor) -> dict:
    with torch.no_grad():
        output = network(x)
    if isinstance(output, (tuple, list)):  # MONAI's ViT: (logits, hidden states)
        output = output[0]
    return {
        "state": {k: v.clone() for k, v in network.state_dict().items()},
        "output": output.clone(),
        "modes": [m.training for m in network.modules()],
        "requires_grad": [p.requires_grad for p in network.parameters()],
        "own_forward": [type(m).__name__ for m in network.modules() if "forward" in m.__dict__],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in network.modules()),
    }


def assert_untouched(before: dict, network: nn.Module, x: torch.Tensor) -> None:
    after = snapshot(network, x)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert torch.equal(after["output"], before["output"])  # bit-identical
    for field in ("modes", "requires_grad", "own_forward", "hooks"):
        assert after[field] == before[field], field


# --- stock MONAI networks -------------------------------------------------------------------------

@pytest.mark.parametrize("name", STOCK)
def test_every_composite_runs_on_stock_monai_network_and_leaves_it_untouched(name):
    model, x, target = stock(name)
    before = snapshot(model.network, x)
    for composite in COMPOSITES.values():
        result = lrp(model, x, target, composite)
        assert result.input.shape == x.shape
        assert torch.isfinite(result.input).all()
        assert result.input.abs().sum() > 0
        assert_untouched(before, model.network, x)


@pytest.mark.parametrize("name", ["UNet-batch-PReLU", "DenseNet121", "ResNet-basic", "ResNet-bottleneck"])
def test_lrp0_equals_gradient_times_input_on_stock_relu_and_prelu_networks(name):
    model, x, target = stock(name)
    relevance = lrp(model, x, target, COMPOSITES["zero"]).input
    assert max_relative_difference(relevance, gradient_times_input(model.network, x, target)) <= 1e-5


def detach_norm_statistics(network: nn.Module) -> list:
    """Forward hooks that recompute each Instance/GroupNorm with its statistics as constants."""
    def hook(module, inputs, output):
        v = inputs[0]
        groups = module.num_groups if isinstance(module, nn.GroupNorm) else v.shape[1]
        grouped = v.reshape(v.shape[0], groups, -1)
        var, mean = torch.var_mean(grouped.detach(), dim=2, unbiased=False, keepdim=True)
        normalised = ((grouped - mean) / torch.sqrt(var + module.eps)).reshape(v.shape)
        shape = (1, -1) + (1,) * (v.ndim - 2)
        if module.weight is not None:
            normalised = normalised * module.weight.reshape(shape) + module.bias.reshape(shape)
        return normalised

    return [m.register_forward_hook(hook) for m in network.modules()
            if isinstance(m, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm))]


@pytest.mark.parametrize("name", sorted(STATS_FROM_INPUT))
def test_lrp0_with_instance_or_group_norm_equals_gradient_with_statistics_held_constant(name):
    model, x, target = stock(name)
    relevance = lrp(model, x, target, COMPOSITES["zero"]).input
    handles = detach_norm_statistics(model.network)
    try:
        reference = gradient_times_input(model.network, x, target)
    finally:
        for handle in handles:
            handle.remove()
    assert max_relative_difference(relevance, reference) <= 1e-4
    # and the statistics' own gradient is what makes plain gradient × input differ
    assert max_relative_difference(relevance, gradient_times_input(model.network, x, target)) > 1e-3


def prelu_cnn(bias: bool = True) -> nn.Module:
    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv3d(1, 4, 3, padding=1, bias=bias), nn.PReLU(4, init=0.2), nn.MaxPool3d(2),
                nn.Conv3d(4, 6, 3, padding=1, bias=bias), nn.ReLU(), nn.AvgPool3d(2),
            )
            self.head = nn.Linear(6 * 8, 3, bias=bias)

        def forward(self, x):
            return self.head(self.features(x).reshape(x.shape[0], -1))

    torch.manual_seed(3)
    return CNN()


def test_lrp0_equals_gradient_times_input_on_a_prelu_cnn():
    model = loaded(prelu_cnn(), "classification", 3)
    x = torch.randn(1, 1, 8, 8, 8)
    target = Target(2, "c2", "logit", "softmax", None, {})
    relevance = lrp(model, x, target, COMPOSITES["zero"]).input
    assert max_relative_difference(relevance, gradient_times_input(model.network, x, target)) <= 1e-5


class ConvOutputUsedTwice(nn.Module):
    """A conv output that feeds a BatchNorm and also another path (fan-out), or is changed in place
    before the BatchNorm: folding must not touch the other path / must not happen."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.conv, self.bn, self.head = nn.Conv3d(1, 3, 3, padding=1), nn.BatchNorm3d(3), nn.Conv3d(6, 2, 1)

    def forward(self, x):
        v = self.conv(x)
        if self.in_place:
            v += 0.5
        return self.head(torch.cat([torch.relu(self.bn(v)), torch.relu(v)], 1))


@pytest.mark.parametrize("in_place", [False, True], ids=["fan-out", "changed-in-place"])
def test_folding_a_norm_leaves_other_uses_of_the_conv_output_exact(in_place):
    torch.manual_seed(8)
    network = randomise_batch_norms(ConvOutputUsedTwice(in_place), 8).eval()
    model = loaded(network, "segmentation")
    x = torch.randn(1, 1, 6, 6, 6)
    target = Target(1, "c1", "logit", "softmax", torch.rand(6, 6, 6), {})
    relevance = lrp(model, x, target, COMPOSITES["zero"]).input
    assert max_relative_difference(relevance, gradient_times_input(network, x, target)) <= 1e-5


# --- conservation -------------------------------------------------------------------------------

def bias_free_unet() -> nn.Module:
    torch.manual_seed(4)
    return nets.UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=1, norm=None, bias=False, act="relu")


@pytest.mark.parametrize("composite", ["zero", "epsilon-plus-flat", "epsilon-gamma-box"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_classifier_relevance_sums_to_the_logit_on_a_bias_free_network(composite, index):
    model = loaded(prelu_cnn(bias=False), "classification", 3)
    x = 30 * torch.randn(1, 1, 8, 8, 8)  # the dense layer's ε = 1e-6 is absolute: keep logits well above it
    target = Target(index, f"c{index}", "logit", "softmax", None, {})
    result = lrp(model, x, target, COMPOSITES[composite])
    with torch.no_grad():
        logit = float(model.network(x)[0, index])
    assert float(result.output[0]) == pytest.approx(logit, rel=1e-6)
    assert float(result.input.sum()) == pytest.approx(logit, rel=1e-4)


@pytest.mark.parametrize("channel", [0, 1])
def test_segmentation_relevance_sums_to_the_summed_logit_over_the_region(channel):
    network = bias_free_unet()
    model = loaded(network, "segmentation")
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        logits = network(x)
    region = (logits.argmax(1)[0] == channel).float()
    target = Target(channel, f"c{channel}", "logit", "softmax", region, {})
    explained = float((logits[0, channel] * region).sum())
    for composite in ("zero", "epsilon-gamma-box"):
        result = lrp(model, x, target, COMPOSITES[composite])
        assert float(result.output[0]) == pytest.approx(explained, rel=1e-6)
        assert float(result.input.sum()) == pytest.approx(explained, rel=1e-4), composite
    # weighted regions (as sliding windows make them) conserve the weighted sum
    weights = region * torch.rand(region.shape, generator=torch.Generator().manual_seed(0))
    result = lrp(model, x, target.restricted(weights), COMPOSITES["zero"])
    assert float(result.input.sum()) == pytest.approx(float((logits[0, channel] * weights).sum()), rel=1e-4)


# --- residual connections ----------------------------------------------------------------------

class TwoBranchBlock(nn.Module):
    """h = relu(A x); y = relu(B h + h) (a residual block); out = C y."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.a = nn.Conv3d(1, 2, 1, bias=False)
        self.b = nn.Conv3d(2, 2, 3, padding=1, bias=False)
        self.c = nn.Conv3d(2, 1, 1, bias=False)
        for conv in (self.a, self.b, self.c):
            conv.weight.data.copy_(torch.randn(conv.weight.shape, generator=generator))

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h) + h))


def matrix(conv: nn.Conv3d, shape) -> np.ndarray:
    probe = torch.zeros(1, conv.in_channels, *shape)
    jac = torch.autograd.functional.jacobian(lambda t: conv(t), probe)
    return jac.reshape(conv(probe).numel(), probe.numel()).double().numpy()


def z_plus(weights: np.ndarray, inputs: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """z⁺ rule for non-negative inputs: R_j = Σ_k x_j w⁺_kj / Σ_j x_j w⁺_kj R_k."""
    contributions = np.clip(weights, 0, None) * inputs[None, :]
    totals = contributions.sum(1)
    return (contributions * np.where(totals > 0, relevance / np.where(totals > 0, totals, 1), 0)[:, None]).sum(0)


def test_residual_sum_splits_relevance_in_proportion_to_each_branch():
    block = TwoBranchBlock().eval()
    shape = (4, 3, 3)
    x = torch.rand(1, 1, *shape) + 0.1
    region = torch.rand(shape, generator=torch.Generator().manual_seed(6))
    model = loaded(block, "segmentation", 1)
    composite = Composite("test", first=Epsilon(0), convolution=AlphaBeta(1, 0), dense=Epsilon(0))
    result = lrp(model, x, Target(0, "c0", "logit", "none", region, {}), composite)

    # closed form, in NumPy: out = C relu(B h + h), h = relu(A x)
    A, B, C = (matrix(conv, shape) for conv in (block.a, block.b, block.c))
    xv = x.double().numpy().ravel()
    h = np.maximum(A @ xv, 0)
    branch = B @ h
    s = branch + h
    y = np.maximum(s, 0)
    out = C @ y
    r_out = out * region.double().numpy().ravel()
    r_y = z_plus(C, y, r_out)  # last conv (z⁺)
    r_s = r_y  # ReLU: relevance passes
    share = np.where(s != 0, r_s / np.where(s != 0, s, 1), 0)
    r_branch, r_skip = branch * share, h * share  # proportional split of the sum
    r_h = z_plus(B, h, r_branch) + r_skip  # branch conv (z⁺) + skip
    pre = A @ xv
    r_x = (A * xv[None, :] * np.where(pre != 0, r_h / np.where(pre != 0, pre, 1), 0)[:, None]).sum(0)  # LRP-0

    np.testing.assert_allclose(result.input.double().numpy().ravel(), r_x, rtol=1e-4, atol=1e-6 * np.abs(r_x).max())
    # never counted twice: a copy of the whole relevance into both branches would add Σ r_s again
    assert r_x.sum() == pytest.approx(r_out.sum(), rel=1e-4)
    assert float(result.input.sum()) == pytest.approx(float(r_out.sum()), rel=1e-4)


# --- reference implementation ------------------------------------------------------------------

def test_epsilon_rule_agrees_with_captum_lrp_on_a_sequential_3d_cnn():
    from captum.attr import LRP as CaptumLRP
    from captum.attr._utils.lrp_rules import EpsilonRule

    class Sequential3D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.relu1, self.pool = nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2)
            self.conv2, self.relu2 = nn.Conv3d(4, 6, 3, padding=1), nn.ReLU()
            self.fc = nn.Linear(6 * 4 * 4 * 4, 3)

        def forward(self, x):
            x = self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))
            return self.fc(x.reshape(x.shape[0], -1))  # Captum cannot take a Flatten module

    torch.manual_seed(7)
    network = Sequential3D().eval()
    x = torch.rand(1, 1, 8, 8, 8)
    epsilon = 0.05
    for layer in (network.conv1, network.conv2, network.fc):
        layer.rule = EpsilonRule(epsilon=epsilon)
    network.pool.rule = EpsilonRule(epsilon=1e-9)  # max pooling passes relevance to the winner
    reference = CaptumLRP(network).attribute(x.clone(), target=2).detach()
    for layer in (network.conv1, network.conv2, network.fc, network.pool):
        layer.__dict__.pop("rule", None)

    composite = Composite("epsilon", first=Epsilon(epsilon), convolution=Epsilon(epsilon), dense=Epsilon(epsilon))
    relevance = lrp(loaded(network, "classification", 3), x, Target(2, "c2", "logit", "softmax", None, {}), composite).input
    correlation = np.corrcoef(relevance.numpy().ravel(), reference.numpy().ravel())[0, 1]
    assert correlation >= 0.999
    assert max_relative_difference(relevance, reference) <= 1e-4


# --- what LRP refuses, and cleaning up ----------------------------------------------------------

def test_unsupported_layer_is_named_in_the_error_and_the_network_is_restored():
    network = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(),
                            nn.Sequential(nn.Flatten(2), nn.RMSNorm(64)), nn.Flatten(), nn.Linear(128, 2)).eval()
    x = torch.randn(1, 1, 4, 4, 4)
    before = snapshot(network, x)
    with pytest.raises(ModelError, match=r"layer '2\.1' of type RMSNorm"):
        lrp(loaded(network, "classification"), x, Target(0, "c0", "logit", "softmax", None, {}), COMPOSITES["epsilon-plus-flat"])
    assert_untouched(before, network, x)


def test_product_of_two_feature_maps_is_refused_not_given_plain_gradients():
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features, self.gate, self.head = nn.Conv3d(1, 2, 3, padding=1), nn.Conv3d(1, 2, 1), nn.Conv3d(2, 2, 1)
            self.sigmoid = nn.Sigmoid()

        def forward(self, x):
            return self.head(self.features(x) * self.sigmoid(self.gate(x)))

    network = Gated().eval()
    x = torch.randn(1, 1, 4, 4, 4)
    target = Target(0, "c0", "logit", "softmax", torch.ones(4, 4, 4), {})
    with pytest.raises(ModelError, match="product or ratio of two feature maps"):
        lrp(loaded(network, "segmentation"), x, target, COMPOSITES["epsilon-plus-flat"])


def test_activation_called_as_a_function_is_refused():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv3d(1, 2, 3, padding=1), nn.Conv3d(2, 2, 1)

        def forward(self, x):
            return self.head(torch.tanh(self.conv(x)))

    x = torch.randn(1, 1, 4, 4, 4)
    target = Target(0, "c0", "logit", "softmax", torch.ones(4, 4, 4), {})
    with pytest.raises(ModelError, match="TanhBackward"):
        lrp(loaded(Functional().eval(), "segmentation"), x, target, COMPOSITES["epsilon-plus-flat"])


def test_network_is_restored_when_the_run_is_cancelled_midway():
    model, x, target = stock("UNet-instance-PReLU")
    before = snapshot(model.network, x)

    class CancellingTarget(Target):
        def __call__(self, output):
            raise Cancelled("user pressed cancel")

    cancelling = CancellingTarget(target.index, target.name, target.score, target.activation, target.weights, {})
    with pytest.raises(Cancelled):
        lrp(model, x, cancelling, COMPOSITES["epsilon-plus-flat"])
    assert_untouched(before, model.network, x)
    # and it still explains normally afterwards
    assert torch.isfinite(lrp(model, x, target, COMPOSITES["epsilon-plus-flat"]).input).all()


class NearZeroLogit(nn.Module):
    """Four voxels → an identity dense layer (the ``first`` rule reads the input) → one logit ``w · h + 1`` whose
    weighted sum cancels the bias to within ``gap``: LRP-ε's bias share ``z / (z + ε)`` then blows up."""

    def __init__(self, gap: float) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4, bias=False)
        self.logit = nn.Linear(4, 2)
        with torch.no_grad():
            self.first.weight.copy_(torch.eye(4))
            self.logit.weight.copy_(torch.tensor([[0.0, 0, 0, 0], [-0.25, -0.25, -0.25, -0.25 + gap]]))
            self.logit.bias.copy_(torch.tensor([0.0, 1.0]))

    def forward(self, x):
        return self.logit(self.first(x.flatten(1)))


@pytest.mark.parametrize("gap, warns", [(1e-7, True), (2.0, False)])
def test_lrp_warns_in_one_line_when_relevance_is_not_conserved(gap, warns):
    """Logit 1e-7 against a bias of 1: the dense ε of 1e-6 makes the input relevance about -0.09 for an explained
    score of 1e-7 (a relative error near 1e6), and the result carries a warning that says what to do; with a
    logit of 2 (well away from zero) the error is the bias's share, 0.5, and no warning is given."""
    from xaioverlay.methods.lrp import LRP

    model = loaded(NearZeroLogit(gap), "classification")
    attribution = LRP().attribute(model, torch.ones(1, 1, 4, 1, 1), Target(1, "c1", "logit", "softmax", None, {}))
    error = attribution.extras["conservation"]["relative_error"]
    if warns:
        assert error > 1e5
        assert "did not conserve relevance" in attribution.extras["warning"]
        assert "lrp:/eps=0.25" in attribution.extras["warning"] and "\n" not in attribution.extras["warning"]
    else:
        assert error < 1.0 and "warning" not in attribution.extras
