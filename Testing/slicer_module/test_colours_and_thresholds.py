"""Colour tables made by the module, percentile thresholds, opacity, legends, 3D transfer functions."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk
from vtk.util import numpy_support

from XAIOverlayLib import colours, nodes


def map_node(scene, array: np.ndarray, name: str = "map"):
    """A scalar volume node holding ``array`` ([i, j, k]) on a unit grid."""
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array.transpose(2, 1, 0)).ravel(), deep=True))
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    node.SetAndObserveImageData(image)
    scene.AddNode(node)
    return node


def ramp(signed: bool) -> np.ndarray:
    """1000 distinct values: 1..1000 (or ±1..±500), shuffled into a 10×10×10 grid."""
    values = np.arange(1, 1001, dtype=np.float32)
    if signed:
        values = np.concatenate([-np.arange(1, 501), np.arange(1, 501)]).astype(np.float32)
    return np.random.default_rng(0).permutation(values).reshape(10, 10, 10)


def test_the_modules_tables_are_sequential_and_diverging_symmetric(scene):
    heat = colours.shared_table(scene, colours.HEAT)
    signed = colours.shared_table(scene, colours.SIGNED)
    assert heat.GetNumberOfColors() == signed.GetNumberOfColors() == 256
    assert colours.shared_table(scene, colours.HEAT) is heat  # made once
    rgb = lambda table, i: np.array(table.GetLookupTable().GetTableValue(i)[:3])  # noqa: E731
    brightness = [rgb(heat, i).sum() for i in range(256)]
    assert all(b2 >= b1 - 1e-9 for b1, b2 in zip(brightness, brightness[1:]))  # sequential: never darker
    # diverging: blue end, near-white middle, red end, mirror-symmetric in lightness
    assert rgb(signed, 0)[2] > rgb(signed, 0)[0] and rgb(signed, 255)[0] > rgb(signed, 255)[2]
    assert rgb(signed, 127).min() > 0.9
    lightness = [rgb(signed, i).mean() for i in range(256)]
    assert np.allclose(lightness, lightness[::-1], atol=0.09)


@pytest.mark.parametrize("percentile", [95.0, 80.0])
def test_non_negative_map_shows_exactly_the_top_percent(scene, percentile):
    node = map_node(scene, ramp(False))
    threshold = colours.style_map(scene, node, signed=False, percentile=percentile)
    display = node.GetDisplayNode()
    assert display.GetColorNode().GetName() == colours.HEAT
    assert display.GetApplyThreshold() == 1
    shown = [v for v in range(1, 1001) if colours.colour_of(scene, node, float(v))[3] > 0]
    expected = 1000 * (100 - percentile) / 100
    assert abs(len(shown) - expected) <= 1 and min(shown) >= threshold
    assert display.GetWindowLevelMax() == pytest.approx(1000)


def test_signed_map_shows_both_tails_and_hides_the_band_around_zero(scene):
    node = map_node(scene, ramp(True))
    threshold = colours.style_map(scene, node, signed=True, percentile=90.0)
    display = node.GetDisplayNode()
    low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    assert -low == high and 500 <= high < 500 * 1.01  # symmetric around zero, just wide enough for the largest value
    assert threshold == pytest.approx(np.quantile(np.arange(1, 501), 0.9), rel=1e-6)
    assert colours.colour_of(scene, node, 0.0)[3] == 0
    assert colours.colour_of(scene, node, threshold * 0.9)[3] == 0 and colours.colour_of(scene, node, -threshold * 0.9)[3] == 0
    red, blue = colours.colour_of(scene, node, 495.0), colours.colour_of(scene, node, -495.0)
    assert red[3] == blue[3] == 1
    assert red[0] > red[2] and blue[2] > blue[0]
    # the table is the map's own copy (hidden, removed with it); the shared one is untouched
    table = display.GetColorNode()
    assert table.GetHideFromEditors() and nodes.attribute(table, "owner") == node.GetID()
    nodes.remove_nodes(scene, [node])
    assert scene.GetNodeByID(table.GetID()) is None


def test_shown_signed_colours_grow_with_magnitude_and_are_never_near_white():
    rgb, alpha = colours.banded_colours(threshold=2.0, limit=10.0, entries=200)
    values = colours.entry_values(-10.0, 10.0, 200)
    shown = alpha > 0
    assert np.array_equal(shown, np.abs(values) >= 2.0)
    saturation = rgb.max(1) - rgb.min(1)
    assert saturation[shown].min() > 0.3  # the weakest shown value is a clear blue or red
    positive = shown & (values > 0)
    assert np.all(np.diff(rgb[positive, 2]) <= 1e-9)  # red side: blue channel falls as values grow
    np.testing.assert_allclose(rgb[shown].mean(1), rgb[shown][::-1].mean(1), atol=0.1)  # mirror-symmetric lightness


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_heavy_tailed_signed_map_shows_exactly_its_top_percent(scene, scale):
    """Most voxels near zero, a few large: the band must still hide exactly what lies under the threshold."""
    values = (np.random.default_rng(3).laplace(0.0, 1.0, 20000) ** 3 * scale).astype(np.float32)
    node = map_node(scene, values.reshape(20, 25, 40))
    threshold = colours.style_map(scene, node, signed=True, percentile=95.0)
    display = node.GetDisplayNode()
    low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    table = display.GetColorNode()
    index = np.clip(np.floor((values - low) / (high - low) * table.GetNumberOfColors()), 0, table.GetNumberOfColors() - 1).astype(int)
    alpha = np.array([table.GetLookupTable().GetTableValue(i)[3] for i in range(table.GetNumberOfColors())])[index]
    shown = alpha > 0
    assert np.array_equal(shown, np.abs(values) >= threshold)  # exact: ±threshold fall on entry edges
    assert abs(shown.mean() - 0.05) < 0.001 and -low == high >= np.abs(values).max()


def test_empty_map_shows_nothing(scene):
    node = map_node(scene, np.zeros((4, 4, 4), np.float32))
    colours.style_map(scene, node, signed=False)
    assert colours.colour_of(scene, node, 0.0)[3] == 0


def test_legend_follows_the_map_and_its_views(scene):
    node = map_node(scene, ramp(False))
    colours.style_map(scene, node, signed=False)
    legend = colours.legend(scene, node, "Grad-CAM", ["vtkMRMLSliceNodeRed"])
    assert legend.IsA("vtkMRMLColorLegendDisplayNode")
    assert legend.GetPrimaryDisplayNode() is node.GetDisplayNode()
    assert legend.GetTitleText() == "Grad-CAM" and legend.GetViewNodeIDs() == ("vtkMRMLSliceNodeRed",)
    assert colours.legend(scene, node, "Grad-CAM") is legend  # one legend per map


def test_signed_legend_reads_the_same_table_over_the_same_range(scene):
    """Slicer's legend skips directly mapped display nodes; a hidden second display node feeds it."""
    node = map_node(scene, ramp(True))
    colours.style_map(scene, node, signed=True)
    legend = colours.legend(scene, node, "LRP")
    source, shown = legend.GetPrimaryDisplayNode(), node.GetDisplayNode()
    assert shown.GetScalarRangeFlag() == slicer.vtkMRMLDisplayNode.UseDirectMapping and node.GetNthDisplayNode(0) is shown
    assert source is not shown and source.GetColorNodeID() == shown.GetColorNodeID() and not source.GetVisibility()
    assert (source.GetWindowLevelMin(), source.GetWindowLevelMax()) == shown.GetColorNode().GetLookupTable().GetRange()
    colours.style_map(scene, node, signed=False)  # the same node shown as non-negative: no second display node
    assert colours.legend(scene, node, "LRP").GetPrimaryDisplayNode() is node.GetDisplayNode()
    assert scene.GetNodeByID(source.GetID()) is None


