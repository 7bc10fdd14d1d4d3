#!/usr/bin/env python
"""Train a small AttentionUnet and a small SwinUNETR tumour segmenter on the demo phantoms, as MONAI bundles.

    python tools/train_attention_models.py --which both --out Resources/bundles

- ``tumour_attention_unet``: MONAI ``AttentionUnet`` (channels 8–64, BatchNorm, attention gates on every
  skip connection), the model whose gates the ``attention`` method reads;
- ``tumour_swin_unetr``: MONAI ``SwinUNETR`` (feature size 12, 3D shifted-window attention, 4³ windows),
  the transformer that LRP's attention rules and Swin rollout are checked on.

Same task, data, preprocessing and sliding-window inference as the demo segmenter
(``tools/train_demo_models.py``, whose data, augmentation, training loop, evaluation and bundle writer
this reuses); the network, the number of steps and the learning rate differ, and training runs on 32³
crops that hold a tumour voxel (the demo: 64³), which keeps each training to minutes on two loaded CPU
cores rather than the demo's 40.
SwinUNETR's weights are stored as float16 (4.1 M parameters would take 16 MB as float32; the bundle limit
is 10 MB); the engine loads them into the float32 network, and the held-out Dice in ``metadata.json``
is measured through the written bundle, rounding included.

Seeded; a re-run on the same machine and thread count reproduces the recorded figures.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_demo_models as demo  # noqa: E402

from xaioverlay.demo import ATTENTION_UNET, SWIN_UNETR  # noqa: E402

#: Training crops: 32³ (an eighth of the 64³ inference window: what makes CPU training take minutes), each
#: holding a tumour voxel where its phantom has one. Inference runs on 64³ windows like the demo segmenter.
#: (SwinUNETR's bottleneck is then 1³, so it takes BatchNorm: InstanceNorm cannot normalise one voxel.)
CROP = (32, 32, 32)
#: name → (network_def, training steps, crop batch, peak learning rate, weights dtype, one-line description)
MODELS = {
    ATTENTION_UNET: (
        {
            "_target_": "monai.networks.nets.AttentionUnet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,
            "channels": [8, 16, 32, 64],
            "strides": [2, 2, 2],
        },
        600, 4, 2e-3, None,
        "MONAI AttentionUnet (channels 8-64, BatchNorm, additive attention gates on each skip connection)",
    ),
    SWIN_UNETR: (
        {
            "_target_": "monai.networks.nets.SwinUNETR",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,
            "feature_size": 12,
            "depths": [2, 2, 2, 2],
            "num_heads": [3, 6, 12, 24],
            "window_size": 4,
            "norm_name": "batch",
        },
        600, 2, 1e-3, torch.float16,
        "MONAI SwinUNETR (feature size 12, depths 2-2-2-2, 4^3 shifted windows, BatchNorm decoder)",
    ),
}
#: Phantom seeds 0 .. PAIRS-1 are rendered with a tumour and as tumour-free twins for training.
PAIRS = 40
VALIDATION = 5


def inference_config(name: str) -> dict:
    """The demo segmenter's inference config with this model's network."""
    config = demo.inference_config("segmenter")
    config["network_def"] = dict(MODELS[name][0])
    return config


def metadata(name: str, figures: dict, training: dict) -> dict:
    meta = demo.metadata("segmenter", figures, training)
    description = MODELS[name][5]
    meta.update(
        name="XAIOverlay " + name.replace("_", " "),
        changelog={"0.1.0": "first version, trained by tools/train_attention_models.py"},
        description=(
            f"Tumour segmenter for explanation tests of attention and transformer models: {description}. Same "
            "task, phantoms, preprocessing and 64^3 sliding-window inference as the demo tumour segmenter. Trained "
            "only on xaioverlay.phantoms; for explanation demos and tests, not for clinical use."
        ),
    )
    return meta


def write_readme(bundle: Path, name: str, figures: dict, training: dict) -> None:
    net = MODELS[name][0]
    args = ", ".join(f"{k}={json.dumps(v)}" for k, v in net.items() if k != "_target_")
    text = f"""# XAIOverlay {name.replace("_", " ")}

{MODELS[name][5]}, trained **only on synthetic phantoms** (`xaioverlay.phantoms`) to segment the tumour
(necrotic core and enhancing rim), so XAIOverlay's attention and transformer explanations have a trained
model to be checked on. Not for clinical or research use. Data, preprocessing and inference as the demo
`tumour_segmenter` (see its README).

