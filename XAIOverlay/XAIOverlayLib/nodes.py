"""Volume nodes and files, node attributes, the subject-hierarchy folder: the module's MRML basics.

Everything takes the scene (or nodes) as arguments and uses the MRML API only, so it runs in desktop
Slicer and in ``slicer-core`` alike. Volumes travel to and from the worker as NRRD files written and
read by Slicer's own volume storage node, so the geometry (IJK-to-RAS) is exactly what Slicer shows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import slicer
import vtk

from .cache import file_digest, volume_digest

#: Prefix of every node attribute the module sets.
PREFIX = "XAIOverlay."
#: ``XAIOverlay.role`` values of the nodes the module owns.
MAP, SEGMENTATION, SEGMENTS, TABLE, COLOUR, CASE = "map", "segmentation", "segments", "table", "colour", "case"


# --- attributes --------------------------------------------------------------------------------
def set_attributes(node, **values) -> None:
    """Store values as ``XAIOverlay.<name>`` attributes (dicts and lists as JSON)."""
    for name, value in values.items():
        text = json.dumps(value) if isinstance(value, (dict, list, tuple, bool)) else str(value)
        node.SetAttribute(PREFIX + name, text)


def attribute(node, name: str, default=None, *, parse: bool = False):
    """``XAIOverlay.<name>`` of ``node`` (parsed from JSON when ``parse``), else ``default``."""
    value = node.GetAttribute(PREFIX + name) if node is not None else None
    if value is None:
        return default
    return json.loads(value) if parse else value


def owned_nodes(scene, role: str | None = None, **match) -> list:
    """Nodes the module made (``XAIOverlay.role`` set), filtered by role and attribute values."""
    found = []
    collection = scene.GetNodes()
    for index in range(collection.GetNumberOfItems()):
        node = collection.GetItemAsObject(index)
        own = node.GetAttribute(PREFIX + "role")
        if own is None or (role is not None and own != role):
            continue
        if all(node.GetAttribute(PREFIX + key) == str(value) for key, value in match.items()):
            found.append(node)
    return found


def remove_nodes(scene, nodes: Iterable) -> None:
    """Remove nodes with their display nodes and the per-map colour tables the module made for them."""
    for node in list(nodes):
        if node is None or scene.GetNodeByID(node.GetID()) is None:
            continue
        if hasattr(node, "GetNumberOfDisplayNodes"):
            for index in reversed(range(node.GetNumberOfDisplayNodes())):
                display = node.GetNthDisplayNode(index)
                if display is None:
                    continue
                colour = display.GetColorNode() if hasattr(display, "GetColorNode") else None
                if colour is not None and colour.GetAttribute(PREFIX + "owner") == node.GetID():
                    scene.RemoveNode(colour)
                scene.RemoveNode(display)
        if hasattr(node, "GetStorageNode") and node.GetStorageNode() is not None:
            scene.RemoveNode(node.GetStorageNode())
        scene.RemoveNode(node)


# --- geometry and voxels -------------------------------------------------------------------------
def matrix_array(matrix) -> np.ndarray:
    """A vtkMatrix4x4 as a 4×4 numpy array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(node) -> np.ndarray:
    """4×4 voxel → RAS mm matrix of a volume node (before any parent transform)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix_array(matrix)


def to_world(node) -> np.ndarray:
    """4×4 matrix from the node's own RAS frame to world RAS through its parent transforms (identity
    without one). A volume's voxels are in its own frame: that is the frame written for the worker.

    Raises ValueError (one line, naming the fix) when a transform in the chain is not linear.
    """
    matrix = vtk.vtkMatrix4x4()
    transform = node.GetParentTransformNode()
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise ValueError(f"{node.GetName()!r} is under a non-linear transform; harden it first "
                             "(Data module → right-click → Harden transform)")
        transform.GetMatrixTransformToWorld(matrix)
    return matrix_array(matrix)


def voxels(node) -> np.ndarray:
    """A read-only view of a scalar volume's voxels, indexed ``[i, j, k]``."""
    from vtk.util import numpy_support

    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume {node.GetName()!r} has no voxels; load image data first")
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise ValueError(f"volume {node.GetName()!r} has {scalars.GetNumberOfComponents()} components per voxel; choose a scalar volume")
    array = numpy_support.vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0]).transpose(2, 1, 0)
    array.flags.writeable = False
    return array


def voxel_digest(node) -> str:
    """The node's current content (:func:`.cache.volume_digest` of its voxels and IJK-to-RAS)."""
    return volume_digest(voxels(node), ijk_to_ras(node))


def loaded_stamp(node) -> str:
    """Changes whenever the node's voxels (its image data's modification time) or its geometry change."""
    image = node.GetImageData()
    return json.dumps([image.GetMTime() if image is not None else 0, np.round(ijk_to_ras(node), 6).tolist()])


