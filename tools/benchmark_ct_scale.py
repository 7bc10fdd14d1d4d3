"""Explaining a CT-sized volume: time and memory of every method against the model's own inference.

    python tools/benchmark_ct_scale.py                          # both models, every method, CPU
    python tools/benchmark_ct_scale.py --device cuda --amp      # on a GPU, mixed precision
    python tools/benchmark_ct_scale.py --quick                  # a small volume and window (smoke run)

It builds, deterministically and without any download, a CT-like volume of 512 × 512 × 300 voxels at
0.8 × 0.8 × 1.5 mm (body, lungs, spine, a 15 mm lesion) and two segmenter specs as a user would
write them: a MONAI UNet (channels 16…256, strides 2, two residual units per level, BatchNorm;
preprocessing Orientationd RAS + Spacingd 1.5 mm + an HU window; sliding window 96³, overlap 0.25),
one with 2 output channels (a lesion model) and one with 105 (a whole-body organ model). Weights are
random but seeded; the last layer's biases are set so that every channel is predicted somewhere.

Per model it measures, each item in a fresh process (so every peak is that item's own):

- ``inference``: the model's own sliding-window inference of the preprocessed volume (label map);
- ``fwd+bwd all``: one forward+backward of every sliding window (gradient of the target's share);
- ``fwd+bwd <target>``: the same over the windows the target touches (what a gradient method needs);
- every method (``explain`` end to end: preprocessing, inference, target, map on the input grid) for
  a 10 mm ball at the lesion (``channel:1@point:R,A,S,10``) and, for the gradient methods, for the
  whole predicted region (``channel:C``) of the foreground channel C predicted most (seeded random weights
  may predict channel 1 nowhere).

Printed per row: the item's own time (for methods: the method's time, as ``explanation.json``
records it), its ratio to ``inference``, to ``fwd+bwd all`` and to the forward+backward over the
windows its target touches, peak resident memory of the process (and peak allocated GPU memory on
CUDA), forward/backward passes and windows touched.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "XAIOverlay")]
# OpenMP threads that spin while they wait starve each other on a shared CPU (see Testing/conftest.py);
# set before torch starts its thread pool (spawned item processes inherit it); a value given wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

LESION_RADIUS_MM = 15.0
BALL_RADIUS_MM = 10.0
GRADIENT_METHODS = ("gradcam", "gxi", "lrp")
#: Method specs: IG with 16 steps (each a forward+backward of every touched window); occlusion with
#: 30 mm boxes every 30 mm, evaluated only in the windows that hold the target and only where they can
#: reach it (the engine skips the rest).
METHODS = {"gradcam": "gradcam", "gxi": "gxi", "lrp": "lrp", "ig": "ig:16", "occlusion": "occlusion:30mm/30mm"}


@dataclass(frozen=True)
class Setup:
    """What to build: the volume's size and spacing, the window, the network's channels."""

    size: tuple[int, int, int] = (512, 512, 300)
    spacing: tuple[float, float, float] = (0.8, 0.8, 1.5)
    roi: int = 96
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)


FULL = Setup()
QUICK = Setup(size=(128, 128, 64), roi=32, channels=(4, 8, 16, 32, 64))


# --- data --------------------------------------------------------------------------------------------
def ct_volume(setup: Setup):
    """A deterministic CT-like volume (HU, float32) and the lesion centre (RAS mm).

    An elliptic body of soft tissue (40 HU) in air, two lungs (−800 HU), a spine (400 HU), seeded noise
    (σ 15 HU) and a spherical lesion (90 HU, radius 15 mm) in the right upper abdomen. Built slice by
    slice so that memory stays one volume."""
    import numpy as np

    from xaioverlay.volumes import Geometry, Volume

    size, spacing = setup.size, setup.spacing
    extent = [n * s for n, s in zip(size, spacing)]
    geometry = Geometry(size, spacing, tuple(-e / 2 for e in extent[:2]) + (-extent[2] / 2,))
    array = np.empty(size, np.float32)
    rng = np.random.default_rng(0)
    # LPS voxel centres: L = origin + i·s (RAS R = −L), P likewise, S = origin + k·s
    lps_x = (geometry.origin[0] + np.arange(size[0]) * spacing[0])[:, None]
    lps_y = (geometry.origin[1] + np.arange(size[1]) * spacing[1])[None, :]
    half_x, half_y = 0.42 * extent[0], 0.3 * extent[1]
    lesion_lps = np.array([-0.15 * extent[0], 0.05 * extent[1], 0.1 * extent[2]])
    for k in range(size[2]):
        s = geometry.origin[2] + k * spacing[2]
        plane = np.full(size[:2], -1000.0, np.float32)
        body = (lps_x / half_x) ** 2 + (lps_y / half_y) ** 2 <= 1
        plane[body] = 40.0
        if s > 0:  # lungs in the upper half
            for side in (-1, 1):
                lung = (((lps_x - side * 0.2 * extent[0]) / (0.14 * extent[0])) ** 2
                        + (lps_y / (0.2 * extent[1])) ** 2 <= 1)
                plane[lung] = -800.0
        spine = (lps_x / 15.0) ** 2 + ((lps_y - 0.2 * extent[1]) / 15.0) ** 2 <= 1
        plane[spine] = 400.0
        lesion = ((lps_x - lesion_lps[0]) ** 2 + (lps_y - lesion_lps[1]) ** 2 + (s - lesion_lps[2]) ** 2
                  <= LESION_RADIUS_MM**2)
        plane[lesion] = 90.0
        plane += rng.standard_normal(size[:2], dtype=np.float32) * 15.0
        array[:, :, k] = plane
    lesion_ras = (-lesion_lps[0], -lesion_lps[1], lesion_lps[2])
    return Volume(array, geometry, "ct"), tuple(float(v) for v in lesion_ras)


def write_spec(folder: Path, out_channels: int, setup: Setup, seed: int = 0) -> Path:
    """A UNet spec with seeded random weights (BatchNorm statistics randomised too); returns its path."""
    import torch
    import yaml
    from monai.networks.nets import UNet

    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": out_channels, "channels": list(setup.channels),
            "strides": [2] * (len(setup.channels) - 1), "num_res_units": 2, "norm": "batch"}
    torch.manual_seed(seed)
    network = UNet(**args)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    name = f"unet{out_channels}"
    torch.save(network.state_dict(), folder / f"{name}.pt")
    names = ["background"] + [f"class{i}" for i in range(1, out_channels)]
    if out_channels == 2:
        names = ["background", "lesion"]
    spec = {
        "network": {"name": "UNet", "args": args}, "weights": f"{name}.pt", "task": "segmentation",
        "activation": "softmax", "class_names": names,
        "preprocessing": [
            {"name": "Orientationd", "args": {"keys": "image", "axcodes": "RAS"}},
            {"name": "Spacingd", "args": {"keys": "image", "pixdim": [1.5, 1.5, 1.5]}},
            {"name": "ScaleIntensityRanged", "args": {"keys": "image", "a_min": -1000, "a_max": 1000, "b_min": 0.0,
                                                     "b_max": 1.0, "clip": True}},
        ],
        "sliding_window": {"roi_size": [setup.roi] * 3, "overlap": 0.25},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def balance_outputs(spec: Path, volume_path: Path) -> None:
    """Set the last layer's biases so that every channel's mean logit is equal on one window of the
    volume: a random network otherwise predicts one channel almost everywhere."""
    import torch

    from xaioverlay.models import load_model
    from xaioverlay.volumes import read_volume

    model = load_model(spec, device="cpu")
    x = model.preprocess([read_volume(volume_path)]).tensor
    roi = model.sliding_window.roi_size
    start = [max((n - r) // 2, 0) for n, r in zip(x.shape[2:], roi)]
    window = x[(slice(None), slice(None), *(slice(s, s + r) for s, r in zip(start, roi)))]
    with torch.no_grad():
        means = model.network(window).mean((0, 2, 3, 4))
        last = [m for m in model.network.modules() if isinstance(getattr(m, "bias", None), torch.Tensor)
                and m.bias.shape == means.shape][-1]
        last.bias -= means - means.mean()
    weights = spec.parent / f"{spec.stem}.pt"
    torch.save(model.network.state_dict(), weights)


def build(folder: Path, models: list[int], setup: Setup) -> tuple[Path, dict[int, Path], tuple[float, float, float]]:
    from xaioverlay.volumes import write_volume

    volume, lesion = ct_volume(setup)
    volume_path = write_volume(volume, folder / "ct.nii", compress=False)
    del volume
    specs = {}
    for channels in models:
        specs[channels] = write_spec(folder, channels, setup)
        balance_outputs(specs[channels], volume_path)
    return volume_path, specs, lesion


# --- items (each run in a fresh process) ------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident set size (MB)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _region_share(model, x, target):
    """Per window: the target's share (the weights attribute_by_window uses), for those it touches."""
    import torch

    from xaioverlay import sliding

    window = model.sliding_window
    pads = sliding.window_padding(x.shape[2:], window.roi_size)
    weights = sliding.pad(target.weights, pads)
    importance, total, slices = sliding.blend_weights(window, weights.shape, x.device)
    share = torch.where(total > 0, weights / total.clamp_min(1e-12), torch.zeros_like(total))
    return pads, [(part, share[part] * importance) for part in slices if bool((share[part] != 0).any())], len(slices)