## Model
`{net["_target_"]}({args})`; weights are a plain state dict (`torch.load(models/model.pt, weights_only=True)`),
stored as {training["weights_dtype"]}.

## Results (measured by `tools/train_attention_models.py` through this bundle)
- Held-out Dice (tumour = core ∪ enhancing rim): **{figures['dice']:.3f}** mean, {figures['dice_min']:.3f} worst,
  on {figures['n_phantoms']} phantoms ({figures['seeds']}).
- Tumour-free twins of those phantoms with any voxel called tumour: {figures['tumour_free_twins_with_false_positives']}
  of {figures['n_phantoms']} (median {figures['false_positive_voxels_median']:.0f} voxels).

## Training
`{training["command"]}` — {training["steps"]} steps, seed {training["seed"]}, {training["threads"]} CPU threads,
{training["training_seconds"]} s; {training["optimiser"]}; loss {training["loss"]}; batch: {training["batch"]}.
"""
    (bundle / "docs").mkdir(parents=True, exist_ok=True)
    (bundle / "docs" / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--which", choices=[ATTENTION_UNET, SWIN_UNETR, "both"], default="both")
    parser.add_argument("--out", type=Path, default=demo.REPO / "Resources" / "bundles")
    parser.add_argument("--steps", type=int, default=None, help="default: 600 for each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (figures are reproducible per count)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--held-out", type=int, default=20, help="how many HELD_OUT_SEEDS to evaluate on")
    args = parser.parse_args(argv)
    names = [ATTENTION_UNET, SWIN_UNETR] if args.which == "both" else [args.which]

    demo.seed_everything(args.seed, args.threads)
    transforms = demo.tail_transforms(inference_config(names[0]))
    start = time.time()
    pool = demo.build_pool(PAIRS, 0, transforms, args.seed)
    seeds = demo.VALIDATION_SEEDS[:VALIDATION]
    validation = ([demo.render(s, True, demo.DEFAULT_GEOMETRY, transforms) for s in seeds], [], [])
    print(f"data ready in {time.time() - start:.0f} s", flush=True)
    for name in names:
        network_def, default_steps, batch, peak_lr, dtype, _ = MODELS[name]
        steps = args.steps or default_steps
        inference = inference_config(name)
        print(f"training {name} for {steps} steps", flush=True)
        net, seconds = demo.train_segmenter(
            inference, pool, validation, steps, args.seed, args.device, demo.FREEZE_NORM_AT,
            validate_every=100, roi_size=CROP, batch_size=batch, peak_lr=peak_lr, centre_on_tumour=True,
        )
        bundle = demo.write_bundle(args.out, name, inference, net, dtype=dtype)
        print(f"evaluating the written bundle {bundle} on {args.held_out} held-out seeds", flush=True)
        figures = demo.evaluate_segmenter(bundle, args.device, args.held_out)
        command = f"python tools/train_attention_models.py --which {name} --steps {steps} --seed {args.seed} " \
            f"--threads {args.threads} --device {shlex.quote(args.device)} --held-out {args.held_out}"
        training = {
            "steps": steps,
            "seed": args.seed,
            "command": command,
            "training_seconds": round(seconds),
            "threads": args.threads,
            "device": args.device,
            "optimiser": f"Adam, lr {peak_lr:g} for 60 % of steps then cosine decay to 1 % of it; BatchNorm "
            "statistics (where the network has them) frozen for the last 40 %",
            "batch": f"{batch} random 32x32x32 crops, 5/6 from phantoms with a tumour and holding a tumour voxel",
            "loss": "DiceCE (batch Dice)",
            "data": f"phantom seeds 0..{PAIRS - 1} with tumour and as tumour-free twins, each rendered on the "
            "default grid rotated up to 12 deg and shifted up to 6 mm; random flips on all axes and intensity "
            "scale/shift per crop",
            "norm": "batch" if name == ATTENTION_UNET else "batch (convolutional blocks), layer (transformer)",
            "weights_dtype": str(dtype or torch.float32).replace("torch.", ""),
            "versions": {"torch": torch.__version__, "monai": demo.monai.__version__, "numpy": np.__version__},
        }
        demo.write_json(bundle / "configs" / "metadata.json", metadata(name, figures, training))
        write_readme(bundle, name, figures, training)
        size = demo.bundle_size(bundle)
        print(f"{name}: held-out {json.dumps(figures)}", flush=True)
        print(f"{name}: trained in {seconds:.0f} s; bundle {size / 1e6:.2f} MB at {bundle}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
