"""Benchmark Shapley values over segments: XAIOverlay against Captum's KernelShap, and shap-guided against shap.

One run, the held-out demo phantom, the demo segmenter (sliding window), target: channel "tumour" over the
phantom's tumour mask (a tumour-sized region), SLIC supervoxels, zero fill. Three tables:

1. KernelSHAP, the same segments and sample count: Captum ``KernelShap`` on the model wrapped as a
   one-output function (every coalition through the bundle's sliding-window inference) against XAIOverlay's
   ``kernelshap`` on the masked scorer (region-aware, incremental); seconds, passes, speed-up, and the
   correlation of the two estimates (two random draws of the same quantity).
2. shap-guided against shap at the same permutations (the same passes): the summed variance of each
   estimate from the standard errors the estimators report. Both are unbiased, so their squared error is
   their variance, which falls as 1 / passes: the ratio of the two is the share of shap's passes
   shap-guided needs for the same error at any budget (e.g. that of shap:1000).
3. The default ``shap`` (no option, default segments) for the same region target on a 96³ volume (the
   phantom rendered on a 96³ grid at the segmenter's 2.5 mm).

    python tools/benchmark_shap.py [--segments slic:256] [--samples 1000] [--quick] [--threads N]

``--quick`` (a few minutes): 64 cubes instead of 256 supervoxels, 300 coalitions, and a reduced third table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

# before torch loads: spinning OpenMP threads starve each other on a busy CPU (Testing/conftest.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "XAIOverlay")]

from xaioverlay.demo import DEMO_SEED, SEGMENTER, bundle_path  # noqa: E402
from xaioverlay.methods import shapley  # noqa: E402
from xaioverlay.methods.base import Context  # noqa: E402
from xaioverlay.methods.coalitions import Shap, segment_sums  # noqa: E402
from xaioverlay.methods.gradients import gradient_times_input  # noqa: E402
from xaioverlay.methods.masking import SegmentScorer  # noqa: E402
from xaioverlay.models import load_model  # noqa: E402
from xaioverlay.prediction import predict  # noqa: E402
from xaioverlay.segments import make_segments, parse_segments  # noqa: E402
from xaioverlay.targets import resolve_target  # noqa: E402
from xaioverlay.volumes import write_volume  # noqa: E402


def region_problem(model, phantom):
    with tempfile.TemporaryDirectory() as folder:
        mask = write_volume(phantom.tumour_mask, Path(folder) / "tumour.nrrd")
        model_input = model.preprocess([phantom.image])
        target = resolve_target(f"channel:tumour@mask:{mask}", model, model_input, predict(model, model_input.tensor))
    return model_input, target


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def captum_kernel_shap(model, x, target, ids, samples, batch):
    """Captum's KernelShap with the segments as feature mask, the model wrapped as one score per input."""
    from captum.attr import KernelShap

    def forward(inputs):
        with torch.no_grad():
            return target(model.infer(inputs))

    torch.manual_seed(1)
    attribution = KernelShap(forward).attribute(x, baselines=0.0, feature_mask=ids[None, None], n_samples=samples,
                                                perturbations_per_eval=batch)[0, 0]
    count = int(ids.max()) + 1
    return segment_sums(attribution, ids, count) / torch.bincount(ids.reshape(-1), minlength=count)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def kernel_table(model, model_input, target, ids, samples, batch):
    x = model_input.tensor
    count = int(ids.max()) + 1
    model.passes.reset()
    theirs, captum_seconds = timed(lambda: captum_kernel_shap(model, x, target, ids, samples, batch))
    captum_passes = model.passes.forward
    model.passes.reset()
    with torch.inference_mode():
        scorer = SegmentScorer(model, x, torch.zeros_like(x), target, ids)
        generator = torch.Generator().manual_seed(2)
        ours, our_seconds = timed(lambda: shapley.kernel_shapley(scorer.score, count, samples, generator))
    our_passes = model.passes.forward
    print(f"\n1. KernelSHAP, {count} segments, {samples} coalitions, zero fill")
    print(f"  {'method':<34} {'seconds':>9} {'passes':>8} {'vs Captum':>10}")
    print(f"  {'Captum KernelShap':<34} {captum_seconds:9.1f} {captum_passes:8d} {'1.0x':>10}")
    print(f"  {'XAIOverlay kernelshap':<34} {our_seconds:9.1f} {our_passes:8d} {captum_seconds / our_seconds:9.1f}x")
    # both estimate the same Shapley values independently:
    # E‖ours − theirs‖² = Captum's squared error + ours (Σ SE²)
    ours_squared = float(ours.standard_errors.pow(2).sum())
    captum_squared = float((ours.values - theirs).pow(2).sum()) - ours_squared
    print(f"  passes: network evaluations of one window; correlation of the two estimates "
          f"{correlation(ours.values, theirs):.3f}")
    print(f"  squared error summed over segments: XAIOverlay {ours_squared:.4g} (Σ SE²), Captum {captum_squared:.4g} "
          f"(‖difference‖² − XAIOverlay's)")
    if captum_squared > 0:
        same = our_seconds * ours_squared / captum_squared  # the variance falls as 1 / coalitions
        print(f"  at Captum's error XAIOverlay needs {samples * ours_squared / captum_squared:.0f} coalitions, about "
              f"{same:.1f} s: {captum_seconds / same:.1f}x faster than Captum at the same estimate (goal >= 10x)")


