"""The compare views drawn offscreen by Slicer's own slice pipeline (trame-slicer direct views):
overlay colours over the lesion, anatomy only everywhere else."""

from __future__ import annotations

import numpy as np

from slicer_support import (LESION_RADIUS, blob_volume, capture, classifier_request, create_views, lesion_centre, load_volume,
                            write_png)
from xaioverlay.volumes import Volume, write_volume
from XAIOverlayLib import colours, compare, nodes

SIZE = (200, 200)


def pixel_ras(view) -> np.ndarray:
    """RAS mm shown at every pixel: (rows, columns, 3), row 0 at the top."""
    width, height = view.render_window().GetSize()
    matrix = view._logic.GetSliceNode().GetXYToRAS()
    xy_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    x, y = np.meshgrid(np.arange(width), np.arange(height)[::-1])
    xy = np.stack([x, y, np.zeros_like(x), np.ones_like(x)], -1).astype(float)
    return (xy @ xy_to_ras.T)[..., :3]


def is_grey(pixels: np.ndarray, tolerance: int = 3) -> np.ndarray:
    channels = pixels.astype(int)
    return (channels.max(-1) - channels.min(-1)) <= tolerance


def unblend(with_overlay: np.ndarray, anatomy_only: np.ndarray, opacity: float) -> np.ndarray:
    """The overlay colour c from out = (1 − α)·anatomy + α·c (Slicer's foreground blending)."""
    return (with_overlay.astype(float) - (1 - opacity) * anatomy_only.astype(float)) / opacity


def nearest_table_distance(colours_255: np.ndarray, table_rgb: np.ndarray) -> np.ndarray:
    """Distance (0–255 units) from each colour to the nearest entry of a colour table."""
    table = table_rgb * 255.0
    return np.linalg.norm(colours_255[:, None, :] - table[None, :, :], axis=-1).min(1)


def test_compare_views_show_the_overlay_colour_over_the_lesion_and_anatomy_only_elsewhere(app, logic, models, lesion_case, tmp_path):
    volume, path = lesion_case
    anatomy = load_volume(app.scene, path, "CT_1")
    job = logic.wait(logic.explain(classifier_request(anatomy, models["classifier"])))
    labels = [nodes.attribute(node, "label") for node in logic.map_nodes(job)]
    views = create_views(app, compare.layout_xml(labels, "Axial"), SIZE)
    logic.show_compare(job, "Axial", legends=False)
    centre = lesion_centre(volume.geometry)
    table = colours.palette(colours.HEAT_ANCHORS)
    for tag, node in zip(logic.compare_tags, logic.map_nodes(job)):
        view = views[tag]
        compare.jump_to(app.scene, [tag], centre)  # the axial plane through the lesion's centre
        composite = compare.composite_node(app.scene, tag)
        with_overlay = capture(view)
        composite.SetForegroundOpacity(0.0)
        anatomy_only = capture(view)
        composite.SetForegroundOpacity(logic.opacity)
        write_png(with_overlay, tmp_path / f"{tag}.png")
        ras = pixel_ras(view)
        distance = np.linalg.norm(ras - centre, axis=-1)
        coloured = ~is_grey(with_overlay)
        # over the lesion's core: the overlay, in the module's heat colours
        core = distance < LESION_RADIUS / 3
        assert core.sum() > 20 and coloured[core].all(), tag
        overlay = unblend(with_overlay[coloured], anatomy_only[coloured], logic.opacity)
        assert np.percentile(nearest_table_distance(overlay, table), 99) < 8.0, tag
        # everywhere else: anatomy only (grey), and no colour anywhere outside the lesion
        assert not coloured[distance > LESION_RADIUS + 1.5].any(), tag
        assert is_grey(anatomy_only).all()


