"""Benchmark occlusion sensitivity: XAIOverlay (exact, region-aware, adaptive) against MONAI and Captum.

One run, one volume (a held-out demo phantom), the same occluder, stride and fill (zero) in every
row of a model:

    classifier (demo tumour classifier, target class "tumour")
        MONAI OcclusionSensitivity · Captum Occlusion · XAIOverlay brute force · XAIOverlay exact ·
        XAIOverlay adaptive (budget: a tenth of the occluded inputs exact evaluated)
    segmenter (demo tumour segmenter, sliding window; target: channel "tumour" over the phantom's
    tumour mask, i.e. a tumour-sized region)
        MONAI OcclusionSensitivity on the target wrapped as a one-output model (every occluded volume
        through the bundle's sliding-window inference: MONAI-equivalent brute force) · Captum on the
        same wrapper (--captum-segmenter) · XAIOverlay region-aware (exact) · XAIOverlay adaptive

Prints seconds, occluded forward passes, peak memory, the speed-up against MONAI and Captum, and the
largest difference from MONAI's map (relative to the map's range) as a check that rows agree.

    python tools/benchmark_occlusion.py [--size 16 --stride 8] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

# before torch loads: spinning OpenMP threads starve each other on a busy CPU (Testing/conftest.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "XAIOverlay")]

from xaioverlay.demo import CLASSIFIER, DEMO_SEED, SEGMENTER, bundle_path  # noqa: E402
from xaioverlay.measure import measure  # noqa: E402
from xaioverlay.methods.occlusion import BRUTE_FORCE, AdaptiveOcclusion, Occlusion  # noqa: E402
from xaioverlay.methods.occlusion.options import Lengths, OccluderOptions  # noqa: E402
from xaioverlay.models import load_model  # noqa: E402
from xaioverlay.prediction import predict  # noqa: E402
from xaioverlay.targets import resolve_target  # noqa: E402
from xaioverlay.volumes import write_volume  # noqa: E402


class Wrapped(torch.nn.Module):
    """A model as MONAI and Captum see it: every call goes through ``LoadedModel`` (passes counted).

    Classifiers return their logits (B, K); segmenters the target score (B, 1) of the whole volume
    run through the model's own (sliding-window) inference."""

    def __init__(self, model, target=None) -> None:
        super().__init__()
        self.model, self.target = model, target

    def forward(self, x):
        if self.target is None:
            return self.model.forward(x)
        return self.target(self.model.infer(x))[:, None]


def monai_map(model, x, size, stride, batch, target=None, index=0):
    """MONAI's map is the mean occluded output; the drop is the clean output minus it."""
    from monai.visualize import OcclusionSensitivity

    wrapped = Wrapped(model, target)
    with torch.no_grad():
        clean = float(wrapped(x)[0, index])
        occluded, _ = OcclusionSensitivity(wrapped, mask_size=size, n_batch=batch, verbose=False, mode=0.0,
                                           overlap=1 - stride / size, activate=False)(x)
    return clean - occluded[0, index]


def captum_map(model, x, size, stride, batch, target=None, index=0):
    from captum.attr import Occlusion as CaptumOcclusion

    wrapped = Wrapped(model, target)
    with torch.no_grad():
        return CaptumOcclusion(wrapped).attribute(x, sliding_window_shapes=(1, size, size, size), strides=(1, stride, stride, stride),
                                                  baselines=0.0, target=index, perturbations_per_eval=batch)[0, 0]


def ours_map(model, x, target, method):
    return method.attribute(model, x, target)


def run_row(name, model, function):
    model.passes.reset()
    with measure(model.device) as cost:
        values = function()
    extras = getattr(values, "extras", {})
    values = getattr(values, "map", values)
    return {"name": name, "seconds": cost.seconds, "passes": model.passes.forward, "memory_mb": cost.peak_memory_mb,
            "map": values.detach().float().cpu(), "occluders": extras.get("occluders_evaluated")}


