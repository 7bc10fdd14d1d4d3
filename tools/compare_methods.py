"""Which method to trust on which model: every registered method, held-out phantoms, the demo models.

    python tools/compare_methods.py --phantoms 20
    python tools/compare_methods.py --phantoms 20 --step 0.01 --depth all --out comparison/   # slower, fuller
    python tools/compare_methods.py --phantoms 20 --models attention_unet,swin_unetr           # attention models

For each held-out phantom (``xaioverlay.phantoms.HELD_OUT_SEEDS``, each with a tumour) and each demo
model, every method the model allows (``methods.REGISTRY``, with its demo settings) explains the
tumour — the classifier's "tumour" class, the segmenter's tumour channel over its own predicted
region — and is measured against the phantom's tumour mask, with maps compared inside its brain
mask; LRP's conservation error and IG's completeness error (relative, summed over windows) are shown
beside. Models: ``classifier`` and ``segmenter`` (the demo bundles), ``attention_unet`` and
``swin_unetr`` (tumour segmenters trained by ``tools/train_attention_models.py``). Prints, per model,
mean ± sd over phantoms of each metric per method; ``--out`` also writes
every phantom's ``metrics.json`` row set as CSV and the summary as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "XAIOverlay")]

#: Columns of the printed table (key, short title, ↑/↓).
SUMMARY = [
    ("deletion_auc_blur", "deletion AUC", "↓"),
    ("insertion_auc_blur", "insertion AUC", "↑"),
    ("road_morf", "ROAD MoRF", "↓"),
    ("road_lerf", "ROAD LeRF", "↑"),
    ("pointing_game", "pointing game", "↑"),
    ("relevance_mass", "relevance mass", "↑"),
    ("relevance_rank", "relevance rank", "↑"),
    ("conservation_error", "LRP conservation error", "↓"),
    ("completeness_error", "IG completeness error", "↓"),
    ("sparseness", "Gini sparseness", "↑"),
    ("entropy", "entropy", "↓"),
    ("randomisation_spearman", "randomisation ρ", "↓"),
    ("randomisation_pass", "randomisation passes", "↑"),
    ("random_logit_spearman", "random-logit ρ", "↓"),
    ("runtime_s", "runtime (s)", "↓"),
]


def summarise(values: list[float]) -> tuple[float, float, int]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0, len(finite)


def format_cell(mean: float, sd: float, count: int, expected: int, key: str = "") -> str:
    if count == 0:
        return "–"
    if key == "randomisation_pass":
        return f"{round(mean * count)}/{count}"
    text = f"{mean:.3f} ± {sd:.3f}"
    return text if count == expected else f"{text} (n={count})"


def markdown_table(model: str, table: dict, methods: list[str], chance: dict, expected: int) -> str:
    keys = [k for k, _, _ in SUMMARY if any(table[m][k][2] for m in methods)]
    titles = {k: f"{t} {d}" for k, t, d in SUMMARY}
    lines = [f"**{model}** (mean ± sd over {expected} phantoms)", "",
             "| method | " + " | ".join(titles[k] for k in keys) + " |",
             "| --- |" + " --- |" * len(keys)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(format_cell(*table[method][k], expected, k) for k in keys) + " |")
    if chance:
        cells = [f"{chance[k][0]:.3f}" if k in chance else "" for k in keys]
        lines.append("| *chance level* | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def self_check_errors(extras: dict) -> dict:
    """LRP's conservation and IG's completeness error (relative) from a method's extras, where it has them."""
    return {f"{key}_error": extras[key]["relative_error"] for key in ("conservation", "completeness")
            if isinstance(extras.get(key), dict) and extras[key].get("relative_error") is not None}


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def summarise_csv(path: Path) -> int:
    """Print the tables of a ``comparison_rows.csv`` (chance levels are not in it)."""
    with open(path, newline="", encoding="utf-8") as stream:
        rows = [{k: (v if k in ("model", "method") else _number(v)) for k, v in row.items()} for row in csv.DictReader(stream)]
    for role in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == role]
        seeds = sorted({r["seed"] for r in mine})
        table = {m: {k: summarise([r.get(k) for r in mine if r["method"] == m]) for k, _, _ in SUMMARY}
                 for m in dict.fromkeys(r["method"] for r in mine)}
        print(markdown_table(role, table, list(table), {}, len(seeds)))
        print()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phantoms", type=int, default=20, help="held-out phantoms (default 20)")
    parser.add_argument("--models", default="classifier,segmenter",
                        help="classifier, segmenter, attention_unet, swin_unetr (default: the first two)")
    parser.add_argument("--methods", default=None, help="comma-separated method specs (default: every registered method, demo settings)")
    parser.add_argument("--step", type=float, default=0.05, help="deletion/insertion step fraction (default 0.05)")
    parser.add_argument("--depth", default="3", help="randomisation depth: blocks from the top, or all (default 3)")
    parser.add_argument("--tolerance-mm", type=float, default=5.0)
    parser.add_argument("--road", action="store_true", help="also run 3D ROAD (off here: it doubles the run time)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="folder for per-phantom rows (CSV) and the summary (JSON, Markdown)")
    parser.add_argument("--summarise", default=None, metavar="CSV", help="only print the tables of an earlier run's comparison_rows.csv")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.summarise:
        return summarise_csv(Path(args.summarise))

    from xaioverlay.demo import ATTENTION_UNET, CLASSIFIER, SEGMENTER, SWIN_UNETR, bundle_path, demo_methods
    from xaioverlay.metrics.evaluate import MetricOptions, evaluate
    from xaioverlay.models import load_model
    from xaioverlay.phantoms import HELD_OUT_SEEDS, make_phantom

    if args.phantoms > len(HELD_OUT_SEEDS):
        parser.error(f"only {len(HELD_OUT_SEEDS)} held-out phantoms exist")
    seeds = list(HELD_OUT_SEEDS)[: args.phantoms]
    options = MetricOptions(step_fraction=args.step, randomisation_depth=None if args.depth == "all" else int(args.depth),
                            tolerance_mm=args.tolerance_mm, batch_size=8, road=args.road)
    models = {"classifier": (CLASSIFIER, "class:tumour"), "segmenter": (SEGMENTER, "channel:tumour"),
              "attention_unet": (ATTENTION_UNET, "channel:tumour"), "swin_unetr": (SWIN_UNETR, "channel:tumour")}
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in models]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(models)}")
    rows: list[dict] = []
    summaries: dict = {}
    started = time.perf_counter()
    for role in chosen:
        name, target = models[role]
        model = load_model(bundle_path(name), device=args.device)
        methods = [m.strip() for m in args.methods.split(",")] if args.methods else demo_methods(model)
        chance_values: dict[str, list[float]] = {}
        for number, seed in enumerate(seeds, start=1):
            phantom = make_phantom(seed)
            tick = time.perf_counter()
            evaluation = evaluate(model, [phantom.image], methods, target, reference_mask=phantom.tumour_mask,
                                  body_mask=phantom.brain_mask, options=options)
            for key, value in (evaluation.reference or {}).get("chance", {}).items():
                chance_values.setdefault(key, []).append(value)
            for row, result in zip(evaluation.rows(), evaluation.explanation.results):
                row.update(self_check_errors(result.extras))
                row.update({"model": role, "seed": seed,
                            "randomisation_pass": None if "randomisation_verdict" not in row else float(row["randomisation_verdict"] == "pass")})
                rows.append(row)
            print(f"{role} phantom {number}/{len(seeds)} (seed {seed}): {time.perf_counter() - tick:.0f} s, "
                  f"{time.perf_counter() - started:.0f} s in all", file=sys.stderr, flush=True)
        table = {
            method: {key: summarise([r.get(key) for r in rows if r["model"] == role and r["method"] == method]) for key, _, _ in SUMMARY}
            for method in dict.fromkeys(r["method"] for r in rows if r["model"] == role)
        }
        chance = {key: summarise(values) for key, values in chance_values.items()}
        summaries[role] = {"model": name, "target": target, "methods": table, "chance": chance}
        print()
        print(markdown_table(f"{role}: {name}, target {target}", table, list(table), chance, len(seeds)))
    print()
    print(f"{len(seeds)} held-out phantoms (seeds {seeds[0]}–{seeds[-1]}), deletion/insertion {options.step_fraction * 100:g} % steps "
          f"with the blur baseline, randomisation depth {args.depth}, pointing-game tolerance {options.tolerance_mm:g} mm; "
          f"{time.perf_counter() - started:.0f} s in all")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        fields = ["model", "seed", *dict.fromkeys(k for r in rows for k in r if k not in ("model", "seed"))]
        with open(out / "comparison_rows.csv", "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        (out / "comparison_summary.json").write_text(json.dumps(
            {"phantom_seeds": seeds, "options": vars(args), "models": summaries}, indent=2, default=str), encoding="utf-8")
        (out / "comparison.md").write_text("\n\n".join(
            markdown_table(f"{role}: {s['model']}, target {s['target']}", s["methods"], list(s["methods"]), s["chance"], len(seeds))
            for role, s in summaries.items()) + "\n", encoding="utf-8")
        print(f"wrote {out / 'comparison_rows.csv'}, comparison_summary.json, comparison.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
