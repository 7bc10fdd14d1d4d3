"""Write held-out demo phantoms and a cohort manifest for ``xaioverlay cohort``.

    python tools/make_phantom_cohort.py OUT [--cases 40] [--first-seed 200000] [--shortcut] [--segments]

Every other case has a tumour (label 1) and the others none (label 0); each case gets its T1c-like
image and its tumour mask (the ``reference_mask`` column; empty for a case without tumour). Seeds
start far above the demo models' training seeds, so the cases are held out.

With ``--shortcut`` (for ``tools/train_shortcut_classifier.py``): every third case has no tumour, the
others have one, and every other tumour case also carries the bright tag outside the head
(:func:`xaioverlay.phantoms.with_shortcut_tag`); column ``shortcut_tag`` says which (1) do, and
column ``tag_mask`` names the tag's mask (``<case>_tag.nrrd``) where it does.

With ``--segments``: each case's own segmentation in column ``segments`` (``<case>_segments.nrrd``; 1 the
head outside the brain, 2 the brain, 3 the tumour, 0 outside the head), for the strategies' per-segment
descriptor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "XAIOverlay")]

from xaioverlay.phantoms import Phantom, make_phantom, with_shortcut_tag  # noqa: E402
from xaioverlay.volumes import Volume, write_volume  # noqa: E402


def segmentation(phantom: Phantom) -> Volume:
    """uint8 labels on the phantom's grid: 1 head outside the brain, 2 brain, 3 tumour, 0 outside the head."""
    labels = np.where(phantom.image.array != 0, 1, 0).astype(np.uint8)
    labels[phantom.brain_mask.array > 0] = 2
    labels[phantom.tumour_mask.array > 0] = 3
    return Volume(labels, phantom.image.geometry, f"{phantom.image.name}_segments")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the volumes and cases.csv")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--first-seed", type=int, default=200_000)
    parser.add_argument("--shortcut", action="store_true",
                        help="a third without tumour; half the tumour cases with the shortcut tag")
    parser.add_argument("--segments", action="store_true", help="each case's head/brain/tumour segmentation too")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["case_id,image,label,reference_mask" + (",shortcut_tag,tag_mask" if args.shortcut else "")
             + (",segments" if args.segments else "")]
    for number in range(args.cases):
        tumour = number % 3 != 0 if args.shortcut else number % 2 == 0
        tagged = args.shortcut and number % 3 == 1
        phantom = make_phantom(args.first_seed + number, tumour=tumour)
        case_id = f"phantom_{number:03d}"
        image = with_shortcut_tag(phantom.image, phantom.seed) if tagged else phantom.image
        write_volume(image, args.out / f"{case_id}_t1c.nrrd")
        write_volume(phantom.tumour_mask, args.out / f"{case_id}_tumour.nrrd")
        if tagged:
            tag = (image.array != phantom.image.array).astype("uint8")
            write_volume(Volume(tag, image.geometry, f"{case_id}_tag"), args.out / f"{case_id}_tag.nrrd")
        if args.segments:
            write_volume(segmentation(phantom), args.out / f"{case_id}_segments.nrrd")
        lines.append(f"{case_id},{case_id}_t1c.nrrd,{int(phantom.has_tumour)},{case_id}_tumour.nrrd"
                     + (f",{int(tagged)},{f'{case_id}_tag.nrrd' if tagged else ''}" if args.shortcut else "")
                     + (f",{case_id}_segments.nrrd" if args.segments else ""))
    (args.out / "cases.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.cases} cases and {args.out / 'cases.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
