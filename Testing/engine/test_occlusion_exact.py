"""Exact occlusion: equal to Captum's Occlusion, and every speed-up equal to brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import Occlusion as CaptumOcclusion

from support import SMALL_DENSENET, blob_volume, save_spec_model
from xaioverlay.explain import explain
from xaioverlay.methods.occlusion import BRUTE_FORCE, Occlusion, Speedups
from xaioverlay.methods import boxes as box_ops
from xaioverlay.methods.occlusion.fill import fill_values
from xaioverlay.methods.occlusion.options import Lengths, OccluderOptions
from xaioverlay.models import load_model
from xaioverlay.prediction import predict
from xaioverlay.targets import resolve_target
from xaioverlay.volumes import Geometry

BN_UNET = {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
                                    "strides": [2, 2], "num_res_units": 1, "norm": "batch"}}
RESNET = {"name": "ResNet", "args": {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 8, 16],
                                     "spatial_dims": 3, "n_input_channels": 1, "num_classes": 2, "conv1_t_size": 7,
                                     "conv1_t_stride": 2, "no_max_pool": True}}


def occluder(size, stride, fill="zero") -> OccluderOptions:
    return OccluderOptions(Lengths((float(size),) * 3), Lengths((float(stride),) * 3), fill)


def randomise_batchnorm(network: torch.nn.Module, seed: int = 1) -> None:
    """Trained-looking BatchNorm statistics (fresh ones are the identity and hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


def load(folder, network, task, classes, sliding_window=None):
    model = load_model(save_spec_model(folder, network, task=task, class_names=classes, sliding_window=sliding_window), device="cpu")
    randomise_batchnorm(model.network)
    return model


def grid_volume(size, seed=0, centre=(0.0, 0.0, 0.0), radius=4.0):
    geometry = Geometry(tuple(size), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    centre_ras = geometry.ijk_to_ras_points(np.array([[s / 2 + c for s, c in zip(size, centre)]]))[0]
    return blob_volume(geometry, centre_ras, radius, value=2.0, noise=0.3, seed=seed)


def model_grid_map(model, volume, method, target=None):
    return explain(model, [volume], [method], target).results[0].model_grid_map


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.max() - b.min()))


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return load(tmp_path_factory.mktemp("resnet"), RESNET, "classification", ["no tumour", "tumour"])


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return load(tmp_path_factory.mktemp("unet"), BN_UNET, "segmentation", ["background", "tumour"])


@pytest.fixture(scope="module")
def windowed_segmenter(tmp_path_factory):
    return load(tmp_path_factory.mktemp("unet_sw"), BN_UNET, "segmentation", ["background", "tumour"],
                sliding_window={"roi_size": [12, 12, 12], "overlap": 0.25, "mode": "gaussian"})


@pytest.mark.parametrize("fill", ["zero", "mean", "blur"])
def test_classifier_map_equals_captum_occlusion(classifier, fill):
    stride = 2 if fill == "zero" else 4  # overlapping occluders once; the fills need fewer
    volume = grid_volume((16, 20, 16))
    ours = model_grid_map(classifier, volume, Occlusion(occluder(4, stride, fill)), "class:1")
    x = classifier.preprocess([volume]).tensor
    baseline = fill_values(x, fill, (4, 4, 4))
    with torch.no_grad():
        theirs = CaptumOcclusion(classifier.network).attribute(
            x, sliding_window_shapes=(1, 4, 4, 4), strides=(1,) + (stride,) * 3, baselines=baseline, target=1,
            perturbations_per_eval=32,
        )[0, 0]
    assert correlation(ours, theirs) >= 0.999
    assert relative_difference(ours, theirs) <= 1e-4


def test_segmentation_target_equals_captum_on_the_target_wrapped_to_a_scalar(segmenter):
    volume = grid_volume((16, 20, 16))
    target_spec = "channel:1@box:-6,-8,6,-10,-12,10"
    ours = model_grid_map(segmenter, volume, Occlusion(occluder(4, 2)), target_spec)
    model_input = segmenter.preprocess([volume])
    x = model_input.tensor
    target = resolve_target(target_spec, segmenter, model_input, predict(segmenter, x))
    with torch.no_grad():
        theirs = CaptumOcclusion(lambda batch: target(segmenter.network(batch))).attribute(
            x, sliding_window_shapes=(1, 4, 4, 4), strides=(1, 2, 2, 2), baselines=0.0, perturbations_per_eval=32
        )[0, 0]
    assert correlation(ours, theirs) >= 0.999
    assert relative_difference(ours, theirs) <= 1e-4
    # the target region's box sits in the middle: occluders far from it are skipped, their drop is 0
    assert float(theirs.abs().max()) > 0


