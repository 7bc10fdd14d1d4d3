"""Cost of LRP, gradient × input and integrated gradients, as ratios to one forward+backward pass.

    python tools/benchmark_gradients.py                        # the demo bundles, AttentionUnet, SwinUNETR
    python tools/benchmark_gradients.py --model PATH [PATH..]  # any bundle, spec or TorchScript file

For each model, on one input of the size the network sees (the sliding window for a windowed
segmenter), it prints the median time of: a forward pass; a forward+backward pass (gradient of the
target with respect to the input); a training step (forward in train mode + backward to every
parameter); LRP with each named composite; gradient × input; integrated gradients (64 steps). Times are
also given as multiples of forward+backward; peak memory (process RSS on CPU, allocated memory on
CUDA, above the level before the step) as a multiple of the training step's.

Peak memory is measured for each item in a fresh process, on its first run (before the allocator has
kept anything from earlier work); times are medians over rounds that take the items in turn in one
process, so that a change of load on a shared machine affects all items alike.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "XAIOverlay")]

ITEMS = ["forward", "forward+backward", "training step", "lrp", "lrp:epsilon-gamma-box", "lrp:epsilon-alpha2-beta1-flat",
         "gxi", "ig"]


def _setup(path: str, device: str):
    import torch

    from xaioverlay.models import load_model
    from xaioverlay.targets import Target

    warnings.filterwarnings("ignore")
    model = load_model(path, device=device)
    shape = model.sliding_window.roi_size if model.sliding_window else model.example_shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, model.in_channels, *shape), generator=generator).to(model.device)
    index = min(1, len(model.class_names) - 1)
    weights = None if model.task == "classification" else torch.ones(shape, device=model.device)
    target = Target(index, model.class_names[index], "logit", model.activation, weights, {})
    return model, x, target


def _step(model, x, target, item: str):
    """One run of ``item`` (a callable with no arguments)."""
    import torch

    from xaioverlay.methods import build_method

    if item == "forward":
        def run():
            with torch.no_grad():
                model.forward(x)
    elif item == "forward+backward":
        def run():
            with torch.enable_grad():
                inputs = x.detach().requires_grad_(True)
                torch.autograd.grad(target(model.forward(inputs)).sum(), inputs)
    elif item == "training step":
        def run():
            model.network.train()
            try:
                with torch.enable_grad():
                    target(model.network(x)).sum().backward()
            finally:
                model.network.eval()
                model.network.zero_grad(set_to_none=True)
    else:
        method = build_method(item)

        def run():
            method.attribute(model, x, target)
    return run


def _synchronise(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_memory(path: str, item: str, device: str, threads: int | None = None) -> dict:
    """In this (fresh) process: peak memory and passes of one run of ``item``."""
    import torch

    from xaioverlay.measure import measure

    if threads:
        torch.set_num_threads(threads)
    model, x, target = _setup(path, device)
    run = _step(model, x, target, item)
    model.passes.reset()
    with measure(model.device) as first:
        run()
    return {"peak_mb": first.peak_memory_mb, "memory_kind": first.memory_kind, "passes": model.passes.as_dict(),
            "shape": list(x.shape[2:]), "device": str(model.device)}


def measure_times(path: str, items: list[str], rounds: int, device: str, threads: int | None = None) -> dict[str, float]:
    """Median time of each item over ``rounds`` rounds that take the items in turn (so a change of
    load on the machine affects all items alike); IG, 64 passes long, only in the first two rounds."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model, x, target = _setup(path, device)
    runs = {item: _step(model, x, target, item) for item in items}
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {item: [] for item in items}
    for number in range(rounds):
        for item, run in runs.items():
            if item == "ig" and number >= 2:
                continue
            _synchronise(model.device)
            start = time.perf_counter()
            run()
            _synchronise(model.device)
            times[item].append(time.perf_counter() - start)
    return {item: statistics.median(values) for item, values in times.items()}


def _call(arguments):
    function, *rest = arguments
    return function(*rest)


def benchmark(path: str, rounds: int, device: str, threads: int | None = None, items=ITEMS) -> dict[str, dict]:
    context = multiprocessing.get_context("spawn")
    results = {}
    for item in items:
        with context.Pool(1) as pool:
            results[item] = pool.apply(_call, ((measure_memory, path, item, device, threads),))
    with context.Pool(1) as pool:
        seconds = pool.apply(_call, ((measure_times, path, list(items), rounds, device, threads),))
    for item in items:
        results[item]["seconds"] = seconds[item]
    return results


def report(name: str, results: dict[str, dict]) -> str:
    base_time = results["forward+backward"]["seconds"]
    base_memory = results["training step"]["peak_mb"]
    first = next(iter(results.values()))
    lines = [f"{name}: input {'x'.join(map(str, first['shape']))} on {first['device']} (peak memory: {first['memory_kind']})",
             f"  {'':<32}{'time':>9}{'× fwd+bwd':>11}{'peak MB':>10}{'× train step':>14}   passes"]
    for item, result in results.items():
        ratio_memory = result["peak_mb"] / base_memory if base_memory > 0 else float("nan")
        lines.append(f"  {item:<32}{result['seconds']:>8.3f}s{result['seconds'] / base_time:>10.2f}×"
                     f"{result['peak_mb']:>10.1f}{ratio_memory:>13.2f}×   {result['passes']['forward']}f/{result['passes']['backward']}b")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+",
                        help="models to measure (default: the demo bundles, the AttentionUnet and SwinUNETR bundles)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds over all items (IG: two)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    parser.add_argument("--items", nargs="+", default=ITEMS, choices=ITEMS, metavar="ITEM",
                        help=f"what to measure (default: all of {', '.join(ITEMS)}; forward+backward and training step are always included)")
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    if args.model:
        models = args.model
    else:
        from xaioverlay.demo import ATTENTION_UNET, CLASSIFIER, SEGMENTER, SWIN_UNETR, bundle_path

        models = [str(bundle_path(name)) for name in (CLASSIFIER, SEGMENTER, ATTENTION_UNET, SWIN_UNETR)]
        for path in [m for m in models if not Path(m).is_dir()]:
            print(f"{path}: not found (train it with tools/train_attention_models.py); not measured")
            models.remove(path)
    import torch

    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads")
    everything = {}
    for path in models:
        items = [item for item in ITEMS if item in {"forward+backward", "training step", *args.items}]
        results = benchmark(path, args.rounds, args.device, args.threads, items)
        everything[path] = results
        print(report(Path(path).name, results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
