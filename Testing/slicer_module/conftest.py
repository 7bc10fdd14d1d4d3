"""Fixtures for the Slicer-side tests: real MRML scenes (slicer-core via trame-slicer) and a real
worker process (see ``slicer_support`` for the helpers)."""

from __future__ import annotations

import pytest

from slicer_support import INTENSITY_CLASSIFIER, SMALL_UNET, intensity_classifier_state, save_spec_model, worker_command


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "classifier": save_spec_model(root / "intensity_classifier", INTENSITY_CLASSIFIER, task="classification",
                                      class_names=["no tumour", "tumour"], state_dict=intensity_classifier_state(),
                                      name="intensity_classifier"),
        "segmenter": save_spec_model(root / "small_unet", SMALL_UNET, task="segmentation", class_names=["background", "tumour"],
                                     name="small_unet"),
    }


@pytest.fixture(scope="session")
def worker():
    """One real worker process for the session (models stay loaded, as in Slicer)."""
    from XAIOverlayLib.worker_client import WorkerClient

    client = WorkerClient(worker_command())
    yield client
    client.shutdown()


@pytest.fixture
def app():
    """A fresh Slicer application core: scene, application logic, default colour nodes, orientations."""
    from slicer import vtkMRMLInteractionNode
    from trame_slicer.core import SlicerApp

    application = SlicerApp()
    application.scene.AddNode(vtkMRMLInteractionNode())
    yield application
    # Tearing down views whose layers still show volumes makes slicer-core's layer pipeline print
    # "vtkImageMapToColors: No LookupTable" for every view; that is teardown noise, not a test result.
    import gc

    import vtk

    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        application.scene.Clear(1)
        del application
        gc.collect()
    finally:
        vtk.vtkObject.GlobalWarningDisplayOn()


@pytest.fixture
def scene(app):
    return app.scene


@pytest.fixture
def logic(app, worker, tmp_path):
    from XAIOverlayLib.logic import OverlayLogic

    overlay = OverlayLogic(app.scene, client=worker, cache_root=tmp_path / "cache",
                           application_logic=app.app_logic, volume_rendering_logic=app.volume_rendering)
    overlay.prefetch_next = False
    yield overlay
    for job in list(overlay.jobs.values()):
        overlay.cancel(job)
        overlay.wait(job, timeout=60)


@pytest.fixture
def lesion_case(tmp_path):
    """(the volume with its known lesion, the NRRD file holding it)."""
    from slicer_support import head_with_lesion
    from xaioverlay.volumes import write_volume

    volume = head_with_lesion()
    return volume, write_volume(volume, tmp_path / "CT_1.nrrd")