SPEEDUPS = {
    "skip only": Speedups(skip=True, crop=False, incremental=False, reuse_windows=False),
    "window reuse and skip": Speedups(skip=True, crop=False, incremental=False, reuse_windows=True),
    "crop only": Speedups(skip=False, crop=True, incremental=False, reuse_windows=False),
    "incremental only": Speedups(skip=False, crop=False, incremental=True, reuse_windows=False),
    "window reuse only": Speedups(skip=False, crop=False, incremental=False, reuse_windows=True),
    "all": Speedups(),
}


@pytest.mark.parametrize("name", ["window reuse only", "window reuse and skip", "all"])
def test_each_speedup_equals_brute_force_on_a_sliding_window_segmenter(windowed_segmenter, name):
    """Brute force runs every occluded volume through MONAI's sliding_window_inference."""
    volume = grid_volume((12, 20, 12), centre=(0, 2, 0))
    target = "channel:1@box:-4,-8,4,-7,-12,7"
    brute = explain(windowed_segmenter, [volume], [Occlusion(occluder(4, 4), BRUTE_FORCE)], target).results[0]
    fast = explain(windowed_segmenter, [volume], [Occlusion(occluder(4, 4), SPEEDUPS[name])], target).results[0]
    assert relative_difference(fast.model_grid_map, brute.model_grid_map) <= 1e-4
    assert brute.extras["windows"] == {"used": 1, "total": 2}  # brute force: the whole inferer, both windows
    assert fast.extras["window_passes_reused"] > 0  # boxes outside a window leave its output as it was
    assert fast.passes["forward"] < brute.passes["forward"]


def test_probability_of_blended_windows_is_scored_exactly(windowed_segmenter):
    """softmax(blend of window logits) does not split into window shares: scored on the whole volume."""
    volume = grid_volume((12, 20, 12), seed=8)
    target = "channel:1@box:-4,-8,4,-7,-12,7"
    brute, fast = (explain(windowed_segmenter, [volume], [Occlusion(occluder(4, 4), speedups)], target, score="probability").results[0]
                   for speedups in (BRUTE_FORCE, Speedups()))
    assert "probability" in fast.extras["slower_because"]
    assert relative_difference(fast.model_grid_map, brute.model_grid_map) <= 1e-4


@pytest.mark.parametrize("name", ["skip only", "crop only", "incremental only", "all"])
def test_each_speedup_equals_brute_force_on_a_whole_volume_segmenter(segmenter, name):
    volume = grid_volume((20, 20, 20), seed=3)
    target = "channel:1@point:-4,-3,3,2"
    brute = model_grid_map(segmenter, volume, Occlusion(occluder(4, 4), BRUTE_FORCE), target)
    fast = explain(segmenter, [volume], [Occlusion(occluder(4, 4), SPEEDUPS[name])], target).results[0]
    assert relative_difference(fast.model_grid_map, brute) <= 1e-4
    if SPEEDUPS[name].skip:  # the far corner is out of the receptive field of a point near the other
        assert fast.extras["skipped_unreachable"] > 0


def test_incremental_classifier_equals_brute_force_on_a_densenet(tmp_path):
    """DenseNet: max and average pooling, concatenation, global pooling and a linear head."""
    model = load(tmp_path, SMALL_DENSENET, "classification", ["a", "b"])
    volume = grid_volume((32, 32, 32), seed=5)
    brute = model_grid_map(model, volume, Occlusion(occluder(12, 10), BRUTE_FORCE), "class:0")
    fast = explain(model, [volume], [Occlusion(occluder(12, 10))], "class:0").results[0]
    assert fast.extras["engine"] == "incremental"
    assert relative_difference(fast.model_grid_map, brute) <= 1e-4


def test_layers_run_whole_keep_instance_norm_networks_exact(tmp_path):
    """Instance normalisation reads the whole volume: no voxel is out of an occluder's reach."""
    unet = {**BN_UNET, "args": {**BN_UNET["args"], "norm": "instance"}}
    model = load(tmp_path, unet, "segmentation", ["background", "tumour"])
    volume = grid_volume((16, 16, 16), seed=2)
    target = "channel:1@point:-8,-8,8,2"
    brute = model_grid_map(model, volume, Occlusion(occluder(4, 4), BRUTE_FORCE), target)
    fast = explain(model, [volume], [Occlusion(occluder(4, 4))], target).results[0]
    assert fast.extras["skipped_unreachable"] == 0
    assert relative_difference(fast.model_grid_map, brute) <= 1e-4