def print_table(title, rows, reference="MONAI OcclusionSensitivity"):
    print(f"\n{title}")
    monai = next((r for r in rows if r["name"].startswith("MONAI")), None)
    captum = next((r for r in rows if r["name"].startswith("Captum")), None)
    print(f"  {'method':<34} {'seconds':>9} {'passes':>8} {'peak MB':>8} {'vs MONAI':>9} {'vs Captum':>10} {'max|Δ| vs MONAI':>16}")
    for row in rows:
        versus_monai = f"{monai['seconds'] / row['seconds']:.1f}x" if monai else "-"
        versus_captum = f"{captum['seconds'] / row['seconds']:.1f}x" if captum else "-"
        if monai is not None and row["map"] is not None:
            scale = float(monai["map"].max() - monai["map"].min()) or 1.0
            difference = f"{float((row['map'] - monai['map']).abs().max()) / scale:.1e}"
        else:
            difference = "-"
        if row["name"].startswith("XAIOverlay adaptive"):
            difference = "(approximate)"
        print(f"  {row['name']:<34} {row['seconds']:9.2f} {row['passes']:8d} {row['memory_mb']:8.0f} {versus_monai:>9} {versus_captum:>10} {difference:>16}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16, help="occluder edge, voxels (default 16, MONAI's default)")
    parser.add_argument("--stride", type=int, default=8, help="occluder stride, voxels (default 8)")
    parser.add_argument("--batch", type=int, default=16, help="occluded volumes per call for MONAI and Captum (default 16)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help=f"phantom seed (default {DEMO_SEED}, held out)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--captum-segmenter", action="store_true", help="also run Captum on the segmenter (several minutes)")
    parser.add_argument("--skip", default="", help="comma-separated: classifier, segmenter")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    from xaioverlay.phantoms import make_phantom

    phantom = make_phantom(args.seed)
    size, stride = args.size, args.stride
    options = OccluderOptions(Lengths((float(size),) * 3), Lengths((float(stride),) * 3))
    print(f"occluder {size}^3 voxels, stride {stride}, zero fill; phantom seed {args.seed}; device {args.device}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"load average {os.getloadavg()[0]:.1f}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    if "classifier" not in skip:
        model = load_model(bundle_path(CLASSIFIER), device=args.device)
        model_input = model.preprocess([phantom.image])
        x = model_input.tensor
        target = resolve_target("class:tumour", model, model_input, predict(model, x))
        rows = [
            run_row("MONAI OcclusionSensitivity", model, lambda: monai_map(model, x, size, stride, args.batch, index=target.index)),
            run_row("Captum Occlusion", model, lambda: captum_map(model, x, size, stride, args.batch, index=target.index)),
            run_row("XAIOverlay brute force", model, lambda: ours_map(model, x, target, Occlusion(options, BRUTE_FORCE))),
            run_row("XAIOverlay exact", model, lambda: ours_map(model, x, target, Occlusion(options))),
        ]
        budget = max(1, rows[-1]["occluders"] // 10)
        rows.append(run_row(f"XAIOverlay adaptive (budget {budget})", model, lambda: ours_map(model, x, target, AdaptiveOcclusion(budget, options))))
        print_table(f"classifier {CLASSIFIER}, input {tuple(x.shape[2:])}, target class:tumour (logit)", rows)
        exact_row, adaptive_row = rows[3], rows[4]
        print("  passes: every forward pass, clean ones included (XAIOverlay: the clean replay and its check)")
        print(f"  exact vs MONAI: {rows[0]['seconds'] / exact_row['seconds']:.1f}x faster (target >= 2x); adaptive: "
              f"{exact_row['occluders']} / {adaptive_row['occluders']} = {exact_row['occluders'] / adaptive_row['occluders']:.1f}x "
              "fewer occluded passes than exact (target >= 10x)")

    if "segmenter" not in skip:
        model = load_model(bundle_path(SEGMENTER), device=args.device)
        with tempfile.TemporaryDirectory() as folder:
            mask = write_volume(phantom.tumour_mask, Path(folder) / "tumour.nrrd")
            model_input = model.preprocess([phantom.image])
            x = model_input.tensor
            target = resolve_target(f"channel:tumour@mask:{mask}", model, model_input, predict(model, x))
        rows = [run_row("MONAI OcclusionSensitivity", model, lambda: monai_map(model, x, size, stride, args.batch, target=target))]
        if args.captum_segmenter:
            rows.append(run_row("Captum Occlusion", model, lambda: captum_map(model, x, size, stride, args.batch, target=target)))
        rows.append(run_row("XAIOverlay region-aware (exact)", model, lambda: ours_map(model, x, target, Occlusion(options))))
        budget = max(1, rows[-1]["occluders"] // 10)
        rows.append(run_row(f"XAIOverlay adaptive (budget {budget})", model, lambda: ours_map(model, x, target, AdaptiveOcclusion(budget, options))))
        window = model.sliding_window
        print_table(f"segmenter {SEGMENTER}, input {tuple(x.shape[2:])}, sliding window {window.roi_size} overlap {window.overlap}, "
                    f"target channel:tumour over the tumour mask ({target.region['voxels']} voxels)", rows)
        print("  passes: network evaluations of one window (MONAI/Captum rows: every occluded volume runs all windows)")
        exact_row = next(r for r in rows if r["name"].startswith("XAIOverlay region"))
        adaptive_row = rows[-1]
        print(f"  region-aware vs MONAI-equivalent brute force: {rows[0]['seconds'] / exact_row['seconds']:.1f}x faster (target >= 10x); "
              f"adaptive: {exact_row['occluders']} / {adaptive_row['occluders']} = "
              f"{exact_row['occluders'] / adaptive_row['occluders']:.1f}x fewer occluded inputs than exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
