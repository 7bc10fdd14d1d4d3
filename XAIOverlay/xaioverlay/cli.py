"""The ``xaioverlay`` command line.

Every bad input ends in one line on stderr naming the problem and the fix, and a non-zero exit
(1: bad input or model, 2: bad arguments, 130: interrupted). Input files are never modified; outputs
appear only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .errors import Cancelled, XAIOverlayError
from .progress import Progress

TARGET_HELP = """\
what to explain (default: a classifier's predicted class; a segmenter's first foreground channel
over its own predicted region):
  class:C                               classifier class C (index or name)
  channel:C                             segmentation channel C over the model's predicted region
  channel:C@mask:FILE                   ... over a mask/label volume (voxels > 0, any grid)
  channel:C@box:R1,A1,S1,R2,A2,S2       ... over a box, two corners in RAS mm (as Slicer shows)
  channel:C@point:R,A,S[,RADIUS_MM]     ... over a ball around a RAS point (radius 0: one voxel)
"""


class ProgressPrinter:
    """Turns progress events into a terminal bar (stderr) or JSON lines (stdout)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.started: dict[str, float] = {}
        self.drawn = False

    def __call__(self, event: dict) -> None:
        if self.mode == "json":
            print(json.dumps(event), flush=True)
            return
        if self.mode != "bar":
            return
        if event["event"] == "message":
            self._end_line()
            print(f"· {event['message']}", file=sys.stderr, flush=True)
            return
        key = str(event.get("method", ""))
        now = time.perf_counter()
        start = self.started.setdefault(key, now)
        done, total = event["done"], max(event["total"], 1)
        eta = (now - start) / done * (total - done) if done else float("nan")
        width = 28
        filled = int(width * done / total)
        line = f"\r  {key:<22.22} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {event.get('unit', '')}"
        if done < total and done > 0:
            line += f"  ETA {eta:5.1f} s"
        if sys.stderr.isatty():
            print(line, end="", file=sys.stderr, flush=True)
            self.drawn = True
            if done >= total:
                self._end_line()
                self.started.pop(key, None)
        elif done >= total:
            print(line.strip("\r"), file=sys.stderr, flush=True)
            self.started.pop(key, None)

    def _end_line(self) -> None:
        if self.drawn:
            print(file=sys.stderr, flush=True)
            self.drawn = False

    def result(self, **payload) -> None:
        if self.mode == "json":
            print(json.dumps({"event": "result", **payload}, default=str), flush=True)

    def error(self, message: str) -> None:
        if self.mode == "json":
            print(json.dumps({"event": "error", "message": message}), flush=True)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="nnU-Net v2 trained-model folder, MONAI bundle folder, "
                        "spec file (.yaml/.json) or TorchScript file")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--amp", action="store_true", help="mixed precision on CUDA (ignored on CPU)")
    parser.add_argument("--folds", default=None, metavar="0,1,...|all",
                        help="nnU-Net: folds to ensemble (all = fold_all; default: every fold present)")
    parser.add_argument("--checkpoint", default=None, choices=("final", "best"),
                        help="nnU-Net: checkpoint_final.pth (default) or checkpoint_best.pth")
    parser.add_argument("--tta", action="store_const", const=True, default=None,
                        help="nnU-Net: mirroring test-time augmentation over the checkpoint's allowed axes")