def test_volume_rendering_hides_voxels_under_the_threshold(app):
    node = map_node(app.scene, ramp(False))
    threshold = colours.style_map(app.scene, node, signed=False, percentile=95.0)
    display = colours.volume_rendering(app.volume_rendering, app.scene, node, signed=False)
    opacity = display.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity()
    assert opacity.GetValue(threshold * 0.99) == 0 and opacity.GetValue(500) == 0
    assert 0 < opacity.GetValue(threshold) < opacity.GetValue(1000) <= 0.5
    colour = display.GetVolumePropertyNode().GetVolumeProperty().GetRGBTransferFunction().GetColor(1000)
    assert np.allclose(colour, colours.palette(colours.HEAT_ANCHORS)[-1], atol=0.01)
    assert colours.volume_rendering(app.volume_rendering, app.scene, node, signed=False, show=False).GetVisibility() == 0


def test_opacity_points_are_symmetric_for_signed_maps():
    points = colours.opacity_points(2.0, 10.0, signed=True, peak=0.5)
    mirrored = [(-value, alpha) for value, alpha in reversed(points)]
    np.testing.assert_allclose(np.array(mirrored), np.array(points))
    assert [alpha for value, alpha in points if abs(value) < 2.0] == [0.0, 0.0]
    assert colours.opacity_points(float("inf"), 10.0, signed=False, peak=0.5) == [(0.0, 0.0), (10.0, 0.0)]