def remembered(value):
    """``value`` that scores each distinct coalition once (a second estimator on the same orders costs nothing)."""
    scores = {}

    def lookup(keep):
        missing = [row for row in keep if row.numpy().tobytes() not in scores]
        if missing:
            for row, score in zip(missing, value(torch.stack(missing)).tolist()):
                scores[row.numpy().tobytes()] = score
        return torch.tensor([scores[row.numpy().tobytes()] for row in keep], dtype=torch.float64)

    return lookup


def guided_table(model, model_input, target, ids, permutations):
    x = model_input.tensor
    count = int(ids.max()) + 1
    with torch.inference_mode():
        scorer = SegmentScorer(model, x, torch.zeros_like(x), target, ids)
        value = remembered(scorer.score)
        plain, plain_seconds = timed(lambda: shapley.permutation_shapley(value, count, permutations,
                                                                          torch.Generator().manual_seed(3)))
    guide, guide_seconds = timed(lambda: segment_sums(gradient_times_input(model, x, target)[0].sum(0), ids, count))
    with torch.inference_mode():  # the same seed: the same orders, already scored
        guided, guided_seconds = timed(lambda: shapley.guided_shapley(value, count, permutations,
                                                                       torch.Generator().manual_seed(3), guide))
    rows = [(f"shap:{permutations}", plain, plain_seconds),
            (f"shap-guided:{permutations} (gradient × input)", guided, guided_seconds + guide_seconds)]
    print(f"\n2. shap-guided against shap, {count} segments, the same {permutations} orders and passes (shap-guided "
          "reuses shap's scores; summed variance of the estimates, from their standard errors)")
    print(f"  {'method':<36} {'seconds':>9} {'passes':>8} {'Σ SE²':>12} {'Σ SE² × passes':>15}")
    for name, estimate, seconds in rows:
        squared = float(estimate.standard_errors.pow(2).sum())
        print(f"  {name:<36} {seconds:9.1f} {estimate.passes:8d} {squared:12.4g} {squared * estimate.passes:15.4g}")
    # both unbiased: the squared error is the variance, which falls as 1 / passes
    share = float(guided.standard_errors.pow(2).sum()) / float(plain.standard_errors.pow(2).sum())
    reference = 2 + 1000 * (count - 1)
    print(f"  for the error of shap:1000 ({reference} passes) shap-guided needs {share:.2f} of shap's passes "
          f"(about {share * reference:.0f}; goal <= 0.25); control scales {guided.extras['control_scales']}; "
          f"the guide's backward pass took {guide_seconds:.1f} s; correlation of the two estimates "
          f"{correlation(plain.values, guided.values):.3f}")


def default_table(args):
    from xaioverlay.phantoms import _ras_aligned_geometry, make_phantom

    size = 64 if args.quick else 96
    model = load_model(bundle_path(SEGMENTER), device=args.device)
    phantom = make_phantom(args.seed, geometry=_ras_aligned_geometry((size,) * 3, 2.5))
    model_input, target = region_problem(model, phantom)
    method = Shap()
    context = Context(spacing_mm=tuple(float(s) for s in model_input.model_geometry.spacing))
    model.passes.reset()
    cpu = time.process_time()
    attribution, seconds = timed(lambda: method.attribute(model, model_input.tensor, target, context=context))
    cpu = time.process_time() - cpu
    extras = attribution.extras
    print(f"\n3. default shap ({method.spec}, segments {attribution.parameters['segments']}: "
          f"{attribution.parameters['segment_count']}), region target over the tumour mask "
          f"({target.region['voxels']} voxels), "
          f"input {tuple(model_input.tensor.shape[2:])}")
    print(f"  {seconds:.1f} s ({cpu:.1f} s CPU time on {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}), {extras['passes']} coalitions, {model.passes.forward} window passes; Σ values "
          f"{extras['sum_values']:.4g} = f(x) − f(fill) {extras['score_difference']:.4g}; goal < 60 s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", default=None,
                        help="segments for tables 1-2 (default slic:256; --quick: cubes:16)")
    parser.add_argument("--samples", type=int, default=None, help="KernelSHAP coalitions (default 1000; --quick 300)")
    parser.add_argument("--permutations", type=int, default=None,
                        help="permutations of shap and shap-guided (the same orders; default 8)")
    parser.add_argument("--batch", type=int, default=8, help="Captum perturbations per call (default 8)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help=f"phantom seed (default {DEMO_SEED}, held out)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a few minutes: fewer segments, samples, smaller volume")
    parser.add_argument("--skip", default="", help="comma-separated: kernel, guided, default")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    segments = args.segments or ("cubes:16" if args.quick else "slic:256")
    samples = args.samples or (300 if args.quick else 1000)
    permutations = args.permutations or 8
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    from xaioverlay.phantoms import make_phantom

    print(f"segments {segments}; phantom seed {args.seed}; device {args.device}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU thread(s), load average {os.getloadavg()[0]:.1f}")
    model = load_model(bundle_path(SEGMENTER), device=args.device)
    model_input, target = region_problem(model, make_phantom(args.seed))
    ids = make_segments(parse_segments(segments), model_input)
    if "kernel" not in skip:
        kernel_table(model, model_input, target, ids, samples, args.batch)
    if "guided" not in skip:
        guided_table(model, model_input, target, ids, permutations)
    if "default" not in skip:
        default_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
