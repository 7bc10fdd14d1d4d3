"""Memory that does not grow with the whole output: a segmenter's decision is built window by window,
no tensor holding every channel at every voxel is ever made, and an out-of-memory ends in one line."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from torch.utils._python_dispatch import TorchDispatchMode

from support import save_spec_model
from xaioverlay.errors import ModelError
from xaioverlay.explain import explain
from xaioverlay.methods.occlusion import Occlusion
from xaioverlay.methods import masking
from xaioverlay.methods.occlusion.options import Lengths, OccluderOptions
from xaioverlay.models import load_model
from xaioverlay.volumes import Geometry, Volume
from xaioverlay.worker import ModelCache, Worker

CHANNELS = 7
UNET = {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": CHANNELS,
                                 "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}}
SHAPE = (40, 36, 12)  # larger than the 16³ window along two axes, smaller along one (padded)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any PyTorch operation produced (numel), and its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.numel() > self.numel:
                self.numel, self.shape = value.numel(), tuple(value.shape)
        return out


@pytest.fixture(params=["constant", "gaussian"])
def windowed(tmp_path, request):
    spec = save_spec_model(tmp_path / "sw", UNET, task="segmentation", class_names=[f"c{i}" for i in range(CHANNELS)],
                           sliding_window={"roi_size": [16, 16, 16], "overlap": 0.25, "mode": request.param}, seed=3)
    model = load_model(spec, device="cpu")
    rng = np.random.default_rng(0)
    volume = Volume(rng.random(SHAPE, dtype=np.float32), Geometry(SHAPE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    return model, volume


def monai_output(model, x: torch.Tensor) -> torch.Tensor:
    window = model.sliding_window
    with torch.no_grad():
        return sliding_window_inference(x, window.roi_size, 1, model.network, overlap=window.overlap, mode=window.mode,
                                        sigma_scale=window.sigma_scale)


def test_label_map_is_built_window_by_window_and_equals_monai_argmax(windowed):
    from xaioverlay.prediction import predict

    model, volume = windowed
    x = model.preprocess([volume]).tensor
    full = monai_output(model, x)
    assert torch.equal(model.infer(x), full)  # the blocks put together are MONAI's output, bit for bit

    with LargestTensor() as largest:
        prediction = predict(model, x, channel=2)
    whole_output = CHANNELS * x[0, 0].numel()
    assert largest.numel < whole_output / 2, f"a tensor of shape {largest.shape} holds (half) the whole output"
    assert prediction.labels.dtype == torch.uint8
    assert torch.equal(prediction.labels.long(), full[0].argmax(0))
    assert prediction.counts.tolist() == torch.bincount(full[0].argmax(0).flatten(), minlength=CHANNELS).tolist()
    assert torch.equal(prediction.scores, full[0, 2]) and torch.equal(prediction.region, full[0].argmax(0) == 2)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # no mode leaks out of the blocks


def test_explain_never_holds_the_whole_output_and_keeps_the_label_map(windowed, monkeypatch):
    model, volume = windowed
    x = model.preprocess([volume]).tensor
    full = monai_output(model, x)

    def whole_output(*args, **kwargs):
        raise AssertionError("the whole multi-channel output was asked for")

    monkeypatch.setattr(model, "infer", whole_output)  # the one function that puts the whole output together
    explanation = explain(model, [volume], ["gxi"], "channel:c3")
    assert torch.equal(explanation.labels.long(), full[0].argmax(0))
    region = full[0].argmax(0) == 3
    assert explanation.target["voxels"] == int(region.sum())
    assert explanation.target["value"] == pytest.approx(float(full[0, 3][region].sum()), rel=1e-5)
    counts = torch.bincount(full[0].argmax(0).flatten(), minlength=CHANNELS).tolist()
    assert list(explanation.output["predicted_voxels"].values()) == counts


def test_sigmoid_decisions_keep_every_channel_as_a_class():
    from xaioverlay.prediction import block_decisions

    block = torch.full((1, 3, 2, 1, 1), -5.0)
    block[0, 0, 0] = block[0, 2, 0] = 5.0  # voxel 0: channels 0 and 2 on → label 3 (highest on, plus one)
    labels, decisions = block_decisions(block, "sigmoid")
    assert labels.flatten().tolist() == [3, 0]
    assert decisions[:, 0].flatten().tolist() == [True, False, True]
    softmax_labels, _ = block_decisions(block, "softmax")
    assert softmax_labels.flatten().tolist() == [0, 0]


def test_exact_occlusion_holds_one_windows_clean_pass_at_a_time(windowed, monkeypatch):
    model, volume = windowed
    alive: list = []  # weak references to the output of every clean pass made
    held: list[int] = []

    class TrackedRun(masking.IncrementalRun):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            alive.append(weakref.ref(self.output))

    scores = masking.IncrementalScorer.scores

    def tracked_scores(self, *args):
        held.append(sum(ref() is not None for ref in alive))
        return scores(self, *args)

    monkeypatch.setattr(masking, "IncrementalRun", TrackedRun)
    monkeypatch.setattr(masking.IncrementalScorer, "scores", tracked_scores)
    # a box target spanning several windows
    explanation = explain(model, [volume], [Occlusion(OccluderOptions(Lengths((4.0,) * 3), Lengths((4.0,) * 3)))],
                          "channel:1@box:-2,-2,1,-30,-30,10")
    used = explanation.results[0].extras["windows"]["used"]
    assert explanation.results[0].extras["engine"] == "incremental"
    assert used > 2 and held
    assert max(held) == 1, f"clean passes of {max(held)} windows held at once ({used} windows)"


def test_out_of_memory_ends_in_one_line_saying_how_much_is_needed(windowed, monkeypatch):
    model, volume = windowed
    calls = {"n": 0}
    forward = model.forward

    def starving(x):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                               "you tried to allocate 20293720064 bytes.")
        return forward(x)

    monkeypatch.setattr(model, "forward", starving)
    with pytest.raises(ModelError) as caught:
        explain(model, [volume], ["gxi"], "channel:1")
    message = str(caught.value)
    assert "\n" not in message and "out of memory" in message
    assert "18.9 GB failed" in message and "to need less" in message


def test_segmentation_shown_comes_from_the_explanations_own_inference(windowed, tmp_path, monkeypatch):
    model, volume = windowed
    from xaioverlay.volumes import read_volume, write_volume

    path = write_volume(volume, tmp_path / "in.nrrd")
    calls = {"preprocess": 0, "network": 0}
    preprocess = model.preprocess

    def counted(volumes):
        calls["preprocess"] += 1
        return preprocess(volumes)

    monkeypatch.setattr(model, "preprocess", counted)
    model.network.register_forward_hook(lambda *_: calls.__setitem__("network", calls["network"] + 1))
    events: list[dict] = []
    worker = Worker(events.append, ModelCache(loader=lambda *a, **k: model))
    worker.handle({"id": "r", "command": "explain", "model": "m", "inputs": [str(path)], "methods": ["gxi"],
                   "target": "channel:1@box:-2,-2,1,-10,-10,10", "out": str(tmp_path / "out"), "segmentation": True},
                  threading.Event())
    assert events[-1]["event"] == "result", events[-1]
    method_passes = events[-1]["explanation"]["methods"][0]["passes"]["forward"]
    windows = len(__import__("xaioverlay.sliding", fromlist=["x"]).window_slices((40, 36, 16), (16, 16, 16), 0.25))
    assert calls["preprocess"] == 1
    assert calls["network"] == windows + method_passes  # one inference (every window once), then the method's
    labels = read_volume(events[-1]["segmentation"])
    full = monai_output(model, preprocess([volume]).tensor)
    assert np.array_equal(labels.array, full[0].argmax(0).numpy().astype(np.uint8))
