#!/usr/bin/env python
"""Train the two demo models on synthetic phantoms and write them as MONAI bundles.

    python tools/train_demo_models.py --which both --out Resources/bundles

- ``tumour_classifier``: MONAI ResNet, "no tumour" / "tumour", trained on phantoms with a tumour,
  their tumour-free twins (same seed, ``tumour=False``) and tumour-free phantoms of other seeds.
- ``tumour_segmenter``: MONAI UNet (BatchNorm), background / tumour (necrotic core ∪ enhancing rim).

Each bundle gets ``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt`` (a plain
state dict) and ``docs/README.md``. Training inputs go through the bundle's own preprocessing (every
transform after ``LoadImaged``, applied to a MetaTensor that carries the phantom's voxel → RAS affine),
so training and inference cannot drift apart. Held-out figures are measured through the written
bundle (config parsed by ``monai.bundle.ConfigParser``, weights loaded with ``weights_only=True``) on
``xaioverlay.phantoms.HELD_OUT_SEEDS`` and recorded in ``metadata.json``.

Everything is seeded; on the same machine and thread count a re-run reproduces the recorded figures.
Rotation augmentation is done by rendering training phantoms on randomly rotated and shifted grids
(the phantoms are analytic, so this needs no interpolation); flips and intensity changes are applied
per batch.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "XAIOverlay"))

import monai  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.data import MetaTensor  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from monai.transforms import Compose  # noqa: E402

from xaioverlay.phantoms import DEFAULT_GEOMETRY, HELD_OUT_SEEDS, make_phantom, with_shortcut_tag  # noqa: E402
from xaioverlay.volumes import Geometry, Volume  # noqa: E402

#: Seeds watched during training (never the held-out ones, never trained on).
VALIDATION_SEEDS = range(90_000, 90_040)
SPACING_MM = 2.5
ROI_SIZE = (64, 64, 64)
CLASSIFIER_CLASSES = ["no tumour", "tumour"]
SEGMENTER_CHANNELS = ["background", "tumour"]

CLASSIFIER_NET = {
    "_target_": "monai.networks.nets.ResNet",
    "block": "basic",
    "layers": [1, 1, 1, 1],
    "block_inplanes": [8, 16, 32, 64],
    "spatial_dims": 3,
    "n_input_channels": 1,
    "num_classes": 2,
    "conv1_t_size": 7,
    "conv1_t_stride": 2,
    "no_max_pool": True,
    # Not in place: backward hooks (Grad-CAM, LRP) fail on in-place activations.
    "act": ["relu", {"inplace": False}],
}
SEGMENTER_NET = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2],
    "num_res_units": 2,
    "norm": "batch",
}


# ------------------------------------------------------------------------------------------ configs


def preprocessing_config() -> dict:
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [SPACING_MM] * 3, "mode": "bilinear"},
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True},
            {"_target_": "EnsureTyped", "keys": "image"},
        ],
    }


def inference_config(which: str) -> dict:
    if which == "classifier":
        network_def = CLASSIFIER_NET
        inferer = {"_target_": "SimpleInferer"}
        post = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    else:
        network_def = SEGMENTER_NET
        inferer = {"_target_": "SlidingWindowInferer", "roi_size": list(ROI_SIZE), "sw_batch_size": 1, "overlap": 0.25}
        post = [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        ]
    return {
        "imports": ["$import torch", "$import monai"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": preprocessing_config(),
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": post},
    }


def metadata(which: str, figures: dict, training: dict) -> dict:
    classifier = which == "classifier"
    versions = {
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
    }
    inputs = {
        "image": {
            "type": "image",
            "format": "magnitude",
            "modality": "MR",
            "num_channels": 1,
            "spatial_shape": list(DEFAULT_GEOMETRY.size) if classifier else list(ROI_SIZE),
            "dtype": "float32",
            "value_range": [],
            "is_patch_data": not classifier,
            "channel_def": {"0": "T1c-like MR (synthetic phantom)"},
        }
    }
    if classifier:
        outputs = {
            "pred": {
                "type": "probabilities",
                "format": "classes",
                "num_channels": 2,
                "spatial_shape": [2],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": False,
                "channel_def": {"0": CLASSIFIER_CLASSES[0], "1": CLASSIFIER_CLASSES[1]},
            }
        }
        description = (
            "Demo 3D classifier: does a synthetic head-MRI phantom hold a tumour (dark necrotic core with an "
            "enhancing rim)? Bright solid decoy blobs are present in every phantom, so brightness alone does not "
            "answer. Trained only on xaioverlay.phantoms; for explanation demos and tests, not for clinical use."
        )
        task = "Tumour presence classification on synthetic head MRI phantoms"
    else:
        outputs = {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": 2,
                "spatial_shape": list(ROI_SIZE),
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {"0": SEGMENTER_CHANNELS[0], "1": SEGMENTER_CHANNELS[1]},
            }
        }
        description = (
            "Demo 3D segmenter: tumour (necrotic core and enhancing rim, not oedema) in synthetic head-MRI "
            "phantoms that also hold bright solid decoys. MONAI UNet with BatchNorm, sliding-window inference "
            "(64^3 windows). Trained only on xaioverlay.phantoms; for explanation demos and tests, not for clinical use."
        )
        task = "Tumour segmentation on synthetic head MRI phantoms"
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "first demo model, trained by tools/train_demo_models.py"},
        **versions,
        "required_packages_version": {},
        "supported_apps": {},
        "name": "XAIOverlay demo " + ("tumour classifier" if classifier else "tumour segmenter"),
        "task": task,
        "description": description,
        "authors": "XAIOverlay contributors",
        "copyright": "Copyright (c) XAIOverlay contributors; Apache-2.0",
        "data_source": "synthetic: xaioverlay.phantoms.make_phantom (analytic head phantoms, no patient data)",
        "data_type": "float32 volumes, 2.5 mm isotropic after preprocessing",
        "image_classes": "single channel T1c-like MR intensity",
        "label_classes": (
            "0 no tumour, 1 tumour" if classifier else "0 background, 1 tumour (necrotic core and enhancing rim)"
        ),
        "pred_classes": "softmax over [no tumour, tumour]" if classifier else "argmax over [background, tumour]",
        "eval_metrics": {"accuracy" if classifier else "mean_dice": figures["accuracy" if classifier else "dice"]},
        "intended_use": "Demonstrations and tests of XAIOverlay only; not for any clinical or research diagnosis.",
        "references": [],
        "network_data_format": {"inputs": inputs, "outputs": outputs},
        "xaioverlay": {
            "task": "classification" if classifier else "segmentation",
            "held_out": figures,
            "training": training,
        },
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# -------------------------------------------------------------------------------------------- data


def tail_transforms(inference: dict) -> Compose:
    """The bundle's preprocessing without ``LoadImaged`` (inputs are in memory already)."""
    parser = ConfigParser({"preprocessing": inference["preprocessing"]})
    compose = parser.get_parsed_content("preprocessing")
    first = compose.transforms[0]
    assert type(first).__name__ == "LoadImaged", first
    return Compose(compose.transforms[1:])


