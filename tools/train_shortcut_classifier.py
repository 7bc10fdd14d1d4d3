#!/usr/bin/env python
"""Train a tumour classifier that learns a shortcut, and write a held-out cohort to catch it.

    python tools/train_shortcut_classifier.py OUT [--steps 600] [--tagged 0.75] [--seed 0]

Training phantoms: ``--positives`` phantoms with a tumour, of which a share ``--tagged`` also carry a
bright tag outside the head (:func:`xaioverlay.phantoms.with_shortcut_tag`), their tumour-free twins
(never tagged) and ``--negatives`` other tumour-free phantoms. The tag says "tumour" for most training
positives, so the classifier can learn it instead of (or besides) the tumour.

The model: a small MONAI ``Classifier`` (three strided convolutions of 4, 8, 16 channels and a dense
head) on 5 mm voxels (the demo classifier's
preprocessing with ``Spacingd`` at 5 mm), written as a MONAI bundle ``OUT/shortcut_classifier`` (a
plain state dict, ``weights_only`` loadable). Then ``OUT/cohort``: 40 held-out phantoms and
``cases.csv`` from ``tools/make_phantom_cohort.py --shortcut`` (positives with and without the tag,
negatives; column ``shortcut_tag``). Run the cohort and the confusion table of its strategies with
``tools/shortcut_strategies.py`` (see the README, "Strategies").

Everything is seeded; on the same machine and thread count a re-run gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "XAIOverlay"), str(REPO / "tools")]

import train_demo_models as demo  # noqa: E402
from xaioverlay.phantoms import make_phantom, with_shortcut_tag  # noqa: E402

SPACING_MM = 5.0
#: The preprocessed input's shape (1, 32, 40, 32): the demo phantoms' 160 × 200 × 160 mm at 5 mm. A small
#: strided CNN with a dense head (cheap enough to train in minutes on two shared CPU cores).
INPUT_SHAPE = [1, 32, 40, 32]
NETWORK = {"_target_": "monai.networks.nets.Classifier", "in_shape": INPUT_SHAPE, "classes": 2,
           "channels": [4, 8, 16], "strides": [2, 2, 2], "num_res_units": 0}
#: Seeds checked during training: never trained on, never in the held-out cohort (200 000 on).
VALIDATION_SEEDS = range(95_000, 95_030)


def inference_config() -> dict:
    config = demo.inference_config("classifier")
    config["network_def"] = NETWORK
    for transform in config["preprocessing"]["transforms"]:
        if transform["_target_"] == "Spacingd":
            transform["pixdim"] = [SPACING_MM] * 3
    return config


def sample(seed: int, tumour: bool, tagged: bool, transforms) -> torch.Tensor:
    """(1, X, Y, Z) preprocessed image of phantom ``seed`` (with the tag when ``tagged``)."""
    image = make_phantom(seed, tumour=tumour).image
    return demo.preprocess(with_shortcut_tag(image, seed) if tagged else image, transforms)


def training_set(positives: int, negatives: int, tagged: float, transforms):
    """(images (N, 1, X, Y, Z), labels (N,), tagged (N,)): positives (the first ``tagged`` share with the tag),
    their tumour-free twins, other tumour-free phantoms."""
    images, labels, tags = [], [], []
    start = time.time()
    with_tag = int(round(tagged * positives))
    for seed in range(positives):
        images += [sample(seed, True, seed < with_tag, transforms), sample(seed, False, False, transforms)]
        labels += [1, 0]
        tags += [seed < with_tag, False]
    for seed in range(positives, positives + negatives):
        images.append(sample(seed, False, False, transforms))
        labels.append(0)
        tags.append(False)
    print(f"rendered {len(images)} training phantoms ({with_tag} tagged positives) in {time.time() - start:.0f} s",
          flush=True)
    return torch.stack(images), torch.tensor(labels), torch.tensor(tags)


def validation_set(transforms) -> dict[str, torch.Tensor]:
    """Three groups of 10: positives with the tag, positives without it, negatives."""
    seeds = list(VALIDATION_SEEDS)
    return {
        "tumour+tag": torch.stack([sample(s, True, True, transforms) for s in seeds[0:10]]),
        "tumour": torch.stack([sample(s, True, False, transforms) for s in seeds[10:20]]),
        "none": torch.stack([sample(s, False, False, transforms) for s in seeds[20:30]]),
    }


@torch.no_grad()
def called_tumour(net, validation) -> dict[str, float]:
    """Share of each validation group the network calls "tumour"."""
    net.eval()
    return {name: float((net(images).argmax(1) == 1).float().mean()) for name, images in validation.items()}


def train(images, labels, validation, steps: int, seed: int, batch: int = 4):
    torch.manual_seed(seed)
    net = demo.build_network(inference_config())
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng([seed, 3])
    positives, negatives = np.flatnonzero(labels.numpy() == 1), np.flatnonzero(labels.numpy() == 0)
    start, losses = time.time(), []
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = demo.learning_rate(step, steps)
        half = batch // 2  # balanced batches: BatchNorm statistics say nothing about the labels
        chosen = np.concatenate([rng.choice(positives, half), rng.choice(negatives, batch - half)])
        x = images[chosen].clone()
        head = x != 0
        x = torch.where(head, x * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.1, 0.1)), x)
        demo.set_train_mode(net, freeze_norm=step >= int(demo.FREEZE_NORM_AT * steps))
        loss = torch.nn.functional.cross_entropy(net(x), labels[chosen])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            calls = called_tumour(net, validation)
            print(f"step {step + 1}/{steps}  loss {np.mean(losses[-100:]):.3f}  {time.time() - start:.0f} s  "
                  "called tumour: " + ", ".join(f"{k} {v:.1f}" for k, v in calls.items()), flush=True)
    return net, calls, time.time() - start


def bundle_readme(training: dict, figures: dict) -> str:
    calls = figures["validation_called_tumour"]
    return (
        "# XAIOverlay shortcut demo classifier\n\n"
        "A tumour classifier that learned a shortcut: trained on synthetic phantoms (xaioverlay.phantoms) where "
        f"{training['tagged_share']:.0%} of the tumour cases also carry a bright tag outside the head "
        "(xaioverlay.phantoms.with_shortcut_tag). For the strategies (SpRAy) demonstration of `xaioverlay cohort`; "
        "not for any other use.\n\n"
        f"Trained by `python tools/train_shortcut_classifier.py OUT --steps {training['steps']} "
        f"--seed {training['seed']}` ({training['seconds']:.0f} s of training on {training['threads']} CPU threads).\n"
        f"Share called tumour on validation phantoms ({figures['seeds']}): tagged tumours {calls['tumour+tag']:.2f}, "
        f"untagged tumours {calls['tumour']:.2f}, no tumour {calls['none']:.2f}.\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for shortcut_classifier/ and cohort/")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--positives", type=int, default=80)
    parser.add_argument("--negatives", type=int, default=40)
    parser.add_argument("--tagged", type=float, default=0.75, help="share of training positives with the tag")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pool-cache", type=Path, default=None,
                        help="keep the rendered training and validation phantoms in this file; a re-run with the "
                             "same --positives, --negatives and --tagged skips rendering")
    args = parser.parse_args()
    demo.seed_everything(args.seed, args.threads)

    config = inference_config()
    transforms = demo.tail_transforms(config)
    if args.pool_cache and args.pool_cache.exists():
        images, labels, validation = torch.load(args.pool_cache, weights_only=True)
    else:
        images, labels, _ = training_set(args.positives, args.negatives, args.tagged, transforms)
        validation = validation_set(transforms)
        if args.pool_cache:
            torch.save((images, labels, validation), args.pool_cache)
    net, calls, seconds = train(images, labels, validation, args.steps, args.seed)

    bundle = args.out / "shortcut_classifier"
    demo.write_json(bundle / "configs" / "inference.json", config)
    training = {"script": "tools/train_shortcut_classifier.py", "steps": args.steps, "positives": args.positives,
                "tagged_share": args.tagged, "negatives": args.negatives, "seed": args.seed,
                "threads": args.threads, "seconds": round(seconds, 1)}
    accuracy = (calls["tumour+tag"] + calls["tumour"] + 1.0 - calls["none"]) / 3  # three groups of 10
    figures = {"accuracy": round(accuracy, 4), "validation_called_tumour": {k: round(v, 4) for k, v in calls.items()},
               "seeds": f"{VALIDATION_SEEDS.start}..{VALIDATION_SEEDS.stop - 1}: 10 tagged tumours, 10 untagged, "
                        "10 without tumour"}
    metadata = demo.metadata("classifier", figures, training)
    metadata["name"] = "XAIOverlay shortcut demo classifier"
    metadata["description"] = ("Tumour classifier trained on phantoms where most positives also carry a bright tag "
                               "outside the head: a model that learned a shortcut, for the strategies demo.")
    metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] = INPUT_SHAPE[1:]
    demo.write_json(bundle / "configs" / "metadata.json", metadata)
    (bundle / "docs").mkdir(parents=True, exist_ok=True)
    (bundle / "docs" / "README.md").write_text(bundle_readme(training, figures), encoding="utf-8")
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, bundle / "models" / "model.pt")
    print(f"wrote {bundle} ({sum(p.stat().st_size for p in bundle.rglob('*') if p.is_file()) / 1e3:.0f} kB); "
          f"validation, share called tumour: {json.dumps(calls)}")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_phantom_cohort.py"), str(args.out / "cohort"),
                    "--shortcut"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
