"""``xaioverlay cohort``: its options and what it prints (registered by :mod:`xaioverlay.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_cohort_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_model_arguments

    add_model_arguments(parser)  # --model, --device, --amp and the nnU-Net options, as for explain
    parser.add_argument("--cases", required=True, metavar="MANIFEST",
                        help="CSV with columns case_id,image[,image_2,...][,label][,reference_mask] "
                             "(paths relative to the CSV), or a folder of volumes (one case each)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="cohort folder: cases/<case_id>/, cohort.csv, cohort.parquet")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods, as for explain (default: all the model allows)")
    parser.add_argument("--target", default=None,
                        help="what to explain, as for explain (default: the predicted class / region)")
    parser.add_argument("--score", default="logit", choices=("logit", "probability"))
    parser.add_argument("--layer", default=None, help="layer for CAM methods (default: automatic)")
    parser.add_argument("--metrics", action="store_true",
                        help="measure every map as 'xaioverlay evaluate' does (its default settings)")
    parser.add_argument("--no-road", action="store_true", help="with --metrics: skip 3D ROAD (the slowest metric)")
    parser.add_argument("--no-montage", action="store_true", help="skip each case's montage.png (not with --metrics)")
    parser.add_argument("--similar", type=int, default=5, metavar="K",
                        help="list each case's K most similar cases in the model's feature space (default 5; 0: off)")
    parser.add_argument("--feature-layer", default=None, metavar="NAME",
                        help="layer whose pooled activations compare cases (default: last before a classifier's "
                             "head, a segmenter's bottleneck)")
    parser.add_argument("--strategies-method", default=None, metavar="METHOD",
                        help="method whose maps are clustered into strategies.json (default: the first one run)")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="a running Dask scheduler (tcp://host:8786); default: a LocalCluster on this machine")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="LocalCluster worker processes (default: one per GPU, else half the CPU cores)")
    parser.add_argument("--resume", action="store_true", help="skip cases whose outputs are complete; run the rest")
    parser.add_argument("--progress", default="bar", choices=("bar", "json", "none"),
                        help="progress on stderr as a line per case (default), as JSON lines on stdout, or none")


def progress_line(event: dict) -> str:
    """``12/40 cases · 11 done · 1 failed · 28 remaining · 4.1 cases/min · ETA 6.8 min · case_07 failed``."""
    eta = event.get("eta_s")
    eta_text = "–" if eta is None else (f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.1f} min")
    finished = event["done"] + event["failed"]
    return (f"{finished}/{event['total']} cases · {event['done']} done · {event['failed']} failed · "
            f"{event['remaining']} remaining · {event['cases_per_minute']:.1f} cases/min · ETA {eta_text}"
            f" · {event['case_id']} {event['status']}")


def printer_for(mode: str):
    def show(event: dict) -> None:
        if mode == "json":
            print(json.dumps(event), flush=True)
        elif mode == "bar":
            text = event["message"] if event["event"] == "message" else progress_line(event)
            end = "\n" if event["event"] == "message" or not sys.stderr.isatty() else ""
            prefix = "\r\033[K" if sys.stderr.isatty() and event["event"] != "message" else ""
            print(prefix + text, end=end, file=sys.stderr, flush=True)
    return show


def run_cohort_command(args: argparse.Namespace, printer) -> int:
    from ..cli import model_options
    from ..metrics.evaluate import MetricOptions
    from .case import CaseSettings
    from .report import write_cohort_report
    from .run import run_cohort

    settings = CaseSettings(
        model=args.model, methods=args.methods, target=args.target, score=args.score, layer=args.layer,
        device=args.device, amp=args.amp, model_options=model_options(args),
        metrics=MetricOptions(road=not args.no_road) if args.metrics else None,
        similar=args.similar, feature_layer=args.feature_layer, montage=not args.no_montage,
    )
    show = printer_for(args.progress)
    try:
        result = run_cohort(args.cases, settings, args.out, scheduler=args.scheduler, workers=args.workers,
                            resume=args.resume, progress=show)
    except KeyboardInterrupt:
        if args.progress == "bar" and sys.stderr.isatty():
            print(file=sys.stderr)
        printer.error("interrupted; finished cases are kept: rerun with --resume to continue")
        print("xaioverlay: interrupted; finished cases are kept: rerun with --resume to continue", file=sys.stderr)
        return 130
    if args.progress == "bar" and sys.stderr.isatty():
        print(file=sys.stderr)
    from .manifest import read_cases
    from .strategies import write_strategies

    strategies = write_strategies(args.out, read_cases(args.cases), args.strategies_method)
    if strategies is not None:
        result.files["strategies"] = strategies
    result.files["report"] = write_cohort_report(args.out)  # last: it shows what the run wrote
    printer.result(out=str(Path(args.out).resolve()), done=result.done, failed=result.failed, skipped=result.skipped,
                   files={k: str(v) for k, v in result.files.items()})
    if args.progress != "json":
        print(f"{result.done} of {result.total} cases done ({result.skipped} from an earlier run), "
              f"{result.failed} failed")
        for path in result.files.values():
            print(f"  {path}")
    return 0


def add_cohort_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="the --out folder of an 'xaioverlay cohort' run")


def run_cohort_report_command(args: argparse.Namespace, printer) -> int:
    """Rebuild ``DIR/report.html`` from the folder alone (e.g. after ``strategies.json`` was added)."""
    from .report import write_cohort_report

    print(write_cohort_report(args.folder))
    return 0