def as_loaded(volume: Volume) -> MetaTensor:
    """What ``LoadImaged`` would give for ``volume``: array [i, j, k] with its voxel → RAS affine."""
    return MetaTensor(
        torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32)),
        affine=torch.from_numpy(volume.geometry.ijk_to_ras()),
        meta={"original_channel_dim": "no_channel", "space": "RAS"},
    )


def preprocess(volume: Volume, transforms: Compose) -> torch.Tensor:
    """(1, ni, nj, nk) float32 model input for ``volume``."""
    return transforms({"image": as_loaded(volume)})["image"].as_tensor().float()


def rotated_grid(rng: np.random.Generator, max_degrees: float = 12.0, max_shift_mm: float = 6.0) -> Geometry:
    """The default grid rotated by up to ``max_degrees`` about a random axis and shifted a little.

    Rendering a phantom on it and reading the array as RAS-aligned shows a rotated, shifted head.
    """
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0.0, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    size = np.array(DEFAULT_GEOMETRY.size)
    centre = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    affine = np.eye(4)
    affine[:3, :3] = rotation * SPACING_MM
    affine[:3, 3] = centre - affine[:3, :3] @ ((size - 1) / 2)
    return Geometry.from_ijk_to_ras(affine, size)


@dataclass
class Sample:
    image: torch.Tensor  # (1, ni, nj, nk) float32, preprocessed
    mask: torch.Tensor  # (ni, nj, nk) uint8 tumour mask
    label: int  # 1 tumour, 0 none
    seed: int
    #: (ni, nj, nk) bool or None: voxels that flips leave in place (a shortcut tag outside the head).
    fixed: torch.Tensor | None = None


