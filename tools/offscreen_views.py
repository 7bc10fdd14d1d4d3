"""Slicer views without a screen: Slicer's own slice pipeline drawn offscreen through trame-slicer's
direct views (VTK renders with EGL when there is no display). Used by the rendering tests and by
``tools/render_screenshots.py``; not part of the Slicer module (desktop Slicer has real views).
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def create_views(app, layout: str, size: tuple[int, int] = (240, 240)) -> dict:
    """One offscreen slice view per view of a layout XML, as Slicer's layout manager would make them."""
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
    from trame_slicer.views.abstract_view import ViewProps
    from trame_slicer.views.view_layout_definition import ViewType

    from XAIOverlayLib import compare

    if not getattr(app, "_xai_factory", None):
        app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
        app._xai_factory = True
    views = {}
    for spec in compare.views_in_layout(layout):
        definition = ViewLayoutDefinition(spec["tag"], ViewType.SLICE_VIEW,
                                          ViewProps(label=spec["label"], orientation=spec["orientation"], group=spec["group"]))
        view = app.view_manager.create_view(definition)
        view.render_window().SetSize(*size)
        view.interactor().SetSize(*size)
        views[spec["tag"]] = view
    return views


def capture(view) -> np.ndarray:
    """The rendered view as (rows, columns, 3) uint8, row 0 at the top."""
    import vtk
    from vtk.util import numpy_support

    view.render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(view.render_window())
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
    return np.ascontiguousarray(pixels)


def pixel_of(view, ras) -> tuple[int, int]:
    """(row, column) of the pixel showing RAS point ``ras`` in a slice view."""
    matrix = view._logic.GetSliceNode().GetXYToRAS()
    xy_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    x, y, _, _ = np.linalg.inv(xy_to_ras) @ np.r_[np.asarray(ras, float), 1.0]
    height = view.render_window().GetSize()[1]
    return height - 1 - int(round(y)), int(round(x))


def write_png(pixels: np.ndarray, path) -> None:
    import vtk
    from vtk.util import numpy_support

    height, width, _ = pixels.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(pixels[::-1]).reshape(-1, 3), deep=True))
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