def forward_backward(model, x, target, everywhere: bool) -> dict:
    """One forward+backward of the target's share through every window (``everywhere``: of the channel's
    sum over the whole volume) — what one gradient costs, window by window."""
    import torch

    from xaioverlay import sliding

    if everywhere:
        target = target.restricted(torch.ones(x.shape[2:], device=x.device))
    pads, windows, total = _region_share(model, x, target)
    padded = sliding.pad(x, pads)
    for part, weights in windows:
        inputs = padded[(slice(None), slice(None), *part)].detach().requires_grad_(True)
        with torch.enable_grad():
            score = target.restricted(weights)(model.forward(inputs)).sum()
            torch.autograd.grad(score, inputs)
    return {"windows": f"{len(windows)}/{total}"}


def run_item(spec: str, volume_path: str, item: str, target_text: str, device: str, amp: bool) -> dict:
    """In this process: one item's time, passes and peaks (see the module docstring)."""
    import torch

    from xaioverlay.explain import explain
    from xaioverlay.models import load_model
    from xaioverlay.prediction import predict
    from xaioverlay.targets import resolve_target, target_channel
    from xaioverlay.volumes import read_volume

    warnings.filterwarnings("ignore")
    model = load_model(spec, device=device, amp=amp)
    volume = read_volume(volume_path)
    record: dict = {"item": item, "target": target_text}
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    if item.startswith("method:"):
        explanation = explain(model, [volume], [item.split(":", 1)[1]], target_text)
        (result,) = explanation.results
        windows = result.parameters.get("windows") or (result.extras or {}).get("windows") or {}
        record.update(seconds=result.seconds, passes=result.passes,
                      windows=f"{windows.get('used', '-')}/{windows.get('total', '-')}" if windows else "-",
                      target_voxels=explanation.target.get("voxels"))
    else:
        model_input = model.preprocess([volume])
        del volume
        x = model_input.tensor
        model.passes.reset()
        start = time.perf_counter()
        if item == "inference":
            prediction = predict(model, x)
            windowed = model.sliding_window.needed(x.shape[2:])
            shape = [max(n, r) for n, r in zip(x.shape[2:], model.sliding_window.roi_size)]
            from xaioverlay import sliding

            window = model.sliding_window
            count = len(sliding.window_slices(shape, window.roi_size, window.overlap)) if windowed else 1
            record["windows"] = f"{count}/{count}"
            record["predicted_voxels"] = {"channel 1": int(prediction.counts[1]),
                                          "largest": int(prediction.counts[1:].max())}
            record["largest_channel"] = int(prediction.counts[1:].argmax()) + 1
        else:
            prediction = predict(model, x, target_channel(target_text, model))
            target = resolve_target(target_text, model, model_input, prediction)
            del prediction
            model.passes.reset()
            start = time.perf_counter()
            record.update(forward_backward(model, x, target, everywhere=item == "fwd+bwd all"))
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        record.update(seconds=time.perf_counter() - start, passes=model.passes.as_dict())
        record["grid"] = list(x.shape[2:])
    record["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if model.device.type == "cuda":
        record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(model.device) / 2**20, 1)
    return record


