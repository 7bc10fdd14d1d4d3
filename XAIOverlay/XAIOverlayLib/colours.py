"""Colour tables, thresholds, opacity and legends of the maps.

The module makes its own tables so a map looks the same in every Slicer (file-based tables such as
Inferno are not loaded everywhere):

- ``XAIOverlay Heat`` (sequential) for non-negative maps (Grad-CAM family, occlusion): Slicer's display
  threshold hides everything below the chosen percentile t and the window is [t, max], so the shown
  voxels use the whole table.
- ``XAIOverlay Signed`` (diverging, blue < 0 < red, symmetric) for signed maps (LRP, gradient×input,
  IG): the window is [−M, M] with M = max |value|. A display threshold keeps one interval and cannot
  hide the band −t < v < t between two shown tails, so each signed map gets a copy of the table whose
  entries inside that band are transparent (hidden from editors, removed with the map), and whose
  shown entries start part-way out along the palette, so that faint evidence is not drawn near-white.

"Top 5 %" means the 95th percentile of the non-zero magnitudes (the montage uses the same rule).
"""

from __future__ import annotations

import numpy as np
import slicer

from . import nodes

HEAT = "XAIOverlay Heat"
SIGNED = "XAIOverlay Signed"
ENTRIES = 256

#: (position, red, green, blue) anchors, linearly interpolated.
HEAT_ANCHORS = ((0.0, 0.35, 0.00, 0.45), (0.30, 0.75, 0.05, 0.35), (0.55, 0.95, 0.25, 0.10),
                (0.80, 1.00, 0.62, 0.00), (1.00, 1.00, 0.95, 0.25))
SIGNED_ANCHORS = ((0.0, 0.02, 0.20, 0.70), (0.25, 0.30, 0.60, 1.00), (0.50, 0.96, 0.96, 0.96),
                  (0.75, 1.00, 0.55, 0.25), (1.00, 0.70, 0.00, 0.05))


def palette(anchors, entries: int = ENTRIES) -> np.ndarray:
    """(entries, 3) RGB in [0, 1], interpolated between anchors."""
    anchors = np.asarray(anchors, float)
    positions = np.linspace(0.0, 1.0, entries)
    return np.stack([np.interp(positions, anchors[:, 0], anchors[:, channel]) for channel in (1, 2, 3)], axis=1)


def entry_values(low: float, high: float, entries: int = ENTRIES) -> np.ndarray:
    """Centre value of each table entry when the table spans [low, high]."""
    width = (high - low) / entries
    return low + width * (np.arange(entries) + 0.5)


def visible_threshold(values: np.ndarray, signed: bool, percentile: float) -> float:
    """Smallest magnitude shown: the ``percentile`` of the non-zero magnitudes (inf if none)."""
    from xaioverlay.montage import overlay_threshold

    return overlay_threshold(np.asarray(values, np.float32), signed, top_fraction=1.0 - percentile / 100.0)


def _fill_table(table, rgb: np.ndarray, alpha: np.ndarray) -> None:
    """Set a colour table's entries at once (RGB and alpha in [0, 1])."""
    from vtk.util import numpy_support

    table.SetTypeToUser()
    table.SetNumberOfColors(len(rgb))
    rgba = np.round(np.c_[rgb, alpha] * 255).astype(np.uint8)
    table.GetLookupTable().SetTable(numpy_support.numpy_to_vtk(rgba, deep=True))
    table.Modified()


def shared_table(scene, name: str):
    """The module's table ``name`` (``HEAT`` or ``SIGNED``), made on first use."""
    for node in nodes.owned_nodes(scene, nodes.COLOUR, palette=name):
        return node
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(name)
    table.SetSingletonTag(name.replace(" ", ""))
    _fill_table(table, palette(HEAT_ANCHORS if name == HEAT else SIGNED_ANCHORS), np.ones(ENTRIES))
    nodes.set_attributes(table, role=nodes.COLOUR, palette=name)
    scene.AddNode(table)
    return table


#: Where the weakest shown value of a signed map starts on the palette, from its centre (0) to its
#: ends (1): shown values are never near-white, so faint evidence does not read as fog.
SIGNED_FLOOR = 0.35


def banded_colours(threshold: float, limit: float, entries: int = ENTRIES) -> tuple[np.ndarray, np.ndarray]:
    """RGB (entries, 3) and alpha (entries,) of a signed map's table spanning [−limit, limit].

    Entries with |value| < threshold are transparent (their colour stays the palette's, for the
    legend); shown entries map |value| from threshold → limit onto the palette from SIGNED_FLOOR of the
    way out to its end, blue for negative and red for positive values, mirror-symmetric around zero.
    """
    values = entry_values(-limit, limit, entries)
    shown = np.abs(values) >= threshold
    strength = np.clip((np.abs(values) - threshold) / max(limit - threshold, 1e-12), 0.0, 1.0)
    reach = np.where(shown, SIGNED_FLOOR + (1 - SIGNED_FLOOR) * strength, np.abs(values) / limit)
    position = 0.5 + 0.5 * np.sign(values) * reach
    anchors = np.asarray(SIGNED_ANCHORS, float)
    rgb = np.stack([np.interp(position, anchors[:, 0], anchors[:, c]) for c in (1, 2, 3)], axis=1)
    return rgb, shown.astype(float)


