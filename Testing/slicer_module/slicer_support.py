"""Helpers for the Slicer-side tests: volumes with a known lesion, small models whose explanations are
known in advance, requests, offscreen rendering.

The intensity classifier is a MONAI ``Classifier`` whose weights are set by hand: a 1×1×1 convolution
copies the input into feature channel 0 and the tumour logit is the mean of that channel. Its
Grad-CAM (and HiResCAM) map for class ``tumour`` is therefore proportional to the input intensity:
the map's top voxels are the bright lesion, wherever the lesion is placed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from support import SMALL_UNET, blob_volume, oblique_geometry, save_spec_model  # noqa: F401  (for the tests)
from tools.offscreen_views import capture, create_views, pixel_of, write_png  # noqa: F401  (for the tests)
from xaioverlay.volumes import Geometry, Volume


SIZE = (32, 32, 32)
LESION_OFFSET = (6.0, -5.0, 3.0)  # RAS mm from the head's centre
LESION_RADIUS = 9.0
HEAD_RADIUS = 20.0


def lesion_geometry() -> Geometry:
    """Oblique, anisotropic, off-origin grid: the hard case for geometry."""
    return oblique_geometry(size=SIZE, spacing=(1.4, 1.3, 1.5), origin=(40.0, 10.0, 20.0), angles=(0.35, 0.2))


def grid_centre(geometry: Geometry) -> np.ndarray:
    return geometry.ijk_to_ras_points(np.array([(np.array(geometry.size) - 1) / 2]))[0]


def lesion_centre(geometry: Geometry) -> np.ndarray:
    """RAS mm of the lesion: a fixed offset from the grid's centre."""
    return grid_centre(geometry) + np.array(LESION_OFFSET)


def head_with_lesion(geometry: Geometry | None = None, seed: int = 0, name: str = "CT_1") -> Volume:
    """A head (sphere, 20 with noise) holding a bright lesion (60 at its rim to 100 at its centre);
    0 outside the head."""
    geometry = geometry or lesion_geometry()
    head = blob_volume(geometry, grid_centre(geometry), HEAD_RADIUS, value=20.0).array
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.size], indexing="ij"), -1).reshape(-1, 3)
    distance = np.linalg.norm(geometry.ijk_to_ras_points(ijk) - lesion_centre(geometry), axis=1).reshape(geometry.size)
    lesion = np.where(distance <= LESION_RADIUS, 40.0 + 40.0 * (1 - (distance / LESION_RADIUS) ** 2), 0.0)
    noise = np.random.default_rng(seed).normal(0, 1.0, head.shape).astype(np.float32)
    array = np.where(head > 0, head + lesion + noise, 0.0).astype(np.float32)
    return Volume(array, geometry, name)


def lesion_mask(volume: Volume) -> np.ndarray:
    """(X, Y, Z) bool: the lesion's voxels."""
    return blob_volume(volume.geometry, lesion_centre(volume.geometry), LESION_RADIUS).array > 0


def intensity_classifier_state(size=SIZE) -> dict:
    n = int(np.prod(size))
    state = {
        "net.layer_0.conv.weight": torch.tensor([1.0, 0.0]).view(2, 1, 1, 1, 1),
        "net.layer_0.conv.bias": torch.zeros(2),
        "final.1.weight": torch.zeros(2, 2 * n),
        "final.1.bias": torch.zeros(2),
    }
    state["final.1.weight"][1, :n] = 1.0 / n   # tumour logit = mean intensity
    state["final.1.weight"][0, :n] = -1.0 / n
    return state


INTENSITY_CLASSIFIER = {"name": "Classifier", "args": {"in_shape": [1, *SIZE], "classes": 2, "channels": [2], "strides": [1],
                                                       "kernel_size": 1, "num_res_units": 0, "norm": None}}


def worker_command() -> list[str]:
    """The worker as Slicer starts it, with this interpreter standing in for PythonSlicer."""
    return [sys.executable, "-u", "-m", "xaioverlay.worker"]


def load_volume(scene, path: Path, name: str):
    from XAIOverlayLib import nodes

    node = nodes.add_volume_from_file(scene, path, name)
    node.CreateDefaultDisplayNodes()
    return node


def segmentation_of(scene, volume: Volume, mask: np.ndarray, folder: Path):
    """A segmentation node holding ``mask`` (on ``volume``'s grid) as one segment."""
    import slicer

    from XAIOverlayLib import nodes
    from xaioverlay.volumes import write_volume

    path = write_volume(Volume(mask.astype(np.uint8), volume.geometry), folder / "seg.nrrd")
    labelmap = nodes.add_volume_from_file(scene, path, "lesion", labelmap=True)
    segmentation = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation)
    segmentation.CreateDefaultDisplayNodes()
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    return segmentation


def linear_transform(scene, matrix: np.ndarray):
    """A linear transform node (4×4 to parent) added to ``scene``."""
    import slicer
    import vtk

    node = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(node)
    vtk_matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            vtk_matrix.SetElement(row, column, float(matrix[row, column]))
    node.SetMatrixTransformToParent(vtk_matrix)
    return node


def classifier_request(volume_node, model: Path, methods=("gradcam", "hirescam"), key: str = "tumour"):
    from XAIOverlayLib.logic import ExplainRequest
    from XAIOverlayLib.target_spec import TargetChoice

    return ExplainRequest([volume_node], str(model), list(methods), TargetChoice(key=key))


def scene_node_ids(scene) -> list[str]:
    collection = scene.GetNodes()
    return sorted(collection.GetItemAsObject(i).GetID() for i in range(collection.GetNumberOfItems()))



def describe_now(logic, model, timeout: float = 120.0, device: str = "auto", options: dict | None = None) -> dict:
    """The model's description, processing the logic's events until it arrives (its callback)."""
    import time

    answers: list = []
    logic.describe(str(model), device, then=answers.append, failed=answers.append, options=options)
    deadline = time.monotonic() + timeout
    while not answers:
        assert time.monotonic() < deadline, f"no description of {model} within {timeout} s"
        logic.process_events(0.1)
    assert isinstance(answers[0], dict), answers[0]
    return answers[0]
