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


class OutOfMemoryAbove(nn.Module):
    """A real network that fails as PyTorch's CPU allocator does when a batch holds more than ``most`` items
    (memory cannot be exhausted on purpose in a test); records the batch size of every call."""

    def __init__(self, network: nn.Module, most: int) -> None:
        super().__init__()
        self.network, self.most, self.batches = network, most, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        if x.shape[0] > self.most:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9000000000 bytes.")
        return self.network(x)


def recording_segmenter(most: int = 1 << 30) -> LoadedModel:
    model = segmenter()
    model.network = OutOfMemoryAbove(model.network, most)
    return model


def test_integrated_gradients_batch_follows_free_memory_and_keeps_the_map(monkeypatch):
    import xaioverlay.memory

    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    target = region_target(16)
    start = make_baseline(x, "zero")
    reference, _ = integrated_gradients(segmenter(), x, target, start, steps=16, batch_size=1)
    # 16 path points + input and baseline; the last two calls are the completeness check (one item each)
    monkeypatch.setattr(xaioverlay.memory, "free_memory_bytes", lambda device: 2**20)
    low = recording_segmenter()
    on_little, _ = integrated_gradients(low, x, target, start, steps=16)
    assert low.network.batches == [1] * 18  # one path point's graph needs more than a quarter of 1 MB
    monkeypatch.setattr(xaioverlay.memory, "free_memory_bytes", lambda device: 64 * 2**30)
    high = recording_segmenter()
    on_plenty, _ = integrated_gradients(high, x, target, start, steps=16)
    assert high.network.batches == [1, 4, 4, 4, 3, 1, 1]  # the first point measures; then the CPU's most per batch
    for result in (on_little, on_plenty):
        torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))


def test_integrated_gradients_halve_a_batch_that_runs_out_of_memory_and_finish():
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    target = region_target(16)
    start = make_baseline(x, "blurred")
    reference, completeness = integrated_gradients(segmenter(), x, target, start, steps=10, batch_size=1)
    model = recording_segmenter(most=3)
    result, again = integrated_gradients(model, x, target, start, steps=10, batch_size=8)
    # 8 fails, 4 fails, then batches of 2 (never larger again), then the two completeness passes
    assert model.network.batches == [8, 4, 2, 2, 2, 2, 2, 1, 1]
    torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))
    assert again["score_difference"] == pytest.approx(completeness["score_difference"], rel=1e-6)


def test_one_path_point_out_of_memory_ends_in_one_line_not_a_traceback():
    from xaioverlay.errors import ModelError
    from xaioverlay.memory import out_of_memory_as_error

    model = recording_segmenter(most=0)
    x = torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(ModelError, match="out of memory while explaining") as caught:
        with out_of_memory_as_error(model.device, "explaining"):
            integrated_gradients(model, x, region_target(16), torch.zeros_like(x), steps=4, batch_size=2)
    assert "\n" not in str(caught.value) and model.network.batches == [2, 1]


def test_what_a_backward_pass_saves_is_measured_per_item():
    from xaioverlay.memory import saved_for_backward

    network = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 2, 3, padding=1))
    measured = []
    for items in (1, 2):
        x = torch.randn(items, 1, 16, 16, 16, requires_grad=True)
        with saved_for_backward() as saved:
            out = network(x).sum()
        measured.append(sum(saved.values()))
        out.backward()
    relu_output = 8 * 16**3 * 4  # bytes of one item's ReLU output, which the second convolution keeps
    assert measured[0] >= relu_output
    assert measured[1] - measured[0] >= relu_output  # every further item adds its own activations