def _call(arguments):
    function, *rest = arguments
    return function(*rest)


def run_fresh(*arguments, same_process: bool = False) -> dict:
    """``run_item(*arguments)`` in a fresh process (its own peak memory), or here."""
    if same_process:
        return run_item(*arguments)
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1) as pool:
        try:
            return pool.apply(_call, ((run_item, *arguments),))
        except Exception as error:  # a method that fails is a row, not the end of the benchmark
            return {"item": arguments[2], "target": arguments[3], "error": f"{type(error).__name__}: {error}"}


# --- table -------------------------------------------------------------------------------------------
def format_rows(rows: list[dict], cuda: bool) -> list[str]:
    base = {row["item"]: row for row in rows if not row["item"].startswith("method:")}
    inference = base.get("inference", {}).get("seconds")
    everywhere = base.get("fwd+bwd all", {}).get("seconds")
    header = (f"  {'item':<22}{'target':<9}{'time s':>9}{'×infer':>8}{'×fb all':>9}{'×fb tgt':>9}{'peak RSS GB':>13}"
              + (f"{'peak GPU GB':>13}" if cuda else "") + f"{'passes f/b':>12}{'windows':>9}")
    lines = [header]
    for row in rows:
        label = row["item"].replace("method:", "")
        target = "ball" if "@point" in (row.get("target") or "") else "region"
        if row["item"] in ("inference", "fwd+bwd all"):
            target = "-"
        if "error" in row:
            lines.append(f"  {label:<22}{target:<9}failed: {row['error'][:150]}")
            continue
        seconds = row["seconds"]
        own = base.get(f"fwd+bwd {target}", {}).get("seconds")
        ratio = lambda reference: f"{seconds / reference:>7.2f}×" if reference else f"{'-':>8}"  # noqa: E731
        passes = row.get("passes") or {}
        gpu = f"{row.get('peak_gpu_mb', 0) / 1024:>13.2f}" if cuda else ""
        counted = str(passes.get("forward", "-")) + "/" + str(passes.get("backward", "-"))
        lines.append(f"  {label:<22}{target:<9}{seconds:>9.1f}{ratio(inference)}"
                     f"{' ' + ratio(everywhere)}{' ' + ratio(own)}"
                     f"{row['peak_rss_mb'] / 1024:>13.2f}{gpu}{counted:>12}"
                     f"{row.get('windows', '-'):>9}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default) or cuda")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    parser.add_argument("--models", default="2,105", help="output channels of the models to measure (default 2,105)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"methods (default: {','.join(METHODS)})")
    parser.add_argument("--quick", action="store_true",
                        help="a 128×128×64 volume, 32³ windows and a smaller UNet (smoke run)")
    parser.add_argument("--same-process", action="store_true",
                        help="run every item in this process (faster start; peaks are then cumulative)")
    parser.add_argument("--methods-only", action="store_true",
                        help="only the method rows on the ball target (no baselines, no region): a memory check")
    parser.add_argument("--keep",
                        help="build the volume and specs in this folder and keep them (default: a temporary folder)")
    parser.add_argument("--json", help="also write the raw rows to this file")
    args = parser.parse_args(argv)
    models = [int(v) for v in args.models.split(",") if v.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    setup = QUICK if args.quick else FULL
    import torch

    amp = " (amp)" if args.amp else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}{amp}", flush=True)
    everything = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.keep or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        volume_path, specs, lesion = build(folder, models, setup)
        ball = f"channel:1@point:{lesion[0]:.1f},{lesion[1]:.1f},{lesion[2]:.1f},{BALL_RADIUS_MM:g}"
        print(f"volume {'x'.join(map(str, setup.size))} at {'x'.join(f'{s:g}' for s in setup.spacing)} mm, "
              f"window {setup.roi}³, UNet {list(setup.channels)}; ball target {ball} (built in "
              f"{time.perf_counter() - started:.0f} s)", flush=True)
        for channels in models:
            spec = str(specs[channels])
            if args.methods_only:
                rows = []
                for method in methods:
                    rows.append(run_fresh(spec, str(volume_path), f"method:{METHODS[method]}", ball, args.device,
                                          args.amp, same_process=args.same_process))
                    print(f"  done {method}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
                table = "\n".join(format_rows(rows, args.device == "cuda"))
                print(f"\n{channels}-channel UNet (method rows only):\n" + table)
                everything[channels] = rows
                continue
            rows = [run_fresh(spec, str(volume_path), "inference", ball, args.device, args.amp,
                              same_process=args.same_process)]
            # the region: the foreground channel predicted most (random weights may predict channel 1 nowhere)
            region = f"channel:{rows[0].get('largest_channel', 1)}"
            print(f"  done inference: {json.dumps(rows[0])}", file=sys.stderr, flush=True)
            # cheapest first: the gradient methods on the ball, then on the whole predicted region, then
            # IG and occlusion (many passes) on the ball
            gradient = [m for m in methods if m in GRADIENT_METHODS]
            plan = [("fwd+bwd ball", ball)]
            plan += [(f"method:{METHODS[method]}", ball) for method in gradient]
            plan.append(("fwd+bwd all", ball))
            if gradient:
                plan.append(("fwd+bwd region", region))
            plan += [(f"method:{METHODS[method]}", region) for method in gradient]
            plan += [(f"method:{METHODS[method]}", ball) for method in methods if method not in GRADIENT_METHODS]
            for item, target in plan:
                row = run_fresh(spec, str(volume_path), item, target, args.device, args.amp,
                                same_process=args.same_process)
                rows.append(row)
                print(f"  done {item} ({target}): {json.dumps(row)}", file=sys.stderr, flush=True)
            grid = next((r["grid"] for r in rows if "grid" in r), None)
            print(f"\n{channels}-channel UNet, model grid {'x'.join(map(str, grid)) if grid else '?'}:")
            print("\n".join(format_rows(rows, args.device == "cuda")), flush=True)
            everything[channels] = rows
    print("\n×infer: to the model's own sliding-window inference; ×fb all: to one forward+backward of every window; "
          "×fb tgt: to one forward+backward of the windows the row's target touches. Method times are the method's "
          "own (explanation.json's runtime); peak RSS is the whole process's (reading, preprocessing, inference, map).")
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
