"""A list of patient volumes to click through: from a folder or from the volumes in the scene.

A folder case is a volume file (NIfTI, NRRD, MetaImage) or a sub-folder holding a DICOM series.
Loading a case reads it with Slicer's volume storage node (DICOM series with SimpleITK, through the
engine's reader) and tags the node with its file, so maps computed for the file in the background
are found in the cache once it is loaded (while the node is not edited or hardened). The file's
digest is read when first needed, on the logic's background thread, unless the next-case run read it
already. A case list owns only the nodes it loaded: releasing a case never removes a volume the user
loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import slicer

from . import nodes
from .cache import file_digest

FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Case:
    """One patient volume: a file, a DICOM folder, or a volume node already in the scene."""

    name: str
    path: Path | None = None
    node_id: str | None = None
    dicom: bool = False
    digest: str = field(default="", repr=False)

    @property
    def from_scene(self) -> bool:
        return self.path is None

    def file_digest(self) -> str:
        if not self.digest and self.path is not None:
            self.digest = file_digest(self.path)
        return self.digest


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _holds_dicom(folder: Path) -> bool:
    with os.scandir(folder) as entries:  # closed on the early return: an open handle pins the folder on Windows
        for entry in entries:
            if entry.is_file() and (entry.name.lower().endswith(".dcm") or "." not in entry.name):
                with open(entry.path, "rb") as handle:
                    handle.seek(128)
                    if handle.read(4) == b"DICM":
                        return True
    return False


def cases_from_folder(folder: str | os.PathLike) -> list[Case]:
    """Volume files and DICOM series folders directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"case folder {folder} does not exist; choose a folder of NIfTI/NRRD files or DICOM series")
    cases = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
        if entry.is_file() and entry.name.lower().endswith(FILE_SUFFIXES) and not entry.name.startswith("."):
            cases.append(Case(_case_name(entry), path=entry))
        elif entry.is_dir() and _holds_dicom(entry):
            cases.append(Case(entry.name, path=entry, dicom=True))
    if not cases:
        raise ValueError(f"{folder} holds no volume (.nii, .nii.gz, .nrrd, .mha) and no DICOM series folder")
    return cases


def cases_from_scene(scene) -> list[Case]:
    """The scalar volumes of the scene that are not the module's own maps, in scene order."""
    cases = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if node.IsA("vtkMRMLLabelMapVolumeNode") or nodes.attribute(node, "role") in (nodes.MAP, nodes.SEGMENTATION):
            continue
        if node.GetHideFromEditors():
            continue
        cases.append(Case(node.GetName(), node_id=node.GetID()))
    return cases


def load_case(scene, case: Case):
    """The case's volume node: found in the scene, or loaded and tagged as the case list's own."""
    if case.node_id and scene.GetNodeByID(case.node_id) is not None:
        return scene.GetNodeByID(case.node_id)
    if case.path is None:
        raise ValueError(f"case {case.name!r} is no longer in the scene; rebuild the case list")
    if case.dicom:
        node = _load_dicom(scene, case)
    else:
        node = nodes.add_volume_from_file(scene, case.path, case.name)
    node.CreateDefaultDisplayNodes()
    # the file's digest stands for the node until it changes; read (off the GUI thread) when first needed
    nodes.set_attributes(node, role=nodes.CASE, caseDigest=case.digest, casePath=str(case.path),
                         caseStamp=nodes.loaded_stamp(node))
    case.node_id = node.GetID()
    return node


def _load_dicom(scene, case: Case):
    """A DICOM series read with the engine's reader (SimpleITK), placed with its exact geometry."""
    import vtk
    from vtk.util import numpy_support

    from xaioverlay.volumes import read_volume

    volume = read_volume(case.path)
    array = volume.array
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape)
    scalars = numpy_support.numpy_to_vtk(array.transpose(2, 1, 0).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(case.name)
    node.SetAndObserveImageData(image)
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(volume.geometry.ijk_to_ras()[row, column]))
    node.SetIJKToRASMatrix(matrix)
    scene.AddNode(node)
    return node


def release_case(scene, volume, *, pinned: bool = False) -> None:
    """Remove a case's maps, table and model segmentation, and its volume if the case list loaded it.

    Nothing is removed for a pinned case.
    """
    if volume is None or pinned:
        return
    owned = [*nodes.owned_nodes(scene, nodes.MAP, source=volume.GetID()),
             *nodes.owned_nodes(scene, nodes.SEGMENTATION, source=volume.GetID()),
             *nodes.owned_nodes(scene, nodes.TABLE, source=volume.GetID())]
    nodes.remove_nodes(scene, owned)
    if nodes.attribute(volume, "role") == nodes.CASE:  # loaded by the case list, not the user's
        nodes.remove_nodes(scene, [volume])
    nodes.remove_empty_folders(scene)


class CaseBrowser:
    """A position in a case list; :meth:`step` moves and wraps nothing (stops at the ends)."""

    def __init__(self, cases: list[Case]) -> None:
        self.cases = list(cases)
        self.index = 0 if self.cases else -1

    @property
    def current(self) -> Case | None:
        return self.cases[self.index] if 0 <= self.index < len(self.cases) else None

    def peek(self, step: int = 1) -> Case | None:
        index = self.index + step
        return self.cases[index] if 0 <= index < len(self.cases) else None

    def step(self, step: int) -> Case | None:
        """Move by ``step`` (±1); returns the new case, or None (and no move) past either end."""
        index = self.index + step
        if not 0 <= index < len(self.cases):
            return None
        self.index = index
        return self.current