def test_signed_map_renders_red_positive_and_blue_negative_evidence_over_grey_anatomy(app, lesion_case, tmp_path):
    volume, path = lesion_case
    scene = app.scene
    anatomy = load_volume(scene, path, "CT_1")
    geometry = volume.geometry
    centre = lesion_centre(geometry)
    head = geometry.ijk_to_ras_points(np.array([(np.array(geometry.size) - 1) / 2]))[0]
    opposite = head + (head - centre) * np.array([1.0, 1.0, -1.0])  # mirrored in R and A, same axial plane
    # heavy-tailed like real maps: a very hot core, two blobs, faint noise everywhere; the band to hide
    # (|v| < 0.8) is far narrower than 1/256 of the range (±1000), what Slicer's window/level resolves
    values = (blob_volume(geometry, centre, 6.0, value=1.0).array + blob_volume(geometry, centre, 1.5, value=999.0).array
              - blob_volume(geometry, opposite, 6.0, value=0.8).array
              + np.random.default_rng(2).normal(0.0, 1e-3, geometry.size))
    signed = nodes.add_volume_from_file(scene, write_volume(Volume(values.astype(np.float32), geometry, "lrp"), tmp_path / "lrp.nrrd"), "LRP")
    threshold = colours.style_map(scene, signed, signed=True, percentile=98.0)  # the blobs: 2.05 % of the voxels
    assert 0.7 < threshold < 0.81
    views = create_views(app, compare.layout_xml(["LRP"], "Axial", main_views=False), SIZE)
    tag = compare.view_name(0)
    compare.show_layers(scene, tag, anatomy, signed, 1.0)
    app.app_logic.FitSliceToAll(False, False)
    compare.jump_to(scene, [tag], centre)
    pixels = capture(views[tag])
    write_png(pixels, tmp_path / "signed.png")
    ras = pixel_ras(views[tag])
    pictures = {}
    for name, point in (("positive", centre), ("negative", opposite)):
        pictures[name] = pixels[np.linalg.norm(ras - point, axis=-1) < 2.0].astype(int).mean(0)
    far = (np.linalg.norm(ras - centre, axis=-1) > 7.0) & (np.linalg.norm(ras - opposite, axis=-1) > 7.0)
    assert is_grey(pixels[far]).all()  # zero (and the band around it) is transparent: anatomy only
    red, blue = pictures["positive"], pictures["negative"]
    assert red[0] > red[2] + 60 and blue[2] > blue[0] + 60


def test_segmentation_is_drawn_as_an_outline_only_in_the_compare_views(app, lesion_case, tmp_path):
    import slicer

    from slicer_support import lesion_mask

    volume, path = lesion_case
    scene = app.scene
    anatomy = load_volume(scene, path, "CT_1")
    labelmap = nodes.add_volume_from_file(scene, write_volume(Volume(lesion_mask(volume).astype(np.uint8), volume.geometry),
                                                              tmp_path / "seg.nrrd"), "seg", labelmap=True)
    segmentation = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation)
    segmentation.CreateDefaultDisplayNodes()
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segmentation.GetSegmentation().GetNthSegment(0).SetColor(0.0, 1.0, 0.0)
    views = create_views(app, compare.layout_xml(["A", "B"], "Axial", main_views=False), SIZE)
    compare.show_compare(scene, anatomy, [anatomy, anatomy], segmentation=segmentation)  # maps: anything
    for tag in views:
        compare.composite_node(scene, tag).SetForegroundVolumeID(None)
    app.app_logic.FitSliceToAll(False, False)
    centre = lesion_centre(volume.geometry)
    compare.jump_to(scene, list(views), centre)
    for tag, view in views.items():
        pixels = capture(view).astype(int)
        green = (pixels[..., 1] - np.maximum(pixels[..., 0], pixels[..., 2])) > 100
        distance = np.linalg.norm(pixel_ras(view) - centre, axis=-1)
        assert green.sum() > 30, tag
        # on the lesion's rim only: nothing filled inside, nothing far outside
        assert not green[distance < LESION_RADIUS - 3].any() and not green[distance > LESION_RADIUS + 3].any(), tag
