"""Time the full metric set for one 96³ map against the 60 s budget (issue 5), family by family.

    python tools/benchmark_metrics.py                       # the demo classifier
    python tools/benchmark_metrics.py --model PATH --method gxi --depth 3

Prints seconds and passes per metric family, the total against the budget, and the cost of each
randomisation step (the costliest check; its depth is an option of ``xaioverlay evaluate``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "XAIOverlay")]

BUDGET_S = 60.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model to time (default: the demo classifier bundle)")
    parser.add_argument("--method", default="gradcam", help="method whose map is measured (default gradcam)")
    parser.add_argument("--size", type=int, default=96, help="cube edge in voxels (default 96)")
    parser.add_argument("--depth", default="all", help="randomisation depth: a number or all (default all)")
    parser.add_argument("--no-road", action="store_true", help="leave 3D ROAD out")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from xaioverlay.demo import CLASSIFIER, bundle_path
    from xaioverlay.measure import measure
    from xaioverlay.metrics.evaluate import MetricOptions, evaluate
    from xaioverlay.models import load_model
    from xaioverlay.volumes import Geometry, Volume

    path = args.model or str(bundle_path(CLASSIFIER))
    model = load_model(path, device="cpu")
    size = (args.size,) * 3
    geometry = Geometry(size, (2.5, 2.5, 2.5), (0.0, 0.0, 0.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1)
    centre = np.array(size) * [0.6, 0.45, 0.5]
    lesion = np.linalg.norm(grid - centre, axis=-1) < args.size / 10
    head = np.linalg.norm((grid - np.array(size) / 2) / (np.array(size) * 0.42), axis=-1) < 1
    image = Volume((head * (0.5 + 0.05 * rng.standard_normal(size)) + lesion * 0.6).astype(np.float32), geometry, "benchmark")
    mask = Volume(lesion.astype(np.uint8), geometry, "lesion")
    body = Volume(head.astype(np.uint8), geometry, "head")
    depth = None if args.depth == "all" else int(args.depth)
    options = MetricOptions(step_fraction=0.01, baselines=("blur",), randomisation_depth=depth, batch_size=args.batch_size,
                            road=not args.no_road)
    print(f"model: {path}; map: {args.method}; volume {'×'.join(map(str, size))}; "
          f"{torch.get_num_threads()} threads; batch {args.batch_size}")
    load = os.getloadavg()[0]
    cpu_start = time.process_time()
    with measure("cpu") as total:
        evaluation = evaluate(model, [image], [args.method], "class:tumour", reference_mask=mask, body_mask=body, options=options)
    cpu_seconds = time.process_time() - cpu_start
    method = evaluation.methods[0]
    costs = method.metric_cost
    faith = costs["faithfulness"]
    road = costs.get("road")
    extra = ("randomisation", "random_logit", "road")
    other = total.seconds - faith["runtime_s"] - sum(costs.get(k, {}).get("runtime_s", 0) for k in extra) - method.cost["runtime_s"]
    print(f"{'part':<44}{'seconds':>9}{'forward':>9}{'backward':>9}")
    print(f"{'map (' + args.method + ')':<44}{method.cost['runtime_s']:9.2f}{method.cost['passes']['forward']:9d}{method.cost['passes']['backward']:9d}")
    print(f"{'deletion + insertion, 1 % steps, blur':<44}{faith['runtime_s']:9.2f}{faith['passes']['forward']:9d}{faith['passes']['backward']:9d}")
    logit = costs.get("random_logit")
    if logit:
        print(f"{'random-logit check':<44}{logit['runtime_s']:9.2f}{logit['passes']['forward']:9d}{logit['passes']['backward']:9d}")
    if road:
        print(f"{'3D ROAD, MoRF + LeRF at 9 fractions':<44}{road['runtime_s']:9.2f}{road['passes']['forward']:9d}{road['passes']['backward']:9d}")
    print(f"{'explain overhead, localisation, complexity, agreement':<44}{other:9.2f}")
    randomisation = costs.get("randomisation")
    without = total.seconds - (randomisation["runtime_s"] if randomisation else 0)
    print(f"{'= full metric set but randomisation':<44}{without:9.2f}   {without / BUDGET_S:.2f} × the {BUDGET_S:.0f} s budget")
    if randomisation:
        steps = len(method.randomisation.blocks)
        print(f"{f'randomisation, {steps} blocks top-down':<44}{randomisation['runtime_s']:9.2f}"
              f"{randomisation['passes']['forward']:9d}{randomisation['passes']['backward']:9d}"
              f"   {randomisation['runtime_s'] / max(steps, 1):.2f} s per block")
        print(f"{'= everything':<44}{total.seconds:9.2f}   {total.seconds / BUDGET_S:.2f} × the budget")
        print("blocks:", ", ".join(method.randomisation.blocks))
    threads = torch.get_num_threads()
    print(f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after (other jobs share these cores); "
          f"CPU time {cpu_seconds:.1f} s ÷ {threads} threads = {cpu_seconds / threads:.1f} s, "
          f"the wall time to expect on {threads} idle cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