def signed_window(threshold: float, limit: float, entries: int = 2048, most: int = 65536) -> tuple[float, int]:
    """(half width W ≥ limit, number of entries N) of a signed map's table over [−W, W].

    A table entry is either shown or hidden, so the band −t < v < t is exact only when ±t fall on entry
    edges: the entry width is chosen as t / k (k whole, about ``entries`` entries in all), and W grows
    to a whole number of entries. Heavy-tailed maps (t ≪ limit) would need more than ``most`` entries;
    they get ``most``, and the band then hides at most one entry's width beyond t.
    """
    if not np.isfinite(threshold) or threshold <= 0 or threshold >= limit:
        return limit, ENTRIES
    width = 2 * limit / entries
    width = threshold / max(1, round(threshold / width))
    count = 2 * int(np.ceil(limit / width))
    if count > most:
        return limit, most
    return count * width / 2, count


def _banded_table(scene, volume, threshold: float, limit: float):
    """The signed table for ``volume`` (see :func:`banded_colours`): its own copy, hidden from editors."""
    found = [n for n in nodes.owned_nodes(scene, nodes.COLOUR, owner=volume.GetID())]
    table = found[0] if found else slicer.vtkMRMLColorTableNode()
    half, count = signed_window(threshold, limit)
    rgb, alpha = banded_colours(threshold, half, count)
    if count == 65536 and np.isfinite(threshold):  # coarse: hide every entry that reaches into the band
        edges = np.abs(entry_values(-half, half, count)) - half / count
        alpha = (edges >= threshold - 1e-12 * half).astype(float)
    _fill_table(table, rgb, alpha)
    if not found:
        table.SetName(f"{SIGNED} · {volume.GetName()}")
        table.SetHideFromEditors(True)
        nodes.set_attributes(table, role=nodes.COLOUR, palette=SIGNED, owner=volume.GetID())
        scene.AddNode(table)
    return table


def display_node(scene, volume):
    display = volume.GetDisplayNode()
    if display is None:
        display = slicer.vtkMRMLScalarVolumeDisplayNode()
        scene.AddNode(display)
        volume.SetAndObserveDisplayNodeID(display.GetID())
    return display


def map_levels(volume, signed: bool, percentile: float, known: dict | None = None) -> tuple[float, float]:
    """(limit, threshold) of a map node: its largest shown magnitude and :func:`visible_threshold`.

    ``known`` keeps them by (node, voxels' modification time, signed, percentile) for the caller, so
    moving the threshold slider back and forth computes each quantile of a map once.
    """
    key = (volume.GetID(), volume.GetImageData().GetMTime(), bool(signed), round(float(percentile), 3))
    if known is not None and key in known:
        return known[key]
    values = nodes.voxels(volume)
    limit = float(np.abs(values).max()) if signed else float(max(values.max(), 0.0))
    levels = (limit or 1.0, visible_threshold(values, signed, percentile))
    if known is not None:
        known[key] = levels
    return levels


def style_map(scene, volume, signed: bool, percentile: float = 95.0, known: dict | None = None) -> float:
    """Colour table, window and threshold of a map node; returns the threshold (magnitude) used.
    ``known``: see :func:`map_levels`."""
    limit, threshold = map_levels(volume, signed, percentile, known)
    display = display_node(scene, volume)
    display.SetAutoWindowLevel(0)
    display.SetInterpolate(1)
    if signed:
        # Slicer's window/level step quantises to 256 levels before the table; a signed map's band is
        # often narrower than one level, so the table maps the values directly over its own range.
        table = _banded_table(scene, volume, threshold, limit)
        half = signed_window(threshold, limit)[0]
        table.GetLookupTable().SetRange(-half, half)
        display.SetAndObserveColorNodeID(table.GetID())
        display.SetScalarRangeFlag(slicer.vtkMRMLDisplayNode.UseDirectMapping)
        display.SetWindowLevelMinMax(-half, half)
        display.SetApplyThreshold(0)
    else:
        display.SetScalarRangeFlag(slicer.vtkMRMLDisplayNode.UseDataScalarRange)  # Slicer's default
        display.SetAndObserveColorNodeID(shared_table(scene, HEAT).GetID())
        shown_from = min(threshold, limit * 2)  # inf (empty map): nothing shown
        display.SetWindowLevelMinMax(min(shown_from, limit * (1 - 1e-6)), limit)
        display.SetLowerThreshold(shown_from)
        display.SetUpperThreshold(limit * 2)
        display.SetApplyThreshold(1)
    nodes.set_attributes(volume, percentile=round(float(percentile), 3), threshold=float(threshold), limit=limit)
    return threshold


