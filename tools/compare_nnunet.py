"""XAIOverlay's segmentation of an nnU-Net v2 model against nnU-Net's own ``nnUNetPredictor``.

Writes phantoms in three geometries (axis-aligned isotropic; oblique 1.2×1.0×2.5 mm; oblique 0.8×0.8×3.5 mm,
anisotropic beyond nnU-Net's threshold of 3), runs nnU-Net's predictor on the files and XAIOverlay's engine
on the same volumes, and prints per geometry the Dice of each foreground class between the two label maps
on the input grid and the largest logit difference on the model grid.

    python tools/compare_nnunet.py          # a tiny random-weight model folder written like the tests'
    python tools/compare_nnunet.py --model Resources/nnunet/Dataset001_Phantom/nnUNetTrainer__nnUNetPlans__3d_fullres \
        --phantoms                          # the trained phantom model on held-out demo phantoms

Needs ``nnunetv2`` (see the README, nnU-Net section).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "XAIOverlay"), str(ROOT / "Testing")]

from conftest import blob_volume, oblique_geometry  # noqa: E402
from xaioverlay.explain import to_input_grid  # noqa: E402
from xaioverlay.models import load_model  # noqa: E402
from xaioverlay.volumes import Geometry, write_volume  # noqa: E402


def centred(geometry: Geometry) -> Geometry:
    """The same grid moved so that its centre lies at the physical origin (where the phantoms' heads are)."""
    half = geometry.direction_matrix @ ((np.asarray(geometry.size) - 1) / 2 * np.asarray(geometry.spacing))
    return Geometry(geometry.size, geometry.spacing, tuple(-half), geometry.direction)


#: Spheres: axis-aligned isotropic, oblique anisotropic, oblique anisotropic beyond 3.
GEOMETRIES = {
    "axis-aligned 1.5 mm": Geometry((40, 40, 30), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0)),
    "oblique 1.2x1.0x2.5 mm": oblique_geometry(size=(40, 36, 16), spacing=(1.2, 1.0, 2.5)),
    "oblique 0.8x0.8x3.5 mm": oblique_geometry(size=(56, 50, 12), spacing=(0.8, 0.8, 3.5)),
}
#: Head-sized grids (the demo phantoms span 160 × 200 × 160 mm) of the same three kinds.
HEAD_GEOMETRIES = {
    "axis-aligned 2.0 mm": centred(Geometry((80, 100, 80), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))),
    "oblique 1.6x1.6x2.5 mm": centred(oblique_geometry(size=(100, 125, 64), spacing=(1.6, 1.6, 2.5))),
    "oblique 1.25x1.25x3.5 mm": centred(oblique_geometry(size=(128, 160, 46), spacing=(1.25, 1.25, 3.5))),
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--folds", default=None)
    parser.add_argument("--phantoms", action="store_true", help="held-out demo phantoms instead of spheres")
    args = parser.parse_args()
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    work = Path(tempfile.mkdtemp(prefix="compare-nnunet-"))
    folder = args.model
    if folder is None:
        from nnunet_folder import write_model_folder

        folder = write_model_folder(work, folds=(0,))
    model = load_model(folder, device="cpu", folds=args.folds)
    folds = [f.strip() for f in args.folds.split(",")] if args.folds else None
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        str(folder), [int(f) if f.isdigit() else f for f in folds] if folds else None, "checkpoint_final.pth")
    print(f"model: {model.model_id}; classes: {model.class_names}")
    from xaioverlay.phantoms import HELD_OUT_SEEDS, make_phantom

    for seed, (name, geometry) in enumerate((HEAD_GEOMETRIES if args.phantoms else GEOMETRIES).items()):
        centre = geometry.ijk_to_ras_points([[s // 2 for s in geometry.size]])[0]
        if args.phantoms:
            volume = make_phantom(list(HELD_OUT_SEEDS)[seed], geometry=geometry).image
        else:
            volume = blob_volume(geometry, centre, 9.0, value=2.0, background=0.5, noise=0.2, seed=seed)
        path = write_volume(volume, work / f"case{seed}_0000.nii.gz")
        image, properties = SimpleITKIO().read_images([str(path)])
        segmentation = predictor.predict_single_npy_array(image, properties, None, None, False).transpose(2, 1, 0)
        data, _, preprocessed = DefaultPreprocessor(verbose=False).run_case_npy(
            image, None, properties, predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json)
        theirs = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float()

        model_input = model.preprocess([volume])
        logits = model.infer(model_input.tensor)[0]
        # logits returned to the input grid, then the decision: the order nnU-Net's export follows
        ours = np.stack([to_input_grid(channel, model_input)[0].array for channel in logits])
        labels = ours.argmax(0) if model.activation == "softmax" else None
        if labels is None:
            print(f"{name}: region models are compared on the model grid only")
            continue
        # our logits returned to the input grid by nnU-Net's own export (its resampling and un-cropping)
        exported = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits.clone(), predictor.plans_manager, predictor.configuration_manager, predictor.label_manager,
            preprocessed).transpose(2, 1, 0)
        scores, through = (", ".join(f"{c}={dice(found == i, segmentation == i):.4f}"
                                     for i, c in enumerate(model.class_names) if i) for found in (labels, exported))
        difference = (theirs - logits).abs()
        print(f"{name}: Dice {scores} (our logits through nnU-Net's export: {through}); "
              f"model grid {tuple(logits.shape[1:])}: max |logit difference| {float(difference.max()):.4f}, "
              f"median {float(difference.median()):.5f}")


if __name__ == "__main__":
    main()