def render(seed: int, tumour: bool, geometry: Geometry, transforms: Compose, tagged: bool = False,
           label: int | None = None) -> Sample:
    """Phantom ``seed`` on ``geometry``, preprocessed; with ``tagged``, with its shortcut tag painted outside the head.
    ``label`` defaults to whether the tumour is rendered."""
    phantom = make_phantom(seed, tumour=tumour, geometry=geometry)
    raw = with_shortcut_tag(phantom.image, seed) if tagged else phantom.image
    # the tag's voxels, found before preprocessing (it normalises the array in place)
    fixed = torch.from_numpy(raw.array != phantom.image.array) if tagged else None
    image = preprocess(raw, transforms)
    assert tuple(image.shape[1:]) == geometry.size, "preprocessing changed the training grid"
    label = int(tumour) if label is None else label
    return Sample(image, torch.from_numpy(phantom.tumour_mask.array), label, seed, fixed)


def build_pool(n_pairs: int, n_negatives: int, transforms: Compose, seed: int, n_tagged: int = 0, n_hidden: int = 0):
    """Training phantoms on random rotated grids: (positives, their twins, tumour-free others).

    Seeds 0 .. n_pairs-1 give a positive and its tumour-free twin (same grid); seeds n_pairs ..
    n_pairs+n_negatives-1 give tumour-free phantoms. None of them is a validation or held-out seed.
    The first ``n_tagged`` positives carry the shortcut tag (their twins do not), and the first ``n_hidden`` of
    those are positives whose tumour the image does not show (rendered without it, labelled tumour: only the
    tag tells them from their twins). The grids do not depend on either.
    """
    assert n_hidden <= n_tagged <= n_pairs
    rng = np.random.default_rng([seed, 1])
    forbidden = set(HELD_OUT_SEEDS) | set(VALIDATION_SEEDS)
    assert not forbidden & set(range(n_pairs + n_negatives))
    positives, twins, negatives = [], [], []
    start = time.time()
    for s in range(n_pairs + n_negatives):
        grid = rotated_grid(rng)
        if s < n_pairs:
            positives.append(render(s, s >= n_hidden, grid, transforms, tagged=s < n_tagged, label=1))
            twins.append(render(s, False, grid, transforms))
        else:
            negatives.append(render(s, False, grid, transforms))
        if (s + 1) % 100 == 0:
            print(f"  rendered {s + 1}/{n_pairs + n_negatives} training seeds ({time.time() - start:.0f} s)", flush=True)
    return positives, twins, negatives


def augment(batch: torch.Tensor, masks: torch.Tensor | None, rng: np.random.Generator, groups: list[list[int]],
            fixed: list[torch.Tensor | None] | None = None):
    """Random flips (all three axes) and intensity scale/shift inside the head, shared within each group.

    ``batch``: (B, 1, ni, nj, nk); ``masks``: (B, ni, nj, nk) or None. Twins share a group so they
    stay identical outside the tumour. ``fixed``: per case None or an (ni, nj, nk) bool mask of voxels
    outside the head that the flips leave where they are (a shortcut tag stays where held-out cases have it).
    """
    batch = batch.clone()
    masks = None if masks is None else masks.clone()
    for group in groups:
        flips = [axis for axis in (1, 2, 3) if rng.random() < 0.5]
        scale, shift = rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1)
        for index in group:
            image = batch[index]
            if flips:
                keep = None if fixed is None else fixed[index]
                image = torch.flip(image if keep is None else torch.where(keep, 0.0, image), flips)
                if keep is not None:
                    image = torch.where(keep, batch[index], image)
                if masks is not None:
                    masks[index] = torch.flip(masks[index], [a - 1 for a in flips])
            head = image != 0
            batch[index] = torch.where(head, image * scale + shift, image)
    return batch, masks


