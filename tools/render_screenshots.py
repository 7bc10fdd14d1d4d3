"""Render the README's Slicer screenshot and the extension icons from a real MRML scene, offscreen.

    python tools/render_screenshots.py                  # a held-out demo phantom, the demo segmenter
    python tools/render_screenshots.py --model Resources/bundles/tumour_classifier --out Docs/screenshots/compare_classifier.png --icons
    python tools/render_screenshots.py --model M --volume V --mask TUMOUR.nrrd --target tumour

The module's own logic (XAIOverlayLib) runs against slicer-core: the engine worker explains the volume,
the maps become volume nodes with the module's colour tables, the compare layout's views are filled
and drawn by Slicer's slice pipeline (trame-slicer direct views, offscreen). The ground-truth tumour
is outlined in green (the model's own segmentation, for segmentation models, in cyan). Writes
``Docs/screenshots/compare.png`` and the 128 × 128 icons
``XAIOverlay.png`` and ``XAIOverlay/Resources/Icons/XAIOverlay.png``, and prints, per method, how many
of the overlay's pixels lie on the tumour.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "XAIOverlay"), str(ROOT)]

from tools.offscreen_views import capture, create_views  # noqa: E402

METHODS = "gradcam,lrp,occlusion"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model (default: the demo tumour segmenter bundle)")
    parser.add_argument("--volume", help="volume to explain (default: the held-out demo phantom)")
    parser.add_argument("--mask", help="ground-truth tumour mask, outlined (default: the phantom's)")
    parser.add_argument("--target", default="tumour", help="class (classifier) or channel over the model's predicted region (segmenter); default: tumour")
    parser.add_argument("--methods", default=METHODS, help=f"three methods, comma-separated (default: {METHODS})")
    parser.add_argument("--orientation", default="Axial", choices=("Axial", "Coronal", "Sagittal"))
    parser.add_argument("--percentile", type=float, default=99.5,
                        help="overlay threshold percentile, the module's slider (default 99.5: about the tumour's share of the volume; the module starts at 95)")
    parser.add_argument("--out", default=str(ROOT / "Docs" / "screenshots" / "compare.png"))
    parser.add_argument("--icons", nargs="*", default=[str(ROOT / "XAIOverlay.png"), str(ROOT / "XAIOverlay" / "Resources" / "Icons" / "XAIOverlay.png")])
    return parser.parse_args(argv)


def demo_inputs(folder: Path) -> tuple[Path, Path, Path]:
    """(model, volume, tumour mask) of the demo: the held-out phantom the CLI demo explains."""
    from xaioverlay.demo import DEMO_SEED, SEGMENTER, bundle_path
    from xaioverlay.phantoms import make_phantom
    from xaioverlay.volumes import write_volume

    phantom = make_phantom(DEMO_SEED)
    return (bundle_path(SEGMENTER), write_volume(phantom.image, folder / "phantom_t1c.nrrd"),
            write_volume(phantom.tumour_mask, folder / "tumour_mask.nrrd"))


def ground_truth(scene, path: Path, reference):
    """The tumour mask as a green segmentation (outlined in the views)."""
    import slicer

    from XAIOverlayLib import nodes

    labelmap = nodes.add_volume_from_file(scene, path, "tumour (ground truth)", labelmap=True)
    segmentation = slicer.vtkMRMLSegmentationNode()
    segmentation.SetName("tumour (ground truth)")
    scene.AddNode(segmentation)
    segmentation.CreateDefaultDisplayNodes()
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):
        segmentation.GetSegmentation().GetNthSegment(index).SetColor(0.2, 1.0, 0.3)
    nodes.remove_nodes(scene, [labelmap])
    return segmentation


def pixel_ras(view) -> np.ndarray:
    """RAS mm shown at each pixel (rows, columns, 3), row 0 at the top."""
    width, height = view.render_window().GetSize()
    matrix = view._logic.GetSliceNode().GetXYToRAS()
    xy_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    x, y = np.meshgrid(np.arange(width), np.arange(height)[::-1])
    return (np.stack([x, y, np.zeros_like(x), np.ones_like(x)], -1).astype(float) @ xy_to_ras.T)[..., :3]


def on_mask(points_ras: np.ndarray, mask_volume) -> np.ndarray:
    """Whether each RAS point falls in a voxel > 0 of a mask volume."""
    ijk = np.rint(mask_volume.geometry.ras_to_ijk(points_ras.reshape(-1, 3))).astype(int)
    size = np.array(mask_volume.geometry.size)
    inside = np.all((ijk >= 0) & (ijk < size), axis=1)
    values = np.zeros(len(ijk), bool)
    values[inside] = mask_volume.array[tuple(ijk[inside].T)] > 0
    return values.reshape(points_ras.shape[:-1])


def coloured(pixels: np.ndarray) -> np.ndarray:
    """Pixels that are not grey (the overlay; the green outline is excluded by the caller)."""
    channels = pixels.astype(int)
    return (channels.max(-1) - channels.min(-1)) > 12


def compose(views: dict, labels: list[str], tags: list[str], table_rows: list[list[str]], columns: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from XAIOverlayLib import compare

    count = len(tags)
    figure = Figure(figsize=(3.2 * max(count, 3), 8.6), dpi=110, facecolor="#1e1e1e")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(3, max(count, 3) * 2, height_ratios=[3.0, 2.0, 1.0], hspace=0.12, wspace=0.05)
    span = 2 * max(count, 3) // count
    for index, (tag, label) in enumerate(zip(tags, labels)):
        axes = figure.add_subplot(grid[0, index * span:(index + 1) * span])
        axes.imshow(views[tag])
        axes.set_title(label, color="white", fontsize=11, backgroundcolor=compare.VIEW_COLOURS[index % len(compare.VIEW_COLOURS)])
        axes.axis("off")
    width = 2 * max(count, 3) // 3
    for index, (tag, colour) in enumerate(zip(compare.MAIN_VIEWS, ("#F34A33", "#6DAD4A", "#EDD54C"))):
        axes = figure.add_subplot(grid[1, index * width:(index + 1) * width])
        axes.imshow(views[tag])
        axes.set_title(f"{tag}: {labels[0]}", color="black", fontsize=9, backgroundcolor=colour)
        axes.axis("off")
    axes = figure.add_subplot(grid[2, :])
    axes.axis("off")
    table = axes.table(cellText=table_rows, colLabels=columns, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for cell in table.get_celld().values():
        cell.set_facecolor("#2b2b2b")
        cell.get_text().set_color("white")
        cell.set_edgecolor("#555555")
    figure.savefig(str(path), facecolor=figure.get_facecolor(), bbox_inches="tight", pad_inches=0.1)


def icon(pixels: np.ndarray, centre: tuple[int, int], path: Path, size: int = 128, crop: int = 150) -> None:
    from PIL import Image

    row, column = centre
    half = crop // 2
    padded = np.pad(pixels, ((half, half), (half, half), (0, 0)))
    piece = padded[row:row + crop, column:column + crop]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(piece).resize((size, size), Image.LANCZOS).save(path)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    import slicer
    from trame_slicer.core import SlicerApp

    from XAIOverlayLib import compare, nodes
    from XAIOverlayLib.logic import ExplainRequest, OverlayLogic
    from XAIOverlayLib.target_spec import TargetChoice
    from XAIOverlayLib.worker_client import WorkerClient
    from xaioverlay.volumes import read_volume

    work = Path(tempfile.mkdtemp(prefix="xaioverlay-screens-"))
    model, volume_path, mask_path = demo_inputs(work)
    if args.volume:
        if not args.mask:
            print("render_screenshots: --volume needs --mask (the tumour to outline and score)", file=sys.stderr)
            return 2
        volume_path, mask_path = Path(args.volume), Path(args.mask)
    if args.model:
        model = Path(args.model)
    app = SlicerApp()
    scene = app.scene
    scene.AddNode(slicer.vtkMRMLInteractionNode())
    anatomy = nodes.add_volume_from_file(scene, volume_path, "phantom")
    anatomy.CreateDefaultDisplayNodes()
    sh = nodes.subject_hierarchy(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Demo patient"), "MR head")
    sh.SetItemParent(nodes.hierarchy_item(scene, anatomy), study)
    truth = ground_truth(scene, mask_path, anatomy)

    logic = OverlayLogic(scene, client=WorkerClient([sys.executable, "-u", "-m", "xaioverlay.worker"]), cache_root=work / "cache",
                         application_logic=app.app_logic)
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        job = logic.wait(logic.explain(ExplainRequest([anatomy], str(model), methods, TargetChoice(key=args.target))), timeout=1800)
        if job.state != "done":
            print(f"render_screenshots: explanation failed: {job.error}", file=sys.stderr)
            return 1
        maps = logic.map_nodes(job)
        logic.set_percentile(args.percentile, maps)
        labels = [nodes.attribute(node, "label") for node in maps]
        views = create_views(app, compare.layout_xml(labels, args.orientation), (330, 330))
        table = logic.show_compare(job, args.orientation, legends=True)
        compare.outline(scene, truth, [compare.slice_node(scene, tag) for tag in views])
        mask = read_volume(mask_path)
        centre = mask.geometry.ijk_to_ras_points(np.argwhere(mask.array > 0).mean(0)[None])[0]
        compare.jump_to(scene, list(views), centre)  # every view through the tumour's centre
        pictures = {tag: capture(view) for tag, view in views.items()}
        print(f"{'method':<12} {'overlay px':>10} {'on tumour':>10}")
        shares = {}
        for tag, label in zip(logic.compare_tags, labels):
            ras = pixel_ras(views[tag])
            green = (pictures[tag][..., 1].astype(int) - pictures[tag][..., [0, 2]].max(-1) > 60)
            overlay = coloured(pictures[tag]) & ~green
            overlay[:, -70:] = False  # the colour legend on the right
            share = on_mask(ras[overlay], mask).mean() if overlay.any() else 0.0
            shares[tag] = share
            print(f"{label:<12} {int(overlay.sum()):>10} {share:>10.1%}")
        vtk_table = table.GetTable()
        columns = [vtk_table.GetColumn(c).GetName() for c in range(vtk_table.GetNumberOfColumns())]
        rows = [[_cell(vtk_table.GetValue(r, c)) for c in range(len(columns))] for r in range(vtk_table.GetNumberOfRows())]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        compose(pictures, labels, logic.compare_tags, rows, columns, out)
        print(f"wrote {out}")
        best = max(shares, key=shares.get)  # the icon shows the method whose overlay lies best on the tumour
        pixel = np.unravel_index(np.argmin(np.linalg.norm(pixel_ras(views[best]) - centre, axis=-1)), pictures[best].shape[:2])
        compare.set_opacity(scene, [best], 0.75)
        for place in args.icons:
            icon(capture(views[best]), pixel, Path(place))
            print(f"wrote {place}")
    finally:
        logic.shutdown()
    return 0


def _cell(value) -> str:
    if value.IsNumeric():
        number = value.ToDouble()
        return "–" if np.isnan(number) else (f"{number:.0f}" if number == int(number) and abs(number) >= 1 else f"{number:.3g}")
    return value.ToString()


if __name__ == "__main__":
    sys.exit(main())