def colour_of(scene, volume, value: float) -> tuple[float, float, float, float]:
    """RGBA a map node's display gives ``value`` (its table at its window; alpha 0 where hidden)."""
    display = volume.GetDisplayNode()
    table = display.GetColorNode()
    if display.GetScalarRangeFlag() == slicer.vtkMRMLDisplayNode.UseDirectMapping:
        low, high = table.GetLookupTable().GetRange()
    else:
        low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    count = table.GetNumberOfColors()
    index = int(np.clip(np.floor((value - low) / (high - low) * count), 0, count - 1))
    rgba = [0.0] * 4
    table.GetColor(index, rgba)
    if display.GetApplyThreshold() and not display.GetLowerThreshold() <= value <= display.GetUpperThreshold():
        rgba[3] = 0.0
    return tuple(rgba)


def legend_source(scene, volume, display):
    """The display node a legend reads its colours and range from.

    Slicer's legend draws nothing for a display node that maps values directly (it takes that for RGB
    data), which signed maps use; for them a second, hidden display node of the same volume carries the
    same table with the same range through the usual window, for the legend alone. Slicer draws the
    volume with its first display node, so the hidden one changes nothing in the views.
    """
    proxies = [volume.GetNthDisplayNode(i) for i in range(volume.GetNumberOfDisplayNodes())
               if nodes.attribute(volume.GetNthDisplayNode(i), "role") == "legend-source"]
    if display.GetScalarRangeFlag() != slicer.vtkMRMLDisplayNode.UseDirectMapping:
        nodes.remove_nodes(scene, proxies)
        return display
    proxy = proxies[0] if proxies else slicer.vtkMRMLScalarVolumeDisplayNode()
    if not proxies:
        proxy.SetVisibility(0)
        nodes.set_attributes(proxy, role="legend-source")
        scene.AddNode(proxy)
        volume.AddAndObserveDisplayNodeID(proxy.GetID())
    low, high = display.GetColorNode().GetLookupTable().GetRange()
    proxy.SetAutoWindowLevel(0)
    proxy.SetAndObserveColorNodeID(display.GetColorNodeID())
    proxy.SetWindowLevelMinMax(low, high)
    return proxy


def legend(scene, volume, title: str, view_node_ids: list[str] | None = None):
    """A colour legend for the map (one per map, reused), shown in the given views (all when None)."""
    display = display_node(scene, volume)
    for index in range(volume.GetNumberOfDisplayNodes()):
        node = volume.GetNthDisplayNode(index)
        if node is not None and node.IsA("vtkMRMLColorLegendDisplayNode"):
            found = node
            break
    else:
        found = slicer.vtkMRMLColorLegendDisplayNode()
        scene.AddNode(found)
        volume.AddAndObserveDisplayNodeID(found.GetID())
    found.SetAndObservePrimaryDisplayNode(legend_source(scene, volume, display))
    found.SetTitleText(title)
    found.SetLabelFormat("%.3g")
    found.SetVisibility(1)
    found.SetViewNodeIDs(list(view_node_ids or []))
    return found


def opacity_points(threshold: float, limit: float, signed: bool, peak: float) -> list[tuple[float, float]]:
    """3D opacity transfer function: 0 below the threshold, then a ramp up to ``peak`` at the limit."""
    if not np.isfinite(threshold) or threshold >= limit:
        return [(-limit if signed else 0.0, 0.0), (limit, 0.0)]
    step = 1e-6 * limit
    positive = [(threshold - step, 0.0), (threshold, 0.05 * peak), (limit, peak)]
    if not signed:
        return [(0.0, 0.0), *positive]
    return [(-value, alpha) for value, alpha in reversed(positive)] + positive


def volume_rendering(vr_logic, scene, volume, signed: bool, show: bool = True, peak_opacity: float = 0.5):
    """Show (or hide) the map in 3D views with its colours; voxels under the threshold transparent."""
    display = vr_logic.GetFirstVolumeRenderingDisplayNode(volume)
    if not show:
        if display is not None:
            display.SetVisibility(0)
        return display
    if display is None:
        display = vr_logic.CreateDefaultVolumeRenderingNodes(volume)
    threshold = float(nodes.attribute(volume, "threshold", "inf"))
    limit = float(nodes.attribute(volume, "limit", "1"))
    low = -limit if signed else 0.0
    rgb = palette(SIGNED_ANCHORS if signed else HEAT_ANCHORS)
    prop = display.GetVolumePropertyNode().GetVolumeProperty()
    colours = prop.GetRGBTransferFunction()
    colours.RemoveAllPoints()
    for value, (r, g, b) in zip(entry_values(low, limit), rgb):
        colours.AddRGBPoint(float(value), float(r), float(g), float(b))
    opacity = prop.GetScalarOpacity()
    opacity.RemoveAllPoints()
    for value, alpha in opacity_points(threshold, limit, signed, peak_opacity):
        opacity.AddPoint(value, alpha)
    display.SetVisibility(1)
    return display
