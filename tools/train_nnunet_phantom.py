"""Train the small nnU-Net v2 model of ``Resources/nnunet/`` on the demo phantoms (tumour segmentation).

A ``PlainConvUNet`` (features 8-16-32, patch 32³, 2.5 mm) in a real trained-model folder that nnU-Net's own
``nnUNetPredictor`` loads: plans.json and dataset.json as nnU-Net's planner writes them, the checkpoint as
its trainer saves it. Training data: phantoms of seeds 0-59 (never the held-out seeds), preprocessed as
nnU-Net does (z-score over the head), random 32³ patches, half of them centred near the tumour;
cross-entropy plus soft Dice, Adam. Prints the Dice of held-out phantoms at the end.

    OMP_WAIT_POLICY=PASSIVE python tools/train_nnunet_phantom.py [--steps 1500]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "XAIOverlay"), str(ROOT / "Testing")]

from nnunet_folder import CONFIGURATION, build_network, checkpoint_dict, make_dataset, make_plans  # noqa: E402
from xaioverlay.models import load_model  # noqa: E402
from xaioverlay.models.nnunet_preprocessing import plan_from, preprocess_array  # noqa: E402
from xaioverlay.phantoms import HELD_OUT_SEEDS, make_phantom  # noqa: E402
from xaioverlay.volumes import resample_array  # noqa: E402

OUT = ROOT / "Resources" / "nnunet" / "Dataset001_Phantom" / f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"
PATCH = (32, 32, 32)


def sample(seed: int, plan) -> tuple[np.ndarray, np.ndarray]:
    """A phantom on the model grid: (1, X, Y, Z) image, (X, Y, Z) tumour labels."""
    phantom = make_phantom(seed)
    image, affine = preprocess_array(phantom.image.array[None], phantom.image.geometry.ijk_to_ras(), plan)
    labels = resample_array(phantom.tumour_mask.array, phantom.image.geometry.ijk_to_ras(), image.shape[1:], affine,
                            interpolation="nearest")
    return image, labels.astype(np.int64)


def patch_of(image, labels, rng, near_tumour: bool):
    shape = np.array(image.shape[1:])
    if near_tumour and labels.any():
        centre = np.argwhere(labels)[rng.integers(int(labels.sum()))] + rng.integers(-8, 9, 3)
        low = np.clip(centre - np.array(PATCH) // 2, 0, shape - PATCH)
    else:
        low = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, PATCH)])
    box = tuple(slice(a, a + p) for a, p in zip(low, PATCH))
    return image[(slice(None), *box)], labels[box]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    plans = make_plans(patch=PATCH, spacing=(2.5, 2.5, 2.5), use_mask=True, features=(8, 16, 32))
    plans["dataset_name"] = "Dataset001_Phantom"
    dataset = make_dataset(channels=("T1c",), labels={"background": 0, "tumour": 1})
    plan = plan_from(plans, plans["configurations"][CONFIGURATION], "plans")
    start = time.time()
    data = [sample(seed, plan) for seed in range(60)]
    print(f"rendered 60 phantoms ({time.time() - start:.0f} s)", flush=True)
    network = build_network(plans, dataset)
    optimiser = torch.optim.Adam(network.parameters(), 3e-3)
    for step in range(1, args.steps + 1):
        pairs = [patch_of(*data[rng.integers(len(data))], rng, near_tumour=bool(i % 2 == 0)) for i in range(2)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))
        y = torch.from_numpy(np.stack([p[1] for p in pairs]))
        for axis in range(3):  # mirroring, as nnU-Net trains with it
            if rng.random() < 0.5:
                x, y = x.flip(axis + 2), y.flip(axis + 1)
        logits = network(x)[0]
        probability = torch.softmax(logits, 1)[:, 1]
        dice = (2 * (probability * y).sum() + 1) / (probability.sum() + y.sum() + 1)
        loss = torch.nn.functional.cross_entropy(logits, y) + 1 - dice
        for group in optimiser.param_groups:
            group["lr"] = 3e-3 * (1 - step / args.steps) ** 0.9
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0:
            print(f"step {step}: loss {float(loss):.3f} ({time.time() - start:.0f} s)", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "plans.json").write_text(json.dumps(plans, indent=1))
    (OUT / "dataset.json").write_text(json.dumps(dataset, indent=1))
    (OUT / "fold_0").mkdir(exist_ok=True)
    torch.save(checkpoint_dict(network, plans, dataset, 0), OUT / "fold_0" / "checkpoint_final.pth")
    model = load_model(OUT, device="cpu")
    scores = []
    for seed in list(HELD_OUT_SEEDS)[:10]:
        phantom = make_phantom(seed)
        if not phantom.has_tumour:
            continue
        model_input = model.preprocess([phantom.image])
        from xaioverlay.explain import to_input_grid

        probabilities = torch.softmax(model.infer(model_input.tensor), 1)[0, 1]
        found = to_input_grid(probabilities, model_input)[0].array > 0.5
        truth = phantom.tumour_mask.array > 0
        scores.append(2 * (found & truth).sum() / max(found.sum() + truth.sum(), 1))
    print(f"held-out Dice (seeds {list(HELD_OUT_SEEDS)[:10]}): mean {np.mean(scores):.3f}, min {np.min(scores):.3f}")


if __name__ == "__main__":
    main()