@dataclass(frozen=True)
class VolumeSnapshot:
    """A volume's voxels and geometry copied on the main thread (:func:`snapshot`), so that hashing and
    writing them can run on another thread without touching MRML or VTK."""

    array: np.ndarray  # (X, Y, Z), a copy
    ijk_to_ras: np.ndarray  # 4×4
    case: tuple[str, str] | None = None  # see unchanged_case

    def digest(self) -> str:
        """The same text :func:`content_digest` gives the node for this channel (it may read the case file)."""
        return case_digest(self.case) if self.case else volume_digest(self.array, self.ijk_to_ras)

    def write(self, path: str | Path) -> Path:
        """Write the voxels to NRRD (uncompressed, atomically) on their exact grid."""
        from xaioverlay.volumes import Geometry, Volume, write_volume

        geometry = Geometry.from_ijk_to_ras(self.ijk_to_ras, self.array.shape)
        return write_volume(Volume(self.array, geometry), path, compress=False)


def snapshot(node) -> VolumeSnapshot:
    """Copy a volume node's voxels and geometry (fast: one memory copy) for work off the main thread."""
    return VolumeSnapshot(np.array(voxels(node)), ijk_to_ras(node), unchanged_case(node))


def unchanged_case(node) -> tuple[str, str] | None:
    """(the file's digest, "" while not computed yet; its path) of the case file the node was loaded
    from, while the node has not changed since (same :func:`loaded_stamp`); else None."""
    path = attribute(node, "casePath")
    if not path or attribute(node, "caseStamp") != loaded_stamp(node):
        return None
    return attribute(node, "caseDigest") or "", path


def case_digest(case: tuple[str, str]) -> str:
    """The case file's digest: the one recorded, or read from the file (no MRML: any thread)."""
    digest, path = case
    return digest or file_digest(path)


def content_digest(nodes: Iterable) -> str:
    """The identity of one multi-channel input, for the map cache: its current voxels and geometry.

    A volume loaded from a case file and not changed since (same :func:`loaded_stamp`) is known by
    that file's digest (``XAIOverlay.caseDigest``), so a case explained in the background before it
    was loaded is found again once it is; once edited or hardened it is known by its voxels.
    """
    def digest(node) -> str:
        case = unchanged_case(node)
        return case_digest(case) if case else voxel_digest(node)

    return combine_digests([digest(node) for node in nodes])


def combine_digests(digests: Iterable[str]) -> str:
    """One digest for the channels of an input, in channel order."""
    digest = hashlib.sha256()
    for text in digests:
        digest.update(text.encode())
    return digest.hexdigest()


# --- files ---------------------------------------------------------------------------------------
def write_volume_file(node, path: str | Path, *, compress: bool = False) -> Path:
    """Write a volume node to NRRD with Slicer's storage node; the node itself is not changed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(int(compress))
    if not storage.WriteData(node):
        raise OSError(f"cannot write {node.GetName()!r} to {path}; check free disk space and permissions")
    return path


def read_volume_file(path: str | Path, node):
    """Read a volume file (NRRD, NIfTI, ...) into ``node`` with Slicer's storage node; returns ``node``."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    if not storage.ReadData(node):
        raise OSError(f"cannot read volume file {path}; it is missing or not a volume")
    return node


def add_volume_from_file(scene, path: str | Path, name: str, *, labelmap: bool = False):
    """A new scalar (or label map) volume node read from ``path``, added to ``scene``."""
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    read_volume_file(path, node)
    scene.AddNode(node)
    return node


# --- subject hierarchy ---------------------------------------------------------------------------
def subject_hierarchy(scene):
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def hierarchy_item(scene, node) -> int:
    """The node's subject-hierarchy item (created at scene level if Slicer has not made one yet)."""
    sh = subject_hierarchy(scene)
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    return item


def study_item(scene, node) -> int:
    """The study holding ``node`` (its nearest ancestor of level Study), else the node's parent item."""
    sh = subject_hierarchy(scene)
    parent = sh.GetItemParent(hierarchy_item(scene, node))
    ancestor = parent
    while ancestor and ancestor != sh.GetSceneItemID():
        if sh.GetItemLevel(ancestor) == "Study":
            return ancestor
        ancestor = sh.GetItemParent(ancestor)
    return parent or sh.GetSceneItemID()


def xai_folder(scene, source, model_name: str) -> int:
    """The folder ``XAI · <model>`` under the source volume's study (made once, then reused)."""
    sh = subject_hierarchy(scene)
    parent = study_item(scene, source)
    name = f"XAI · {model_name}"
    children = vtk.vtkIdList()
    sh.GetItemChildren(parent, children)
    for index in range(children.GetNumberOfIds()):
        child = children.GetId(index)
        if sh.GetItemName(child) == name and sh.GetItemAttribute(child, PREFIX + "role") == "folder":
            return child
    folder = sh.CreateFolderItem(parent, name)
    sh.SetItemAttribute(folder, PREFIX + "role", "folder")
    return folder


def place_in_folder(scene, node, folder: int) -> None:
    sh = subject_hierarchy(scene)
    sh.SetItemParent(hierarchy_item(scene, node), folder)


def remove_empty_folders(scene) -> None:
    """Remove the module's ``XAI · ...`` folders that no longer hold anything."""
    sh = subject_hierarchy(scene)
    items = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), items, True)
    for index in range(items.GetNumberOfIds()):
        item = items.GetId(index)
        if sh.GetItemAttribute(item, PREFIX + "role") == "folder" and sh.GetNumberOfItemChildren(item) == 0:
            sh.RemoveItem(item)