def test_a_graph_the_tracer_gets_wrong_is_not_trusted(tmp_path):
    """torch.fx bakes BasicUNet's ``if x_e is not None`` into its graph: the replay is checked against
    the network's own output and whole forward passes are used instead."""
    basic = {"name": "BasicUNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                                           "features": [2, 4, 4, 8, 8, 2], "norm": "batch"}}
    model = load(tmp_path, basic, "segmentation", ["background", "tumour"])
    volume = grid_volume((16, 16, 16), seed=9)
    target = "channel:1@point:-8,-8,8,2"
    brute = model_grid_map(model, volume, Occlusion(occluder(8, 4), BRUTE_FORCE), target)
    fast = explain(model, [volume], [Occlusion(occluder(8, 4))], target).results[0]
    assert fast.extras["engine"] == "forward" and "slower_because" in fast.extras
    assert relative_difference(fast.model_grid_map, brute) <= 1e-4


class TracedPathDiffers(torch.nn.Module):
    """Python control flow the tracer records one way and the network runs another."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y if isinstance(x, torch.fx.Proxy) else 2 * y


def test_a_graph_that_silently_differs_from_the_network_is_caught():
    from xaioverlay.models.base import LoadedModel

    model = LoadedModel(network=TracedPathDiffers(), device=torch.device("cpu"), task="segmentation",
                        class_names=["background", "tumour"], in_channels=1)
    volume = grid_volume((12, 12, 12), seed=10)
    target = "channel:1@point:-6,-6,6,2"
    brute = model_grid_map(model, volume, Occlusion(occluder(4, 4), BRUTE_FORCE), target)
    result = explain(model, [volume], [Occlusion(occluder(4, 4))], target).results[0]
    assert result.extras["engine"] == "forward"
    assert "does not reproduce" in result.extras["slower_because"]
    assert relative_difference(result.model_grid_map, brute) <= 1e-4


def test_vectorised_box_reads_used_on_cuda_agree_on_cpu(segmenter, monkeypatch):
    volume = grid_volume((16, 20, 16), seed=4)
    target = "channel:1@point:-8,-10,8,3"
    per_item = model_grid_map(segmenter, volume, Occlusion(occluder(5, 3)), target)
    monkeypatch.setattr(box_ops, "VECTORISED_ON_CPU", True)
    vectorised = model_grid_map(segmenter, volume, Occlusion(occluder(5, 3)), target)
    assert relative_difference(vectorised, per_item) <= 1e-5


def test_torchscript_model_is_occluded_with_whole_forward_passes(tmp_path, classifier):
    scripted = torch.jit.script(classifier.network)
    path = tmp_path / "model.ts"
    scripted.save(str(path))
    model = load_model(path, device="cpu")
    volume = grid_volume((16, 20, 16), seed=6)
    result = explain(model, [volume], [Occlusion(occluder(8, 4))], "class:1").results[0]
    reference = model_grid_map(classifier, volume, Occlusion(occluder(8, 4), BRUTE_FORCE), "class:1")
    assert result.extras["engine"] == "forward"
    assert relative_difference(result.model_grid_map, reference) <= 1e-4


def test_lesion_is_where_occlusion_drops_the_segmentation_score_most(segmenter):
    """Occluding the voxels a region's own output depends on most must lower it: the map's peak lies
    within the receptive field of the target point, with a positive drop."""
    volume = grid_volume((20, 20, 20), seed=7)
    result = explain(segmenter, [volume], [Occlusion(occluder(4, 2))], "channel:1@point:-10,-10,10,0").results[0]
    values = result.model_grid_map
    peak = np.unravel_index(int(values.argmax()), values.shape)
    assert float(values.max()) > 0
    assert np.abs(np.array(peak) - 10).max() <= 6


def test_out_of_memory_halves_the_batch_and_keeps_the_map(tmp_path):
    """A real allocation failure (address space capped 80 MiB above the current use) in a child process."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = save_spec_model(tmp_path / "model", RESNET, task="classification", class_names=["a", "b"])
    script = textwrap.dedent(f"""
        import os, resource, sys
        sys.path[:0] = [{str(root / "XAIOverlay")!r}, {str(root / "Testing")!r}, {str(root / "Testing" / "engine")!r}]
        import torch
        torch.set_num_threads(1)
        from test_occlusion_exact import BRUTE_FORCE, Occlusion, explain, grid_volume, occluder, load_model
        model = load_model({str(spec)!r}, device="cpu")
        volume = grid_volume((64, 64, 64))
        reference = explain(model, [volume], [Occlusion(occluder(16, 16), BRUTE_FORCE, batch_size=4)], "class:1").results[0]
        with open("/proc/self/status") as status:
            used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (used + 80 * 2**20, resource.RLIM_INFINITY))
        squeezed = explain(model, [volume], [Occlusion(occluder(16, 16), BRUTE_FORCE, batch_size=64)], "class:1").results[0]
        print(squeezed.extras["batch_size"], float((squeezed.model_grid_map - reference.model_grid_map).abs().max()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    batch, difference = done.stdout.split()
    assert int(batch) < 64 and float(difference) <= 1e-6  # halved, and the same map (up to summation order)