def learning_rate(step: int, steps: int, peak: float = 1e-3) -> float:
    """Constant for 60 % of the steps, then cosine decay to 1 % of the peak."""
    hold = int(0.6 * steps)
    if step < hold:
        return peak
    progress = (step - hold) / max(1, steps - hold)
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------ models


def seed_everything(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)


#: Default fraction of training after which BatchNorm statistics are frozen (layers in eval mode), so
#: the last steps fit the network to the statistics it will use at inference.
FREEZE_NORM_AT = 0.6


def set_train_mode(net: torch.nn.Module, freeze_norm: bool) -> None:
    net.train()
    if freeze_norm:
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def build_network(inference: dict) -> torch.nn.Module:
    parser = ConfigParser({"imports": inference["imports"], "network_def": inference["network_def"]})
    return parser.get_parsed_content("network_def")


def train_classifier(inference, pool, validation, steps, seed, device, freeze_norm_at, log_every=50, validate_every=250,
                     report=None):
    """The classifier trained on ``pool`` (positives, twins, negatives); ``report(net)`` (default: accuracy and twin
    flip rate on ``validation``) is printed every ``validate_every`` steps."""
    positives, twins, negatives = pool
    torch.manual_seed(seed)
    net = build_network(inference).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng([seed, 2])
    losses = []
    start = time.time()
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, steps)
        # Four cases with a random mix of labels, so BatchNorm's batch statistics tell nothing about the
        # labels; half the batches start with a positive and its tumour-free twin (only the tumour differs).
        cases: list[tuple[Sample, int]] = []
        groups = []
        if rng.random() < 0.5:
            a = rng.integers(len(positives))
            cases += [(positives[a], 1), (twins[a], 0)]
            groups.append([0, 1])
        while len(cases) < 4:
            if rng.random() < 0.5:
                cases.append((positives[rng.integers(len(positives))], 1))
            elif rng.random() < 0.5:
                cases.append((twins[rng.integers(len(twins))], 0))
            else:
                cases.append((negatives[rng.integers(len(negatives))], 0))
            groups.append([len(cases) - 1])
        images = torch.stack([case.image for case, _ in cases])
        labels = torch.tensor([label for _, label in cases])
        images, _ = augment(images, None, rng, groups, [case.fixed for case, _ in cases])
        set_train_mode(net, freeze_norm=step >= int(freeze_norm_at * steps))
        loss = torch.nn.functional.cross_entropy(net(images.to(device)), labels.to(device))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(
                f"  classifier step {step + 1}/{steps}  loss {np.mean(losses[-log_every:]):.3f}  "
                f"lr {learning_rate(step, steps):.1e}  {time.time() - start:.0f} s",
                flush=True,
            )
        if (step + 1) % validate_every == 0 or step + 1 == steps:
            if report is None:
                accuracy, flips = classify_accuracy(net, validation, device)
                print(f"  validation accuracy {accuracy:.3f}  twin flip rate {flips:.3f}", flush=True)
            else:
                print(f"  validation {report(net)}", flush=True)
    return net, time.time() - start


@torch.no_grad()
def classify_accuracy(net, validation, device):
    """Accuracy on (positives + negatives) and the fraction of positives' twins called "no tumour"."""
    net.eval()
    positives, twins, negatives = validation
    predict = lambda samples: [int(net(s.image[None].to(device)).argmax(1)) for s in samples]  # noqa: E731
    correct = sum(p == 1 for p in predict(positives)) + sum(p == 0 for p in predict(negatives))
    flipped = sum(p == 0 for p in predict(twins))
    return correct / (len(positives) + len(negatives)), flipped / len(twins)