def model_options(args: argparse.Namespace) -> dict:
    """Format-specific model options given on the command line (see :func:`xaioverlay.models.load_model`)."""
    return {"folds": args.folds, "checkpoint": args.checkpoint, "tta": args.tta}


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by every command that explains (explain, evaluate, ...)."""
    from .methods import REGISTRY

    add_model_arguments(parser)
    parser.add_argument("--input", required=True, nargs="+", metavar="VOL",
                        help="input volume(s): .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd or a DICOM folder; several = channels, in the model's order")
    methods = "\n".join(f"  {cls.name:<12} {cls.summary}" for cls in REGISTRY.values())
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated methods, NAME or NAME:OPTION (default: all the model allows):\n{methods}")
    parser.add_argument("--segments", default=None, metavar="SPEC",
                        help="features of perturbation methods (occlusion, SHAP, LIME): cubes:SIZE (voxels or mm, "
                             "e.g. cubes:16, cubes:12mm), slic:COUNT[,compactness=C] (3D supervoxels) or labels:FILE "
                             "(a label volume, one segment per label; 0 = everything else); "
                             "default: each method's own")
    parser.add_argument("--target", default=None, help=TARGET_HELP)
    parser.add_argument("--score", default="logit", choices=("logit", "probability"),
                        help="explain the logit (default) or the probability after the model's activation")
    parser.add_argument("--layer", default=None, help="layer for CAM methods (default: automatic; see 'xaioverlay layers')")
    parser.add_argument("--progress", default="bar", choices=("bar", "json", "none"),
                        help="progress on stderr as a bar (default), as JSON lines on stdout, or none")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xaioverlay evaluate`` beyond those of ``explain``."""
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--reference-mask", default=None, metavar="FILE",
                        help="ground-truth mask (voxels > 0, any grid) for the localisation metrics")
    parser.add_argument("--body-mask", default=None, metavar="FILE",
                        help="body or brain mask: agreement and randomisation compare maps inside it")
    parser.add_argument("--step", type=float, default=0.01, metavar="FRACTION",
                        help="share of voxels (or blocks) perturbed per deletion/insertion step (default 0.01)")
    parser.add_argument("--block", type=int, default=None, metavar="VOXELS",
                        help="perturb cubes of this edge instead of single voxels")
    parser.add_argument("--baselines", default="blur",
                        help="deletion/insertion baselines, comma-separated: zero, mean, blur (default blur)")
    parser.add_argument("--blur-sigma-mm", type=float, default=10.0, metavar="MM", help="Gaussian width of the blur baseline (default 10)")
    parser.add_argument("--tolerance-mm", type=float, default=5.0, metavar="MM", help="pointing-game tolerance in mm (default 5)")
    parser.add_argument("--randomisation-depth", default="all", metavar="N",
                        help="blocks randomised top-down in the sanity check: a number, 'all' (default) or 0 to skip")
    parser.add_argument("--no-random-logit", action="store_true", help="skip the random-logit check")
    parser.add_argument("--no-road", action="store_true",
                        help="skip 3D ROAD (MoRF/LeRF with noisy linear imputation; about 20 s per map at 96³ on 2 CPU cores)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="perturbed inputs per forward pass (default 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xaioverlay", description="Explain 3D imaging models: maps on the input's exact voxel grid.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"xaioverlay {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    explain = commands.add_parser("explain", help="explain one case; writes <method>.nrrd, explanation.json, montage.png",
                                  formatter_class=argparse.RawTextHelpFormatter)
    add_explain_arguments(explain)
    explain.add_argument("--out", required=True, help="output folder (created if missing)")
    explain.add_argument("--no-montage", action="store_true", help="skip montage.png")
    explain.set_defaults(run=run_explain)

    evaluate = commands.add_parser("evaluate", help="explain one case and measure every map; writes metrics.json, metrics.csv, report.html",
                                   formatter_class=argparse.RawTextHelpFormatter)
    add_explain_arguments(evaluate)
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(run=run_evaluate)

    layers = commands.add_parser("layers", help="list the layers a CAM can use, with their output shapes")
    add_model_arguments(layers)
    layers.add_argument("--input", nargs="+", metavar="VOL", help="probe with these volumes (default: the model's example input size)")
    layers.set_defaults(run=run_layers)

    from .cohort.command import add_cohort_arguments, run_cohort_command

    cohort = commands.add_parser("cohort",
                                 help="explain (and measure) many cases on a Dask cluster; writes cases/, cohort.csv",
                                 formatter_class=argparse.RawTextHelpFormatter)
    add_cohort_arguments(cohort)
    cohort.set_defaults(run=run_cohort_command)

    demo = commands.add_parser("demo", help="explain a synthetic phantom with the demo models and every method")
    demo.add_argument("--out", default="xaioverlay-demo", help="output folder (default: ./xaioverlay-demo)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    demo.add_argument("--progress", default="bar", choices=("bar", "json", "none"))
    demo.set_defaults(run=run_demo)
    return parser


def print_warnings(lines: list[str]) -> None:
    """Conditions the user must know about although the run succeeded (e.g. non-finite map values)."""
    for line in lines:
        print(f"xaioverlay: warning: {line}", file=sys.stderr, flush=True)


def run_explain(args: argparse.Namespace, printer: ProgressPrinter) -> int:
    from .demo import demo_methods
    from .explain import explain
    from .models import load_model
    from .outputs import prepare_output_folder, write_outputs
    from .volumes import read_volumes

    prepare_output_folder(args.out)
    model = load_model(args.model, device=args.device, amp=args.amp, **model_options(args))
    volumes = read_volumes(args.input)
    methods = args.methods or demo_methods(model)
    explanation = explain(model, volumes, methods, args.target, score=args.score, layer=args.layer,
                          segments=args.segments, progress=Progress(printer))
    written = write_outputs(explanation, args.out, montage=not args.no_montage)
    printer.result(out=str(Path(args.out).resolve()), files={k: str(v) for k, v in written.items()},
                   warnings=explanation.warnings())
    print_warnings(explanation.warnings())
    if args.progress != "json":
        print(f"wrote {len(written)} files to {Path(args.out).resolve()}")
        for record in explanation.record()["methods"]:
            print(f"  {record['label']:<14} {record['runtime_s']:7.2f} s  passes {record['passes']}")
    return 0


def run_evaluate(args: argparse.Namespace, printer: ProgressPrinter) -> int:
    from .demo import demo_methods
    from .errors import InputError
    from .metrics.evaluate import MetricOptions, evaluate
    from .metrics.report import write_evaluation
    from .models import load_model
    from .outputs import prepare_output_folder
    from .volumes import read_volume, read_volumes

    depth = args.randomisation_depth.strip().lower()
    if depth != "all" and not depth.isdigit():
        raise InputError(f"--randomisation-depth {args.randomisation_depth!r}: give a number of blocks, 'all' or 0")
    options = MetricOptions(
        step_fraction=args.step, block=args.block, baselines=tuple(b.strip() for b in args.baselines.split(",") if b.strip()),
        blur_sigma_mm=args.blur_sigma_mm, tolerance_mm=args.tolerance_mm,
        randomisation_depth=None if depth == "all" else int(depth), random_logit=not args.no_random_logit, road=not args.no_road,
        batch_size=args.batch_size,
    )
    prepare_output_folder(args.out)
    model = load_model(args.model, device=args.device, amp=args.amp, **model_options(args))
    volumes = read_volumes(args.input)
    reference = read_volume(args.reference_mask) if args.reference_mask else None
    body = read_volume(args.body_mask) if args.body_mask else None
    methods = args.methods or demo_methods(model)
    evaluation = evaluate(model, volumes, methods, args.target, score=args.score, layer=args.layer,
                          segments=args.segments, reference_mask=reference, body_mask=body, options=options,
                          progress=Progress(printer))
    written = write_evaluation(evaluation, args.out)
    printer.result(out=str(Path(args.out).resolve()), files={k: str(v) for k, v in written.items()},
                   warnings=evaluation.explanation.warnings())
    print_warnings(evaluation.explanation.warnings())
    if args.progress != "json":
        print(f"wrote {len(written)} files to {Path(args.out).resolve()}")
        from .metrics.report import format_number, table_rows

        table, rows = table_rows(evaluation)
        print(f"{'':<30}" + "".join(f"{row['method'][:13]:>14}" for row in rows))
        for column in table[1:]:
            print(f"{column.title[:30]:<30}" + "".join(f"{format_number(row.get(column.key), column.digits):>14}" for row in rows))
    return 0


def run_layers(args: argparse.Namespace, printer: ProgressPrinter) -> int:
    from .layers import candidate_layers, default_layer
    from .models import load_model
    from .volumes import read_volumes

    model = load_model(args.model, device=args.device, amp=args.amp, **model_options(args))
    x = None
    if args.input:
        x = model.preprocess(read_volumes(args.input)).tensor
        if model.sliding_window is not None and model.sliding_window.needed(x.shape[2:]):
            x = x.new_zeros((*x.shape[:2], *model.sliding_window.roi_size))  # what the network sees
    chosen = default_layer(model, x)
    print(f"{'layer':<48} {'type':<22} output shape")
    for layer in candidate_layers(model, x):
        mark = "  (default)" if layer.name == chosen else ""
        print(f"{layer.name:<48} {layer.type:<22} {'x'.join(map(str, layer.output_shape[1:]))}{mark}")
    return 0


def run_demo(args: argparse.Namespace, printer: ProgressPrinter) -> int:
    from .demo import run_demo as demo

    start = time.perf_counter()
    places = demo(args.out, device=args.device, progress=Progress(printer))
    printer.result(**{k: str(v) for k, v in places.items()})
    if args.progress != "json":
        print(f"demo finished in {time.perf_counter() - start:.0f} s")
        for role, place in places.items():
            print(f"  {role:<11} {place}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # before torch starts its threads (build_parser imports the methods): spinning OpenMP threads
    # starve each other on a busy CPU (see Testing/conftest.py); a value given by the user wins
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 terminal shows '?' for '·' or '×' instead of failing
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    args = build_parser().parse_args(argv)
    # MONAI announces future changes of its defaults on every transform; users cannot act on them
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"monai\.")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    printer = ProgressPrinter(getattr(args, "progress", "bar"))
    try:
        return args.run(args, printer)
    except (KeyboardInterrupt, Cancelled):
        printer.error("interrupted; no partial outputs were written")
        print("xaioverlay: interrupted; no partial outputs were written", file=sys.stderr)
        return 130
    except XAIOverlayError as error:
        printer.error(str(error))
        print(f"xaioverlay: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
