"""Where each method's map peaks, for the nnU-Net phantom model of ``Resources/nnunet/`` (a region target).

For each held-out demo phantom with a tumour (``xaioverlay.phantoms.HELD_OUT_SEEDS``) every method explains
the tumour channel over a ball of the tumour's radius around its centre; the map's peak (its largest
value, on the input grid) is measured against the tumour centre. Prints per method the share of phantoms
whose peak lies within 10 mm of the centre, and the median distance.

    OMP_WAIT_POLICY=PASSIVE python tools/localise_nnunet.py [--phantoms 20] [--methods gradcam,lrp,gxi,occlusion]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "XAIOverlay")]

from xaioverlay.explain import explain  # noqa: E402
from xaioverlay.models import load_model  # noqa: E402
from xaioverlay.phantoms import HELD_OUT_SEEDS, make_phantom  # noqa: E402

MODEL = ROOT / "Resources" / "nnunet" / "Dataset001_Phantom" / "nnUNetTrainer__nnUNetPlans__3d_fullres"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=20)
    parser.add_argument("--methods", default="gradcam,lrp,gxi,occlusion")
    parser.add_argument("--within-mm", type=float, default=10.0)
    args = parser.parse_args()
    model = load_model(MODEL, device="cpu")
    methods = [m.strip() for m in args.methods.split(",")]
    distances: dict[str, list[float]] = {m: [] for m in methods}
    seeds = [s for s in HELD_OUT_SEEDS if make_phantom(s).has_tumour][: args.phantoms]
    start = time.time()
    for seed in seeds:
        phantom = make_phantom(seed)
        centre = np.asarray(phantom.tumour_centre_ras)
        target = "channel:tumour@point:{:.1f},{:.1f},{:.1f},{:.1f}".format(*centre, phantom.tumour_radius_mm)
        result = explain(model, [phantom.image], methods, target)
        for method, record in zip(methods, result.results):
            peak = np.unravel_index(int(np.argmax(record.volume.array)), record.volume.array.shape)
            where = record.volume.geometry.ijk_to_ras_points([peak])[0]
            distances[method].append(float(np.linalg.norm(where - centre)))
        print(f"seed {seed}: " + ", ".join(f"{m} {distances[m][-1]:.1f} mm" for m in methods)
              + f" ({time.time() - start:.0f} s)", flush=True)
    for method in methods:
        values = np.asarray(distances[method])
        print(f"{method}: peak within {args.within_mm:g} mm on {int((values <= args.within_mm).sum())}/{len(values)} "
              f"phantoms; median distance {np.median(values):.1f} mm")


if __name__ == "__main__":
    main()