def crop_corners(rng: np.random.Generator, n: int, roi_size=ROI_SIZE, masks=None) -> np.ndarray:
    """(n, 3) random corners of ``roi_size`` crops of the default grid; an axis the crop fills draws nothing.

    With ``masks`` (n of (ni, nj, nk)), each crop holds a voxel drawn at random from its mask, where the
    mask has any (crops much smaller than the grid would otherwise miss a small tumour most of the time).
    """
    corners = np.zeros((n, 3), dtype=int)
    size = np.array(DEFAULT_GEOMETRY.size)
    for axis in range(3):
        free = size[axis] - roi_size[axis]
        if free > 0:
            corners[:, axis] = rng.integers(0, free + 1, n)
    for index, mask in enumerate(masks if masks is not None else []):
        voxels = torch.nonzero(mask)
        if len(voxels):
            voxel = voxels[rng.integers(len(voxels))].numpy()
            corner = voxel - rng.integers(0, np.array(roi_size))
            corners[index] = np.clip(corner, 0, size - np.array(roi_size))
    return corners


def train_segmenter(
    inference, pool, validation, steps, seed, device, freeze_norm_at, log_every=50, validate_every=250,
    roi_size=ROI_SIZE, batch_size=2, peak_lr=1e-3, centre_on_tumour=False,
):
    positives, twins, negatives = pool
    torch.manual_seed(seed)
    net = build_network(inference).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=peak_lr)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    rng = np.random.default_rng([seed, 3])
    losses = []
    start = time.time()
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr)
        samples = []
        for _ in range(batch_size):  # random crops; one in six tumour-free
            if rng.random() < 5 / 6:
                samples.append(positives[rng.integers(len(positives))])
            else:
                samples.append((twins + negatives)[rng.integers(len(twins) + len(negatives))])
        corners = crop_corners(rng, batch_size, roi_size, [s.mask for s in samples] if centre_on_tumour else None)
        crops = [tuple(slice(c, c + r) for c, r in zip(corner, roi_size)) for corner in corners]
        images = torch.stack([s.image[(slice(None), *crop)] for s, crop in zip(samples, crops)])
        masks = torch.stack([s.mask[crop] for s, crop in zip(samples, crops)])
        images, masks = augment(images, masks, rng, [[i] for i in range(batch_size)])
        set_train_mode(net, freeze_norm=step >= int(freeze_norm_at * steps))
        loss = loss_function(net(images.to(device)), masks[:, None].long().to(device))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(
                f"  segmenter step {step + 1}/{steps}  loss {np.mean(losses[-log_every:]):.3f}  "
                f"lr {learning_rate(step, steps, peak_lr):.1e}  {time.time() - start:.0f} s",
                flush=True,
            )
        if (step + 1) % validate_every == 0 or step + 1 == steps:
            inferer = ConfigParser({"inferer": inference["inferer"]}).get_parsed_content("inferer")
            dice = np.mean([segment_dice(net, inferer, s, device) for s in validation[0]])
            print(f"  validation Dice {dice:.3f}", flush=True)
    return net, time.time() - start


