"""Occlusion on a CUDA GPU: the vectorised engine is exact, mixed precision agrees, out of memory halves the batch.

Skipped (with the reason shown by ``pytest -ra``) where PyTorch sees no CUDA GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support import save_spec_model
from test_occlusion_exact import BN_UNET, RESNET, grid_volume, occluder, randomise_batchnorm, relative_difference
from xaioverlay.explain import explain
from xaioverlay.methods.occlusion import BRUTE_FORCE, Occlusion
from xaioverlay.models import load_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def tf32_allowed():
    """TF32 allowed, as a user may have it (cuDNN's default): occlusion turns it off itself while it runs
    (TF32 rounds differently in a box and in a whole volume), so the exactness checks hold anyway."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def load(folder, network, task, sliding_window=None, amp=False):
    spec = save_spec_model(folder, network, task=task, class_names=["a", "b"], sliding_window=sliding_window)
    model = load_model(spec, device="cuda", amp=amp)
    randomise_batchnorm(model.network)
    return model


def test_cuda_engine_equals_brute_force_on_a_sliding_window_segmenter(tmp_path):
    model = load(tmp_path, BN_UNET, "segmentation", {"roi_size": [24, 24, 24], "overlap": 0.25, "mode": "gaussian"})
    volume = grid_volume((24, 40, 24), seed=1)
    target = "channel:1@box:-8,-14,8,-14,-24,14"
    brute, fast = explain(model, [volume], [Occlusion(occluder(6, 3), BRUTE_FORCE), Occlusion(occluder(6, 3))], target).results
    assert fast.extras["engine"] == "incremental" and fast.extras["windows"]["used"] <= 2
    assert relative_difference(fast.model_grid_map, brute.model_grid_map) <= 1e-4


def test_cuda_engine_equals_brute_force_on_a_classifier(tmp_path):
    model = load(tmp_path, RESNET, "classification")
    volume = grid_volume((32, 40, 32), seed=2)
    brute, fast = explain(model, [volume], [Occlusion(occluder(8, 4), BRUTE_FORCE), Occlusion(occluder(8, 4))], "class:1").results
    assert relative_difference(fast.model_grid_map, brute.model_grid_map) <= 1e-4


def test_mixed_precision_map_agrees_with_float32(tmp_path):
    volume = grid_volume((32, 40, 32), seed=3)
    full = explain(load(tmp_path / "f", RESNET, "classification"), [volume], [Occlusion(occluder(8, 4))], "class:1").results[0]
    half = explain(load(tmp_path / "h", RESNET, "classification", amp=True), [volume], [Occlusion(occluder(8, 4))], "class:1").results[0]
    a, b = half.model_grid_map.flatten().double().numpy(), full.model_grid_map.flatten().double().numpy()
    assert np.corrcoef(a, b)[0, 1] >= 0.99


def test_out_of_memory_halves_the_batch_and_gives_the_same_map(tmp_path):
    model = load(tmp_path, RESNET, "classification")
    volume = grid_volume((64, 64, 64), seed=4)
    reference = explain(model, [volume], [Occlusion(occluder(16, 8), BRUTE_FORCE, batch_size=8)], "class:1").results[0]
    torch.cuda.empty_cache()
    allowed = torch.cuda.memory_allocated() + 2**30  # 1 GiB more than now: 343 whole volumes and activations do not fit
    torch.cuda.set_per_process_memory_fraction(allowed / torch.cuda.get_device_properties(0).total_memory)
    try:
        squeezed = explain(model, [volume], [Occlusion(occluder(16, 8), BRUTE_FORCE, batch_size=343)], "class:1").results[0]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert squeezed.extras["batch_size"] < 343
    assert relative_difference(squeezed.model_grid_map, reference.model_grid_map) <= 1e-5
