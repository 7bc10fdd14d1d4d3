"""Gradient × input and integrated gradients: against Captum, completeness, baselines, batching, options."""

from __future__ import annotations

import pytest
import torch
from monai.networks import nets
from torch import nn

from xaioverlay.baselines import gaussian_blur
from xaioverlay.errors import InputError
from xaioverlay.methods import build_method
from xaioverlay.methods.gradients import (
    BLUR_SIGMA_VOXELS, GradientTimesInput, IntegratedGradients, gradient_times_input,
    integrated_gradients, make_baseline,
)
from xaioverlay.models.base import LoadedModel
from xaioverlay.targets import Target


def classifier(seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    network = nets.ResNet("basic", [1, 1, 1, 1], [4, 8, 8, 16], spatial_dims=3, n_input_channels=1, num_classes=2)
    return LoadedModel(network=network.eval(), device=torch.device("cpu"), task="classification", class_names=["a", "b"], in_channels=1)


def segmenter(seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    network = nets.UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=1, norm="batch")
    return LoadedModel(network=network.eval(), device=torch.device("cpu"), task="segmentation", class_names=["a", "b"], in_channels=1)


CLASS_1 = Target(1, "b", "logit", "softmax", None, {})


def region_target(size: int) -> Target:
    region = torch.zeros(size, size, size)
    region[2:9, 3:12, 4:10] = 1
    return Target(1, "b", "logit", "softmax", region, {})


def test_gradient_times_input_matches_captum():
    from captum.attr import InputXGradient

    model = segmenter()
    x = torch.randn(1, 1, 16, 16, 16)
    target = region_target(16)
    reference = InputXGradient(lambda t: target(model.network(t))).attribute(x.clone())
    torch.testing.assert_close(gradient_times_input(model, x, target), reference, rtol=1e-5, atol=1e-7)
    attribution = GradientTimesInput().attribute(model, x, target)
    assert attribution.signed and attribution.map.shape == (16, 16, 16)
    assert model.passes.as_dict() == {"forward": 2, "backward": 2}


@pytest.mark.parametrize("baseline", ["zero", "blurred", "mean"])
def test_integrated_gradients_match_captum_with_the_same_baseline_and_quadrature(baseline):
    from captum.attr import IntegratedGradients as CaptumIG

    model = segmenter()
    x = torch.randn(1, 1, 16, 16, 16)
    target = region_target(16)
    start = make_baseline(x, baseline)
    ours, _ = integrated_gradients(model, x, target, start, steps=16, batch_size=5)
    reference = CaptumIG(lambda t: target(model.network(t))).attribute(
        x.clone(), baselines=start, n_steps=16, method="gausslegendre", internal_batch_size=8)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()))


def small_cnn(seed: int, activation: type[nn.Module]) -> LoadedModel:
    torch.manual_seed(seed)
    network = nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1), activation(), nn.Conv3d(8, 8, 3, stride=2, padding=1), activation(),
        nn.Conv3d(8, 8, 3, stride=2, padding=1), activation(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 2),
    )
    return LoadedModel(network=network.eval(), device=torch.device("cpu"), task="classification", class_names=["a", "b"], in_channels=1)


# smooth (ELU) networks: the quadrature converges fast; ReLU networks: the integrand jumps at every
# unit that switches along the path, so the error at 64 steps is larger (measured here: < 2 %)
@pytest.mark.parametrize("activation, seed", [(nn.ELU, 0), (nn.ELU, 1)] + [(nn.ReLU, seed) for seed in range(5)])
@pytest.mark.parametrize("baseline", ["zero", "blurred", "mean"])
def test_integrated_gradients_are_complete_within_two_percent_at_64_steps(baseline, activation, seed):
    model = small_cnn(seed, activation)
    x = torch.randn(1, 1, 16, 16, 16)
    attribution = IntegratedGradients(64, baseline, batch_size=32).attribute(model, x, CLASS_1)
    completeness = attribution.extras["completeness"]
    with torch.no_grad():
        expected = float(model.network(x)[0, 1] - model.network(make_baseline(x, baseline))[0, 1])
    assert completeness["score_difference"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert float(attribution.map.sum()) == pytest.approx(completeness["sum_attributions"], rel=1e-5)
    assert completeness["relative_error"] <= 0.02


def test_integrated_gradients_run_steps_in_batches_and_count_passes():
    model = classifier()
    x = torch.randn(1, 1, 32, 32, 32)
    steps = []
    from xaioverlay.progress import Progress

    IntegratedGradients(10, "zero", batch_size=4).attribute(model, x, CLASS_1, Progress(lambda e: steps.append(e["done"])))
    assert steps == [4, 8, 10]
    # 10 path points (in batches of 4, 4, 2) + input and baseline for the completeness check
    assert model.passes.as_dict() == {"forward": 12, "backward": 10}


def test_blurred_baseline_keeps_the_mean_and_removes_detail():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 24, 20, 16) + torch.tensor([3.0, -1.0]).reshape(1, 2, 1, 1, 1)
    blurred = make_baseline(x, "blurred")
    assert blurred.shape == x.shape
    torch.testing.assert_close(blurred.mean(dim=(2, 3, 4)), x.mean(dim=(2, 3, 4)), atol=0.05, rtol=0)
    def detail(t):
        return float((t - t.mean(dim=(2, 3, 4), keepdim=True)).std())

    assert detail(blurred) < 0.2 * detail(x)
    # a unit impulse spreads as a Gaussian of the documented width
    impulse = torch.zeros(1, 1, 41, 41, 41)
    impulse[0, 0, 20, 20, 20] = 1
    profile = gaussian_blur(impulse, BLUR_SIGMA_VOXELS)[0, 0, :, 20, 20]
    positions = torch.arange(41.0) - 20
    sigma = float(torch.sqrt((profile * positions**2).sum() / profile.sum()))
    assert sigma == pytest.approx(BLUR_SIGMA_VOXELS, rel=0.05)


def test_mean_baseline_is_each_channels_mean():
    x = torch.randn(1, 2, 8, 8, 8)
    baseline = make_baseline(x, "mean")
    for channel in range(2):
        assert torch.allclose(baseline[0, channel], x[0, channel].mean().expand(8, 8, 8))


@pytest.mark.parametrize("spec, steps, baseline, normalised", [
    ("ig", 64, "zero", "ig"), ("ig:128", 128, "zero", "ig:128"), ("ig:blurred", 64, "blurred", "ig:blurred"),
    ("ig:32/mean", 32, "mean", "ig:32/mean"), ("ig:Blurred/16", 16, "blurred", "ig:16/blurred"),
])
def test_ig_options_are_read_from_the_method_spec(spec, steps, baseline, normalised):
    method = build_method(spec)
    assert (method.steps, method.baseline, method.spec) == (steps, baseline, normalised)


@pytest.mark.parametrize("spec", ["ig:0", "ig:gaussian", "ig:64/zero/extra", "gxi:5"])
def test_bad_options_are_refused_with_a_clear_message(spec):
    with pytest.raises(InputError):
        build_method(spec)