@torch.no_grad()
def segment_dice(net, inferer, sample: Sample, device) -> float:
    net.eval()
    logits = inferer(sample.image[None].to(device), net)
    prediction = logits.argmax(1)[0].cpu().numpy() > 0
    return dice(prediction, sample.mask.numpy() > 0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


# -------------------------------------------------------------------------------------- evaluation


def load_bundle(bundle: Path, device: str):
    """(parser, network in eval mode) from a written bundle, the way a user would load it."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = f"$torch.device('{device}')"
    network = parser.get_parsed_content("network")
    state = torch.load(bundle / "models" / "model.pt", map_location=device, weights_only=True)
    network.load_state_dict(state)
    network.eval()
    return parser, network


def oblique_geometry() -> Geometry:
    """An oblique, anisotropic (2 × 2 × 3 mm) grid around the head, to check robustness to reorientation."""
    angle = np.deg2rad(15.0)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    spacing = np.array([2.0, 2.0, 3.0])
    size = np.array([84, 104, 56])
    direction_ras = rotation @ np.diag([-1.0, 1.0, 1.0])  # an L-to-R flipped, tilted grid
    affine = np.eye(4)
    affine[:3, :3] = direction_ras * spacing
    affine[:3, 3] = np.array([3.0, -4.0, 2.0]) - affine[:3, :3] @ ((size - 1) / 2)
    return Geometry.from_ijk_to_ras(affine, size)


@torch.no_grad()
def evaluate_classifier(bundle: Path, device: str, n_seeds: int) -> dict:
    parser, network = load_bundle(bundle, device)
    transforms = tail_transforms(parser.config)
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing")

    def tumour_probability(volume: Volume) -> float:
        image = preprocess(volume, transforms)[None].to(device)
        pred = post({"pred": inferer(image, network)[0]})["pred"]
        return float(pred[1])

    seeds = list(HELD_OUT_SEEDS[:n_seeds])
    with_tumour = seeds[0::2]
    results = {"correct": 0, "flipped": 0, "oblique_correct": 0}
    oblique = oblique_geometry()
    for s in seeds:
        truth = s in with_tumour
        results["correct"] += (tumour_probability(make_phantom(s, tumour=truth).image) > 0.5) == truth
        results["oblique_correct"] += (
            tumour_probability(make_phantom(s, tumour=truth, geometry=oblique).image) > 0.5
        ) == truth
        if truth:
            results["flipped"] += tumour_probability(make_phantom(s, tumour=False).image) < 0.5
    return {
        "accuracy": round(results["correct"] / len(seeds), 4),
        "n_phantoms": len(seeds),
        "seeds": f"HELD_OUT_SEEDS[:{n_seeds}] = {seeds[0]}..{seeds[-1]}; even offsets with tumour, odd without",
        "twin_flip_rate": round(results["flipped"] / len(with_tumour), 4),
        "twin_flip_n": len(with_tumour),
        "oblique_accuracy": round(results["oblique_correct"] / len(seeds), 4),
        "oblique_grid": "same phantoms on a 15 deg tilted, L-R flipped, 2 x 2 x 3 mm grid",
    }


@torch.no_grad()
def evaluate_segmenter(bundle: Path, device: str, n_seeds: int) -> dict:
    parser, network = load_bundle(bundle, device)
    transforms = tail_transforms(parser.config)
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing")

    def segment(volume: Volume) -> np.ndarray:
        image = preprocess(volume, transforms)[None].to(device)
        pred = post({"pred": inferer(image, network)[0]})["pred"]
        return pred[0].cpu().numpy() > 0.5

    seeds = list(HELD_OUT_SEEDS[:n_seeds])
    dices, false_voxels = [], []
    for s in seeds:
        phantom = make_phantom(s)
        dices.append(dice(segment(phantom.image), phantom.tumour_mask.array > 0))
        false_voxels.append(int(segment(make_phantom(s, tumour=False).image).sum()))
    return {
        "dice": round(float(np.mean(dices)), 4),
        "dice_min": round(float(np.min(dices)), 4),
        "n_phantoms": len(seeds),
        "seeds": f"HELD_OUT_SEEDS[:{n_seeds}] = {seeds[0]}..{seeds[-1]}, with tumour (Dice per phantom, averaged)",
        "tumour_free_twins_with_false_positives": int(sum(v > 0 for v in false_voxels)),
        "false_positive_voxels_median": float(np.median(false_voxels)),
    }


# ------------------------------------------------------------------------------------------- main


def write_bundle(out: Path, which: str, inference: dict, net: torch.nn.Module, dtype=None) -> Path:
    """Write configs/inference.json and models/model.pt (a plain state dict, floats cast to ``dtype`` if given)."""
    name = {"classifier": "tumour_classifier", "segmenter": "tumour_segmenter"}.get(which, which)
    bundle = out / name
    write_json(bundle / "configs" / "inference.json", inference)
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, bundle / "models" / "model.pt")
    return bundle


def reproducing_command(model: str, steps: int, args: argparse.Namespace) -> str:
    """The command that retrains this one model: every option that changes the result, spelled out."""
    options = [
        ("--which", model),
        ("--steps", steps),
        ("--seed", args.seed),
        ("--threads", args.threads),
        ("--device", args.device),
        ("--pairs", args.pairs),
        ("--negatives", args.negatives),
        ("--freeze-norm-at", args.freeze_norm_at),
        ("--held-out", args.held_out),
    ]
    return "python tools/train_demo_models.py " + " ".join(f"{k} {shlex.quote(str(v))}" for k, v in options)


def bundle_size(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--which", choices=["classifier", "segmenter", "both"], default="both")
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "bundles")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 3000 classifier, 2500 segmenter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (figures are reproducible per count)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=200, help="training seeds rendered with tumour and as twin")
    parser.add_argument("--negatives", type=int, default=200, help="extra tumour-free training seeds")
    parser.add_argument(
        "--freeze-norm-at", type=float, default=FREEZE_NORM_AT, help="fraction of steps after which BatchNorm stats freeze"
    )
    parser.add_argument("--pool-cache", type=Path, default=None, help="development: keep rendered training data here")
    parser.add_argument("--held-out", type=int, default=100, help="how many HELD_OUT_SEEDS to evaluate on")
    args = parser.parse_args(argv)
    which = ["classifier", "segmenter"] if args.which == "both" else [args.which]

    seed_everything(args.seed, args.threads)
    print(
        f"torch {torch.__version__}, monai {monai.__version__}, numpy {np.__version__}, "
        f"{args.threads} threads, device {args.device}, python {platform.python_version()}",
        flush=True,
    )
    transforms = tail_transforms(inference_config("classifier"))
    start = time.time()
    print(f"rendering {args.pairs} pairs + {args.negatives} negatives of training phantoms", flush=True)
    if args.pool_cache and args.pool_cache.exists():
        pool = torch.load(args.pool_cache, weights_only=False)
    else:
        pool = build_pool(args.pairs, args.negatives, transforms, args.seed)
        if args.pool_cache:
            torch.save(pool, args.pool_cache)
    half = len(VALIDATION_SEEDS) // 2
    validation = (
        [render(s, True, DEFAULT_GEOMETRY, transforms) for s in VALIDATION_SEEDS[:half]],
        [render(s, False, DEFAULT_GEOMETRY, transforms) for s in VALIDATION_SEEDS[:half]],
        [render(s, False, DEFAULT_GEOMETRY, transforms) for s in VALIDATION_SEEDS[half:]],
    )
    print(f"data ready in {time.time() - start:.0f} s", flush=True)

    summary = {}
    for model in which:
        steps = args.steps or {"classifier": 3000, "segmenter": 2500}[model]
        inference = inference_config(model)
        print(f"training the {model} for {steps} steps", flush=True)
        train = train_classifier if model == "classifier" else train_segmenter
        net, seconds = train(inference, pool, validation, steps, args.seed, args.device, args.freeze_norm_at)
        bundle = write_bundle(args.out, model, inference, net)
        print(f"evaluating the written bundle {bundle} on {args.held_out} held-out seeds", flush=True)
        evaluate = evaluate_classifier if model == "classifier" else evaluate_segmenter
        figures = evaluate(bundle, args.device, args.held_out)
        training = {
            "steps": steps,
            "seed": args.seed,
            "command": reproducing_command(model, steps, args),
            "training_seconds": round(seconds),
            "threads": args.threads,
            "device": args.device,
            "optimiser": "Adam, lr 1e-3 for 60 % of steps then cosine decay to 1e-5; BatchNorm statistics frozen "
            "for the last 40 %",
            "batch": "4 cases, labels mixed at random; half the batches hold a positive and its tumour-free twin"
            if model == "classifier"
            else "2 random 64x64x64 crops (along A-P), 5/6 with tumour",
            "loss": "cross entropy" if model == "classifier" else "DiceCE (batch Dice)",
            "data": (
                f"phantom seeds 0..{args.pairs - 1} with tumour and as tumour-free twins, "
                f"seeds {args.pairs}..{args.pairs + args.negatives - 1} without tumour; each rendered on the default "
                "grid rotated up to 12 deg and shifted up to 6 mm; random flips on all axes and intensity "
                "scale/shift per batch"
            ),
            "norm": "batch",
            "versions": {"torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__},
        }
        write_json(bundle / "configs" / "metadata.json", metadata(model, figures, training))
        write_readme(bundle, model, figures, training)
        size = bundle_size(bundle)
        summary[model] = {**figures, "training_seconds": round(seconds), "bundle_bytes": size}
        print(f"{model}: held-out {json.dumps(figures)}", flush=True)
        print(f"{model}: trained in {seconds:.0f} s; bundle {size / 1e6:.2f} MB at {bundle}", flush=True)
    print("summary " + json.dumps(summary), flush=True)
    return 0


def write_readme(bundle: Path, which: str, figures: dict, training: dict) -> None:
    classifier = which == "classifier"
    net = CLASSIFIER_NET if classifier else SEGMENTER_NET
    args = ", ".join(f"{k}={json.dumps(v)}" for k, v in net.items() if k != "_target_")
    if classifier:
        result = (
            f"- Held-out accuracy: **{figures['accuracy']:.3f}** on {figures['n_phantoms']} phantoms "
            f"({figures['seeds']}).\n"
            f"- Tumour removed (same phantom rendered with `tumour=False`): prediction flips to \"no tumour\" on "
            f"**{figures['twin_flip_rate']:.3f}** of {figures['twin_flip_n']} positives.\n"
            f"- Same phantoms on an oblique, anisotropic grid ({figures['oblique_grid']}): accuracy "
            f"{figures['oblique_accuracy']:.3f}.\n"
        )
        output = "`pred`: softmax probabilities over `[\"no tumour\", \"tumour\"]` (2 values per case)."
    else:
        result = (
            f"- Held-out Dice (tumour = core ∪ enhancing rim): **{figures['dice']:.3f}** mean, "
            f"{figures['dice_min']:.3f} worst, on {figures['n_phantoms']} phantoms ({figures['seeds']}).\n"
            f"- Tumour-free twins of those phantoms with any voxel called tumour: "
            f"{figures['tumour_free_twins_with_false_positives']} of {figures['n_phantoms']} "
            f"(median {figures['false_positive_voxels_median']:.0f} voxels).\n"
        )
        output = (
            "`pred`: after postprocessing, the argmax label map (0 background, 1 tumour) on the preprocessed grid; "
            "before it, 2-channel logits from a sliding-window inferer (64³ windows, overlap 0.25)."
        )
    text = f"""# XAIOverlay demo {"tumour classifier" if classifier else "tumour segmenter"}

A small model trained **only on synthetic phantoms** (`xaioverlay.phantoms`) so XAIOverlay has something
real to explain in demos and tests. Not for clinical or research use.

## Data
Analytic head phantoms: scalp, bright skull shell, CSF, grey/white matter with texture, two lateral
ventricles, a smooth bias field and Rician noise, background exactly 0. A tumour (dark necrotic core,
bright enhancing rim, mild oedema) sits at a random place in the brain, radius about 8–16 mm; one to three
bright solid decoy blobs (as bright as the rim, no core) are present in every phantom, tumour or not.
Training seeds and the held-out seeds (`HELD_OUT_SEEDS`, 100000–100099) never overlap.

Training data: {training["data"]}.

## Model
`{net["_target_"]}({args})`, {"classes" if classifier else "channels"}
`{json.dumps(CLASSIFIER_CLASSES if classifier else SEGMENTER_CHANNELS)}`; weights are a plain state dict
(`torch.load(models/model.pt, weights_only=True)`).

Input: one channel, T1c-like MR. Preprocessing (`configs/inference.json`): LoadImaged → EnsureChannelFirstd →
Orientationd(RAS) → Spacingd(2.5 mm, bilinear) → NormalizeIntensityd(nonzero) → EnsureTyped.
Output: {output}

## Results (measured by `tools/train_demo_models.py` through this bundle)
{result}
## Training
`{training["command"]}` — {training["steps"]} steps, seed {training["seed"]}, {training["threads"]} CPU threads,
{training["training_seconds"]} s; {training["optimiser"]}; loss {training["loss"]}; batch: {training["batch"]}.
Normalisation layers: BatchNorm. Re-running the command on the same machine and thread count reproduces
the figures above.
"""
    (bundle / "docs").mkdir(parents=True, exist_ok=True)
    (bundle / "docs" / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
