"""Occlusion and LRP run in full float32 (no TF32) whatever the user allowed, and give the user's settings back.

The CPU tests read the flags from inside the network while a method runs (PyTorch keeps them on a CPU build too);
the CUDA test, skipped with its reason where PyTorch sees no CUDA GPU, compares an LRP map computed on the GPU with
TF32 allowed against the CPU's (``test_occlusion_cuda.py`` checks exact occlusion with TF32 allowed).
"""

from __future__ import annotations

import pytest
import torch

from support import save_spec_model
from test_occlusion_exact import BN_UNET, grid_volume, occluder, randomise_batchnorm, relative_difference
from xaioverlay.explain import explain
from xaioverlay.methods.gradients import GradientTimesInput
from xaioverlay.methods.lrp import LRP
from xaioverlay.methods.occlusion import Occlusion
from xaioverlay.methods.occlusion.adaptive import AdaptiveOcclusion
from xaioverlay.methods.precision import float32_settings, full_float32
from xaioverlay.models import load_model
from xaioverlay.progress import Progress

USER = (True, True, "high")  # what a user may have chosen for speed
FULL = (False, False, "highest")


@pytest.fixture
def user_allows_tf32():
    before = float32_settings()
    torch.set_float32_matmul_precision(USER[2])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = USER[:2]
    yield
    torch.set_float32_matmul_precision(before[2])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]


def load(folder, device="cpu", sliding_window=None):
    spec = save_spec_model(folder, BN_UNET, task="segmentation", class_names=["background", "tumour"],
                           sliding_window=sliding_window)
    model = load_model(spec, device=device)
    randomise_batchnorm(model.network)
    return model


def test_full_float32_restores_the_users_settings_also_on_error(user_allows_tf32):
    with pytest.raises(KeyError):
        with full_float32():
            assert float32_settings() == FULL
            raise KeyError("interrupted")
    assert float32_settings() == USER


@pytest.mark.parametrize("method", [Occlusion(occluder(6, 6)), AdaptiveOcclusion(40, occluder(4, 4)),
                                    LRP("epsilon-gamma-box")], ids=lambda m: m.spec)
def test_occlusion_and_lrp_compute_without_tf32_and_give_the_users_settings_back(tmp_path, user_allows_tf32, method):
    model = load(tmp_path)
    seen: dict[str, list] = {"inference": []}
    running = ["inference"]

    def started(event):  # the engine announces each method before running it
        if event.get("stage") == "method":
            running.append(event["method"])
            seen[event["method"]] = []

    hooks = [m.register_forward_hook(lambda *_: seen[running[-1]].append(float32_settings()))
             for m in model.network.modules() if isinstance(m, torch.nn.Conv3d)]
    try:
        explain(model, [grid_volume((16, 16, 16), seed=1)], [GradientTimesInput(), method],
                "channel:1@box:-2,-2,2,-12,-12,12", progress=Progress(started))
    finally:
        for hook in hooks:
            hook.remove()
    assert set(seen["gxi"]) == {USER}  # the hooks do see the user's settings where nothing changes them
    assert seen[method.spec] and set(seen[method.spec]) == {FULL}
    assert float32_settings() == USER


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_lrp_with_tf32_allowed_equals_the_cpu_map(tmp_path, user_allows_tf32):
    volume = grid_volume((24, 24, 24), seed=5)
    target = "channel:1@box:-4,-4,4,-20,-20,20"
    maps = [explain(load(tmp_path / device, device), [volume], [LRP("epsilon-gamma-box")], target).results[0]
            for device in ("cpu", "cuda")]
    assert relative_difference(maps[1].model_grid_map, maps[0].model_grid_map) <= 1e-4
    assert float32_settings() == USER
