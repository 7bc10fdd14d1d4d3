"""Grad-CAM family: equal to MONAI's implementations, layers found and named, windows exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support import SMALL_UNET, save_spec_model
from xaioverlay.errors import ModelError
from xaioverlay.explain import attribute, explain
from xaioverlay.layers import candidate_layers, default_layer
from xaioverlay.methods import build_method
from xaioverlay.methods.base import Attribution, Method
from xaioverlay.methods.cam import gradcam, gradcam_plus_plus, hirescam
from xaioverlay.models import load_model
from xaioverlay.prediction import predict
from xaioverlay.targets import resolve_target
from xaioverlay.volumes import Geometry, Volume


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


@pytest.fixture
def densenet_and_input(densenet_spec):
    model = load_model(densenet_spec, device="cpu")
    torch.manual_seed(3)
    volume = Volume(torch.rand(64, 64, 64).numpy(), Geometry((64, 64, 64), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    return model, volume


# Grad-CAM must equal MONAI's. MONAI's GradCAMpp sums A·G³ over positions in α's denominator where the
# paper (and pytorch-grad-cam) use ΣA · G³ at each position; ours follows the paper (checked by hand below),
# so against MONAI it is only required to be close.
@pytest.mark.parametrize("layer", ["class_layers.relu", "features.denseblock3"])
@pytest.mark.parametrize("ours,monai_name,minimum", [("gradcam", "GradCAM", 0.999), ("gradcampp", "GradCAMpp", 0.98)])
def test_cam_equals_monai_visualize_on_the_same_layer_and_class(densenet_and_input, ours, monai_name, minimum, layer):
    import monai.visualize

    model, volume = densenet_and_input
    explanation = explain(model, [volume], f"{ours}:{layer}", "class:1")
    mine = explanation.results[0].model_grid_map
    reference_cam = getattr(monai.visualize, monai_name)(model.network, target_layers=layer, postprocessing=lambda t: t)
    x = model.preprocess([volume]).tensor
    reference = reference_cam(x, class_idx=1)[0, 0].detach()
    assert mine.shape == reference.shape
    assert float(reference.std()) > 0  # a real map, not a constant
    assert correlation(mine, reference) >= minimum


def test_combine_functions_on_hand_computed_activations():
    activations = torch.zeros(1, 2, 2, 1, 1)
    activations[0, 0, :, 0, 0] = torch.tensor([1.0, 3.0])
    activations[0, 1, :, 0, 0] = torch.tensor([2.0, 0.0])
    gradients = torch.zeros_like(activations)
    gradients[0, 0, :, 0, 0] = torch.tensor([1.0, 1.0])
    gradients[0, 1, :, 0, 0] = torch.tensor([-2.0, 0.0])
    # Grad-CAM: w = (1, -1); map = relu(1·A0 - 1·A1) = relu([-1, 3]) = [0, 3]
    assert gradcam(activations, gradients).flatten().tolist() == [0.0, 3.0]
    # HiResCAM: relu(G0·A0 + G1·A1) = relu([1 - 4, 3]) = [0, 3]
    assert hirescam(activations, gradients).flatten().tolist() == [0.0, 3.0]
    # Grad-CAM++: channel 0: α = 1/(2 + 4) at both voxels, w0 = 2/6; channel 1: relu(G) = 0 → w1 = 0
    np.testing.assert_allclose(gradcam_plus_plus(activations, gradients).flatten().numpy(), [1 / 3, 1.0], rtol=1e-6)


def test_default_layer_is_last_feature_map_before_pooling_for_classifier(densenet_and_input):
    model, _ = densenet_and_input
    assert default_layer(model) == "class_layers.relu"
    names = [layer.name for layer in candidate_layers(model)]
    assert "features.denseblock4" in names and "class_layers.out" not in names


def test_default_layer_for_segmenter_is_below_full_resolution(unet_spec):
    model = load_model(unet_spec, device="cpu")
    x = torch.zeros(1, 1, 32, 32, 32)
    chosen = {layer.name: layer for layer in candidate_layers(model, x)}[default_layer(model, x)]
    assert all(s < 32 for s in chosen.spatial_shape)


def test_unknown_layer_names_close_matches(densenet_and_input):
    model, volume = densenet_and_input
    with pytest.raises(ModelError, match="close matches: features.denseblock4"):
        explain(model, [volume], "gradcam:features.denseblok4", "class:1")


class InputGradient(Method):
    """Test-only method: the plain gradient of the target with respect to the input (linear in the target)."""

    name = "input-gradient"
    label = "input gradient"
    signed = True

    def attribute(self, model, x, target, progress=None, context=None):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(target(model.forward(x)).sum(), x)
        return Attribution(grad[0, 0], True, {})


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_window_by_window_gradient_equals_gradient_through_monai_sliding_window_inference(tmp_path, mode):
    from monai.inferers import sliding_window_inference

    spec = save_spec_model(tmp_path / "sw", SMALL_UNET, task="segmentation", class_names=["background", "tumour"],
                           sliding_window={"roi_size": [16, 16, 16], "overlap": 0.25, "mode": mode})
    model = load_model(spec, device="cpu")
    torch.manual_seed(0)
    shape = (36, 20, 12)  # larger than the window along two axes, smaller along one (padding)
    volume = Volume(torch.rand(shape).numpy(), Geometry(shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    model_input = model.preprocess([volume])
    target = resolve_target("channel:1@box:-30,-15,2,-5,-5,8", model, model_input, predict(model, model_input.tensor))
    windowed = attribute(InputGradient(), model, model_input, target).map

    x = model_input.tensor.detach().requires_grad_(True)
    with torch.enable_grad():
        output = sliding_window_inference(x, (16, 16, 16), 1, model.network, overlap=0.25, mode=mode)
        (reference,) = torch.autograd.grad(target(output).sum(), x)
    assert float(reference.abs().max()) > 0
    torch.testing.assert_close(windowed, reference[0, 0], rtol=1e-4, atol=1e-6 * float(reference.abs().max()))


def test_windows_outside_the_target_region_are_skipped(tmp_path):
    spec = save_spec_model(tmp_path / "sw", SMALL_UNET, task="segmentation", class_names=["background", "tumour"],
                           sliding_window={"roi_size": [16, 16, 16], "overlap": 0.0})
    model = load_model(spec, device="cpu")
    shape = (48, 16, 16)  # three windows along i
    volume = Volume(np.random.default_rng(0).random(shape, dtype=np.float32), Geometry(shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    explanation = explain(model, [volume], "gradcam", "channel:1@point:-4,-8,8,2")  # i = 4: first window only
    result = explanation.results[0]
    assert result.parameters["windows"] == {"used": 1, "total": 3, "roi_size": [16, 16, 16]}
    assert result.passes == {"forward": 1, "backward": 1}


def test_cam_on_torchscript_is_refused_with_what_to_use_instead(tmp_path, densenet_and_input):
    model, volume = densenet_and_input
    scripted = torch.jit.trace(model.network, torch.zeros(1, 1, 64, 64, 64))
    path = tmp_path / "model.ts"
    scripted.save(str(path))
    black_box = load_model(path, device="cpu")
    assert black_box.task == "classification" and not black_box.internals_available
    with pytest.raises(ModelError, match="needs the network's internal layers.*gxi, ig, occlusion"):
        explain(black_box, [volume], "gradcam", "class:1")


def test_method_spec_errors_name_the_method():
    from xaioverlay.errors import InputError

    with pytest.raises(InputError, match="unknown method 'gradcan'; did you mean gradcam"):
        build_method("gradcan")
