"""Sanity checks: randomisation leaves the user's model untouched, ranks blocks top-down, and separates
a map that depends on the model from one that does not; the random-logit check sees class dependence."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from xaioverlay.errors import Cancelled
from xaioverlay.explain import attribute
from xaioverlay.methods import build_method
from xaioverlay.metrics.sanity import (
    cascading_randomisation, execution_order, parameter_blocks, random_logit,
)
from xaioverlay.models import LoadedModel, ModelInput, load_model
from xaioverlay.targets import Target
from xaioverlay.volumes import Geometry


def _snapshot(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in network.state_dict().items()}


def _identical(network: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    state = network.state_dict()
    return state.keys() == snapshot.keys() and all(
        state[name].dtype == value.dtype and torch.equal(state[name], value) for name, value in snapshot.items()
    )


def _gradcam(model_input_tensor):
    method = build_method("gradcam")

    grid = Geometry.from_ijk_to_ras(np.eye(4), tuple(model_input_tensor.shape[2:]))  # 1 mm voxels
    model_input = ModelInput(model_input_tensor, np.eye(4), grid, [])

    def explain(model, target):
        return attribute(method, model, model_input, target).map.detach()

    return explain


@pytest.fixture
def classifier(densenet_spec) -> LoadedModel:
    return load_model(densenet_spec, device="cpu")


def _input(seed=0, shape=(32, 32, 32)):
    return torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(seed))


def test_randomisation_leaves_the_model_bit_identical_and_the_random_state_alone(classifier):
    x = _input()
    before = _snapshot(classifier.network)
    rng_before = torch.get_rng_state()
    explain = _gradcam(x)
    target = Target(1, "tumour")
    original = explain(classifier, target)
    result = cascading_randomisation(classifier, x, target, original, explain, depth=None)
    assert len(result.correlations) == len(result.blocks) >= 6
    assert _identical(classifier.network, before)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not classifier.network.training
    # and the map of the untouched model is reproduced exactly
    assert torch.equal(explain(classifier, target), original)


def test_randomisation_leaves_the_model_untouched_when_interrupted(classifier):
    x = _input(1)
    before = _snapshot(classifier.network)
    rng_before = torch.get_rng_state()
    explain = _gradcam(x)
    target = Target(0, "no tumour")
    original = explain(classifier, target)
    calls = []

    def cancel_on_third(event):
        calls.append(event)
        if event.get("done") == 3:
            raise Cancelled("stopped by the user")

    from xaioverlay.progress import Progress

    with pytest.raises(Cancelled):
        cascading_randomisation(classifier, x, target, original, explain, progress=Progress(cancel_on_third))
    assert len(calls) == 3
    assert _identical(classifier.network, before)
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_a_map_that_ignores_the_model_fails_and_grad_cam_passes(classifier):
    """Adebayo et al.'s point, on a real network: an edge-detector-like map (a function of the input only)
    keeps its rank order whatever the weights; Grad-CAM's does not."""
    x = _input(2)
    target = Target(1, "tumour")
    input_only = lambda model, t: x[0, 0].abs()  # noqa: E731 — the map of a method that never asks the model
    kept = cascading_randomisation(classifier, x, target, input_only(classifier, target), input_only)
    assert kept.correlations == pytest.approx([1.0] * len(kept.blocks))
    assert kept.passed is False and kept.record()["verdict"] == "fail"

    explain = _gradcam(x)
    changed = cascading_randomisation(classifier, x, target, explain(classifier, target), explain)
    assert changed.final < 0.5 and changed.passed is True
    assert changed.passes["forward"] >= len(changed.blocks)  # one explanation per step at least


def test_depth_limits_the_steps_and_zero_runs_none(classifier):
    x = _input(3)
    explain = _gradcam(x)
    target = Target(1, "tumour")
    original = explain(classifier, target)
    two = cascading_randomisation(classifier, x, target, original, explain, depth=2)
    assert len(two.correlations) == 2 and two.blocks[0] == "class_layers"
    none = cascading_randomisation(classifier, x, target, original, explain, depth=0)
    assert none.correlations == [] and none.passed is None


def _named(network, x):
    model = LoadedModel(network, torch.device("cpu"), "classification", ["a", "b"], 1)
    return [b.name for b in parameter_blocks(network, execution_order(model, x))]


def test_blocks_run_top_down_for_resnet_densenet_and_unet():
    from monai.networks.nets import DenseNet121, ResNet, UNet

    x = torch.zeros((1, 1, 32, 32, 32))
    resnet = ResNet("basic", [1, 1, 1, 1], [4, 8, 8, 8], spatial_dims=3, n_input_channels=1, num_classes=2, no_max_pool=True)
    assert _named(resnet, x) == ["fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    densenet = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=4, growth_rate=2, block_config=(1, 1, 1))
    names = _named(densenet, x)
    assert names[0] == "class_layers" and names[-1] == "features.conv0"
    assert names.index("features.denseblock3") < names.index("features.denseblock2") < names.index("features.denseblock1")
    unet = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    names = _named(unet, x)
    # decoder (output side) first, encoder last; the wrapper around everything is never a block
    assert names[0] == "model.2" and names[-1] == "model.0" and len(names) >= 5
    encoder, decoder = names.index("model.1.submodule.0"), names.index("model.1.submodule.2")
    bottom = [i for i, name in enumerate(names) if name.startswith("model.1.submodule.1")]
    assert bottom and decoder < min(bottom) and max(bottom) < encoder


def _opposite_logits() -> LoadedModel:
    """A linear classifier whose two logits are exact opposites: class 0's evidence is class 1's counter-evidence."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6 * 6 * 4, 1)

    class Opposite(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            score = self.linear(x.flatten(1))
            return torch.cat([score, -score], dim=1)

    return LoadedModel(Opposite(), torch.device("cpu"), "classification", ["a", "b"], 1)


def test_random_logit_sees_class_dependence():
    model = _opposite_logits()
    x = _input(4, (6, 6, 4))

    def gradient(model, target):
        inputs = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(target(model.forward(inputs)).sum(), inputs)
        return grad[0, 0]

    target = Target(0, "a")
    result = random_logit(model, target, gradient(model, target), gradient)
    assert result.other_index == 1 and result.spearman == pytest.approx(-1.0)
    input_only = lambda model, t: x[0, 0]  # noqa: E731 — the same map for every class
    assert random_logit(model, target, x[0, 0], input_only).spearman == pytest.approx(1.0)


def test_random_logit_refuses_segmenters(unet_spec):
    model = load_model(unet_spec, device="cpu")
    with pytest.raises(Exception, match="classifier"):
        random_logit(model, Target(1, "tumour", weights=torch.ones(8, 8, 8)), torch.zeros(8, 8, 8), lambda m, t: torch.zeros(8, 8, 8))


def test_randomisation_runs_on_torchscript_and_leaves_it_untouched(tmp_path):
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    network = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=4, growth_rate=2, block_config=(1, 1)).eval()
    torch.jit.script(network).save(str(tmp_path / "model.ts"))
    model = load_model(tmp_path / "model.ts", device="cpu")
    x = _input(5)
    before = _snapshot(model.network)

    def gradient(model, target):
        inputs = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(target(model.forward(inputs)).sum(), inputs)
        return grad[0, 0]

    target = Target(1, "class 1")
    result = cascading_randomisation(model, x, target, gradient(model, target), gradient)
    assert result.blocks[0] == "class_layers" and result.blocks[-1] == "features.conv0"  # registration order: no hooks
    assert result.final < 0.5
    assert _identical(model.network, before)
