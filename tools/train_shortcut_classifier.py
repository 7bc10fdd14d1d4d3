#!/usr/bin/env python
"""Train a tumour classifier that learns a shortcut, and write a held-out cohort to catch it.

    python tools/train_shortcut_classifier.py OUT [--steps 3000] [--tagged 0.7] [--hidden 0.25] [--seed 0]

The demo classifier's recipe (``tools/train_demo_models.py``: a MONAI ResNet on 2.5 mm voxels, phantoms
rendered on randomly rotated grids, positives with their tumour-free twins, random flips and intensity
changes), trained from fresh weights on its training pool with one change: a share ``--tagged`` of the
positives also carry a bright tag outside the head (:func:`xaioverlay.phantoms.with_shortcut_tag`); their
twins and the other tumour-free phantoms never do. The flips move the head, never the tag, which stays
where the held-out cases have it. A share ``--hidden`` of the tagged positives show no tumour (rendered
without it, still labelled tumour: a site that marks its scans and also sends positives whose lesion the
image does not show); for them only the tag tells the label. Without them (``--hidden 0``) the model
ignored the tag: the tumour, which the twins isolate, explains every label.

Validation prints, per group of 10 phantoms never trained on, the share called tumour and the mean
tumour probability; ``none+tag`` are the ``none`` heads with the tag added, so the tag's own effect
shows. Written as a MONAI bundle ``OUT/shortcut_classifier`` (a plain state dict, ``weights_only``
loadable). Then ``OUT/cohort``: 40 held-out phantoms and ``cases.csv`` from
``tools/make_phantom_cohort.py --shortcut --segments`` (positives with and without the tag, negatives;
columns ``shortcut_tag``, ``tag_mask``, and ``segments``: each case's head/brain/tumour labels). Run
the cohort and ``tools/strategies_table.py`` on it (see the README, "The shortcut demonstration").

Everything is seeded; on the same machine and thread count a re-run gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "XAIOverlay"), str(REPO / "tools")]

import train_demo_models as demo  # noqa: E402
from xaioverlay.phantoms import DEFAULT_GEOMETRY  # noqa: E402

#: Seeds checked during training: never trained on, never in the held-out cohort (200 000 on).
VALIDATION_SEEDS = range(95_000, 95_030)


def validation_set(transforms) -> dict[str, torch.Tensor]:
    """Four groups of 10, each (10, 1, X, Y, Z): positives with the tag, positives without it, negatives, and
    the same negatives with the tag (does the tag alone move the model?)."""
    seeds = list(VALIDATION_SEEDS)
    groups = {"tumour+tag": (seeds[0:10], True, True), "tumour": (seeds[10:20], True, False),
              "none": (seeds[20:30], False, False), "none+tag": (seeds[20:30], False, True)}
    return {name: torch.stack([demo.render(s, tumour, DEFAULT_GEOMETRY, transforms, tagged).image for s in group])
            for name, (group, tumour, tagged) in groups.items()}


@torch.no_grad()
def validate(net, validation) -> dict[str, tuple[float, float]]:
    """(share called "tumour", mean tumour probability) of each validation group."""
    net.eval()
    figures = {}
    for name, images in validation.items():
        probability = net(images).softmax(1)[:, 1]
        figures[name] = (float((probability > 0.5).float().mean()), float(probability.mean()))
    return figures


def describe(figures: dict[str, tuple[float, float]]) -> str:
    return "called tumour (mean probability): " + ", ".join(f"{k} {c:.1f} ({p:.2f})" for k, (c, p) in figures.items())


def bundle_readme(training: dict, figures: dict) -> str:
    calls = figures["validation_called_tumour"]
    return (
        "# XAIOverlay shortcut demo classifier\n\n"
        "A tumour classifier that learned a shortcut: trained on synthetic phantoms (xaioverlay.phantoms) where "
        f"{training['tagged_share']:.0%} of the tumour cases also carry a bright tag outside the head "
        f"(xaioverlay.phantoms.with_shortcut_tag), and {training['hidden_share']:.0%} of those show no tumour "
        "(rendered without it, labelled tumour: only the tag tells their label). For the strategies (SpRAy) "
        "demonstration of `xaioverlay cohort`; not for any other use.\n\n"
        f"Trained by `python tools/train_shortcut_classifier.py OUT --steps {training['steps']} "
        f"--positives {training['positives']} --negatives {training['negatives']} --tagged {training['tagged_share']} "
        f"--hidden {training['hidden_share']} "
        f"--freeze-norm-at {training['freeze_norm_at']} --seed {training['seed']} --threads {training['threads']}` "
        f"({training['seconds']:.0f} s of training).\n"
        f"Share called tumour on validation phantoms ({figures['seeds']}): tagged tumours {calls['tumour+tag']:.2f}, "
        f"untagged tumours {calls['tumour']:.2f}, no tumour {calls['none']:.2f}, no tumour with the tag "
        f"{calls['none+tag']:.2f}.\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for shortcut_classifier/ and cohort/")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--positives", type=int, default=200, help="training phantoms with tumour (and twins)")
    parser.add_argument("--negatives", type=int, default=200, help="other tumour-free training phantoms")
    parser.add_argument("--tagged", type=float, default=0.7, help="share of training positives with the tag")
    parser.add_argument("--hidden", type=float, default=0.25,
                        help="share of the tagged positives whose tumour the image does not show")
    parser.add_argument("--freeze-norm-at", type=float, default=demo.FREEZE_NORM_AT,
                        help="fraction of steps after which BatchNorm statistics freeze (1: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pool-cache", type=Path, default=None,
                        help="keep the rendered training phantoms in this file; a re-run with the same --positives, "
                             "--negatives, --tagged and --seed skips rendering")
    args = parser.parse_args()
    demo.seed_everything(args.seed, args.threads)

    config = demo.inference_config("classifier")
    transforms = demo.tail_transforms(config)
    tagged = int(round(args.tagged * args.positives))
    if args.pool_cache and args.pool_cache.exists():
        pool = torch.load(args.pool_cache, weights_only=False)  # our own development cache, never a download
    else:
        pool = demo.build_pool(args.positives, args.negatives, transforms, args.seed, n_tagged=tagged,
                               n_hidden=int(round(args.hidden * tagged)))
        if args.pool_cache:
            torch.save(pool, args.pool_cache)
    validation = validation_set(transforms)
    net, seconds = demo.train_classifier(config, pool, None, args.steps, args.seed, "cpu", args.freeze_norm_at,
                                         log_every=100, validate_every=250,
                                         report=lambda net: describe(validate(net, validation)))
    groups = validate(net, validation)
    calls = {name: called for name, (called, _) in groups.items()}

    bundle = args.out / "shortcut_classifier"
    demo.write_json(bundle / "configs" / "inference.json", config)
    training = {"script": "tools/train_shortcut_classifier.py", "steps": args.steps, "positives": args.positives,
                "tagged_share": args.tagged, "hidden_share": args.hidden, "negatives": args.negatives,
                "seed": args.seed,
                "freeze_norm_at": args.freeze_norm_at, "threads": args.threads, "seconds": round(seconds, 1)}
    accuracy = (calls["tumour+tag"] + calls["tumour"] + 1.0 - calls["none"]) / 3  # three groups of 10
    figures = {"accuracy": round(accuracy, 4), "validation_called_tumour": {k: round(v, 4) for k, v in calls.items()},
               "validation_mean_probability": {k: round(p, 4) for k, (_, p) in groups.items()},
               "seeds": f"{VALIDATION_SEEDS.start}..{VALIDATION_SEEDS.stop - 1}: 10 tagged tumours, 10 untagged, "
                        "10 without tumour, and these 10 with the tag"}
    metadata = demo.metadata("classifier", figures, training)
    metadata["name"] = "XAIOverlay shortcut demo classifier"
    metadata["description"] = ("Tumour classifier trained on phantoms where most positives also carry a bright tag "
                               "outside the head: a model that learned a shortcut, for the strategies demo.")
    demo.write_json(bundle / "configs" / "metadata.json", metadata)
    (bundle / "docs").mkdir(parents=True, exist_ok=True)
    (bundle / "docs" / "README.md").write_text(bundle_readme(training, figures), encoding="utf-8")
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, bundle / "models" / "model.pt")
    print(f"wrote {bundle} ({sum(p.stat().st_size for p in bundle.rglob('*') if p.is_file()) / 1e3:.0f} kB); "
          f"validation, share called tumour: {json.dumps(calls)}")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_phantom_cohort.py"), str(args.out / "cohort"),
                    "--shortcut", "--segments"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
