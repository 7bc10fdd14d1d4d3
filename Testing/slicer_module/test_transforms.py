"""Targets, reference segmentations and outputs of a volume under a parent transform (registration).

Markups give world coordinates, the volume's voxels (and the file written for the worker) are in its own
frame: a region must select the same anatomy with and without the transform, and the maps and the
model's segmentation come back under the volume's transform. Non-linear transforms are refused.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import slicer
import vtk
from vtk.util import numpy_support

from slicer_support import (grid_centre, head_with_lesion, lesion_centre, lesion_mask, linear_transform, load_volume,
                            segmentation_of)
from xaioverlay.targets import parse_target
from xaioverlay.volumes import read_volume, write_volume
from XAIOverlayLib import compare, nodes
from XAIOverlayLib.logic import ExplainRequest, measurement
from XAIOverlayLib.target_spec import POINT, ROI, SEGMENT, TargetChoice, build_target

HARDEN = "is under a non-linear transform; harden it first"


def moved(kind: str, centre: np.ndarray) -> np.ndarray:
    """4×4: +50 mm along R, or 30° about S around ``centre`` (the anatomy stays in view) plus 10 mm along A."""
    matrix = np.eye(4)
    if kind == "translation":
        matrix[:3, 3] = (50.0, 0.0, 0.0)
        return matrix
    angle = np.radians(30.0)
    matrix[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    matrix[:3, 3] = centre - matrix[:3, :3] @ centre + (0.0, 10.0, 0.0)
    return matrix


def apply(matrix: np.ndarray, points) -> np.ndarray:
    points = np.atleast_2d(points)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def region(kind: str, **nodes_and_radius) -> TargetChoice:
    """Channel ``tumour`` of a segmenter over a region of ``kind`` (ROI, POINT, SEGMENT)."""
    return TargetChoice("segmentation", "tumour", kind, **nodes_and_radius)


def grid_transform(scene):
    """A real non-linear transform: a coarse displacement grid bending space by up to 3 mm."""
    grid = vtk.vtkImageData()
    grid.SetDimensions(4, 4, 4)
    grid.SetSpacing(40.0, 40.0, 40.0)
    grid.SetOrigin(-40.0, -60.0, -40.0)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars())[:] = np.random.default_rng(0).uniform(-3, 3, (64, 3))
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    node = slicer.vtkMRMLGridTransformNode()
    scene.AddNode(node)
    node.SetAndObserveTransformFromParent(transform)
    return node


def selected_voxels(spec: str, volume) -> np.ndarray:
    """(X, Y, Z) bool: the voxels of ``volume``'s own grid a box, point or mask target selects (as the
    engine reads it: in the frame of the file written for the worker)."""
    target = parse_target(spec)
    geometry = volume.geometry
    if target.region == "mask":
        mask = read_volume(target.mask_path)
        assert mask.geometry.same_grid(geometry)
        return mask.array > 0
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.size], indexing="ij"), -1).reshape(-1, 3)
    ras = geometry.ijk_to_ras_points(ijk)
    if target.region == "box":
        corners = np.array(target.numbers).reshape(2, 3)
        inside = ((ras >= corners.min(0)) & (ras <= corners.max(0))).all(1)
    else:
        inside = np.linalg.norm(ras - np.array(target.numbers[:3]), axis=1) <= target.numbers[3]
    return inside.reshape(geometry.size)


@pytest.fixture
def head(scene, tmp_path):
    """(the volume, its node)."""
    volume = head_with_lesion()
    return volume, load_volume(scene, write_volume(volume, tmp_path / "CT_1.nrrd"), "CT_1")


def lesion_roi(scene, centre, size=(12.0, 10.0, 8.0)):
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    roi.SetCenter(*[float(v) for v in centre])
    roi.SetSize(*size)
    return roi


@pytest.mark.parametrize("kind", ["translation", "rotation"])
@pytest.mark.parametrize("under", ["volume", "markup", "both"])
def test_point_target_is_the_same_anatomy_under_transforms(scene, head, tmp_path, kind, under):
    """The point sits on the lesion as the user sees it, wherever the transforms put the volume."""
    volume, anatomy = head
    plain = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(plain)
    plain.AddControlPoint(*[float(v) for v in lesion_centre(volume.geometry)])
    expected, _ = build_target(region(POINT, point=plain, radius_mm=6.0), anatomy, tmp_path)

    matrix = moved(kind, grid_centre(volume.geometry))
    transform = linear_transform(scene, matrix)
    volume_to_world = matrix if under in ("volume", "both") else np.eye(4)
    point = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(point)
    if under in ("volume", "both"):
        anatomy.SetAndObserveTransformNodeID(transform.GetID())
    seen = apply(volume_to_world, lesion_centre(volume.geometry))[0]  # where the lesion is shown
    if under in ("markup", "both"):
        point.SetAndObserveTransformNodeID(transform.GetID())
        seen = apply(np.linalg.inv(matrix), seen)[0]  # the markup's own coordinates of that place
    point.AddControlPoint(*[float(v) for v in seen])
    spec, _ = build_target(region(POINT, point=point, radius_mm=6.0), anatomy, tmp_path)
    assert parse_target(spec).numbers == pytest.approx(parse_target(expected).numbers, abs=2e-3)
    assert np.array_equal(selected_voxels(spec, volume), selected_voxels(expected, volume))


@pytest.mark.parametrize("kind", ["translation", "rotation"])
def test_roi_moved_with_the_volume_selects_the_same_voxels(scene, head, tmp_path, kind):
    """Volume and ROI under one registration transform: the same box in the volume's frame."""
    volume, anatomy = head
    plain_spec, _ = build_target(region(ROI, roi=lesion_roi(scene, lesion_centre(volume.geometry))), anatomy, tmp_path)
    transform = linear_transform(scene, moved(kind, grid_centre(volume.geometry)))
    roi = lesion_roi(scene, lesion_centre(volume.geometry))
    for node in (anatomy, roi):
        node.SetAndObserveTransformNodeID(transform.GetID())
    spec, _ = build_target(region(ROI, roi=roi), anatomy, tmp_path)
    assert parse_target(spec).region == "box"
    assert parse_target(spec).numbers == pytest.approx(parse_target(plain_spec).numbers, abs=2e-3)
    assert np.array_equal(selected_voxels(spec, volume), selected_voxels(plain_spec, volume))


def test_translated_volume_reads_a_world_roi_in_its_own_frame(scene, head, tmp_path):
    """Volume +50 mm along R; the ROI drawn around the lesion where it is shown: the same box as without."""
    volume, anatomy = head
    plain_spec, _ = build_target(region(ROI, roi=lesion_roi(scene, lesion_centre(volume.geometry))), anatomy, tmp_path)
    anatomy.SetAndObserveTransformNodeID(linear_transform(scene, moved("translation", None)).GetID())
    roi = lesion_roi(scene, lesion_centre(volume.geometry) + (50.0, 0.0, 0.0))
    spec, _ = build_target(region(ROI, roi=roi), anatomy, tmp_path)
    assert parse_target(spec).numbers == pytest.approx(parse_target(plain_spec).numbers, abs=2e-3)


@pytest.mark.parametrize("under", ["volume", "markup"])
def test_rotated_roi_selects_exactly_the_voxels_inside_it(scene, head, tmp_path, under):
    """Rotated 30° about S relative to the volume: not its bounding box, the voxels whose centres it holds."""
    volume, anatomy = head
    matrix = moved("rotation", grid_centre(volume.geometry))
    transform = linear_transform(scene, matrix)
    centre, size = lesion_centre(volume.geometry), np.array([16.0, 6.0, 8.0])
    roi = lesion_roi(scene, centre, tuple(size))
    (roi if under == "markup" else anatomy).SetAndObserveTransformNodeID(transform.GetID())
    spec, text = build_target(region(ROI, roi=roi), anatomy, tmp_path)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in volume.geometry.size], indexing="ij"), -1).reshape(-1, 3)
    ras = volume.geometry.ijk_to_ras_points(ijk)
    roi_to_volume = matrix if under == "markup" else np.linalg.inv(matrix)
    in_roi_frame = apply(np.linalg.inv(roi_to_volume), ras)
    expected = (np.abs(in_roi_frame - centre) <= size / 2).all(1).reshape(volume.geometry.size)
    assert expected.sum() > 100
    assert np.array_equal(selected_voxels(spec, volume), expected)
    assert text.startswith("channel:tumour@mask:") and str(tmp_path) not in text  # cached by content, not path


@pytest.mark.parametrize("kind", ["translation", "rotation"])
def test_segment_and_reference_under_the_volumes_transform_keep_their_voxels(scene, head, tmp_path, kind):
    volume, anatomy = head
    segmentation = segmentation_of(scene, volume, lesion_mask(volume), tmp_path)
    transform = linear_transform(scene, moved(kind, grid_centre(volume.geometry)))
    for node in (anatomy, segmentation):
        node.SetAndObserveTransformNodeID(transform.GetID())
    spec, _ = build_target(region(SEGMENT, segmentation=segmentation), anatomy, tmp_path)
    assert np.array_equal(selected_voxels(spec, volume), lesion_mask(volume))
    request = ExplainRequest([anatomy], "model", ["gradcam"], evaluate=True, reference=segmentation)
    reference, _ = measurement(request, anatomy, tmp_path)
    assert np.array_equal(read_volume(reference).array > 0, lesion_mask(volume))


def test_segment_under_its_own_transform_is_read_where_it_is_shown(scene, head, tmp_path):
    """The segmentation moved 3 voxels along the volume's first axis: so is its mask on the volume's grid."""
    volume, anatomy = head
    segmentation = segmentation_of(scene, volume, lesion_mask(volume), tmp_path)
    shift = np.eye(4)
    shift[:3, 3] = volume.geometry.ijk_to_ras()[:3, 0] * 3
    segmentation.SetAndObserveTransformNodeID(linear_transform(scene, shift).GetID())
    spec, _ = build_target(region(SEGMENT, segmentation=segmentation), anatomy, tmp_path)
    assert np.array_equal(selected_voxels(spec, volume), np.roll(lesion_mask(volume), 3, axis=0))


def test_a_segment_outside_the_volume_is_refused_before_any_work(scene, head, tmp_path):
    volume, anatomy = head
    segmentation = segmentation_of(scene, volume, lesion_mask(volume), tmp_path)
    anatomy.SetAndObserveTransformNodeID(linear_transform(scene, moved("translation", None)).GetID())
    with pytest.raises(ValueError, match="lie outside volume 'CT_1'"):
        build_target(region(SEGMENT, segmentation=segmentation), anatomy, tmp_path)


@pytest.mark.parametrize("where", ["volume", "roi", "point", "segmentation", "reference"])
def test_a_non_linear_transform_is_refused_with_the_fix(scene, head, tmp_path, where):
    volume, anatomy = head
    roi = lesion_roi(scene, lesion_centre(volume.geometry))
    point = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(point)
    point.AddControlPoint(*[float(v) for v in lesion_centre(volume.geometry)])
    segmentation = segmentation_of(scene, volume, lesion_mask(volume), tmp_path)
    regions = {"roi": region(ROI, roi=roi),
               "point": region(POINT, point=point),
               "segmentation": region(SEGMENT, segmentation=segmentation)}
    bent = {"volume": anatomy, "roi": roi, "point": point, "segmentation": segmentation,
            "reference": segmentation}[where]
    bent.SetAndObserveTransformNodeID(grid_transform(scene).GetID())
    message = "^" + re.escape(f"{bent.GetName()!r} {HARDEN} (Data module → right-click → Harden transform)") + "$"
    if where == "reference":
        with pytest.raises(ValueError, match=message):
            request = ExplainRequest([anatomy], "model", ["gradcam"], evaluate=True, reference=segmentation)
            measurement(request, anatomy, tmp_path)
    for name, choice in regions.items():
        if where in ("volume", name):
            with pytest.raises(ValueError, match=message):
                build_target(choice, anatomy, tmp_path)


def test_maps_and_model_segmentation_come_back_under_the_volumes_transform(scene, head, logic, models, tmp_path):
    volume, anatomy = head
    matrix = moved("rotation", grid_centre(volume.geometry))
    transform = linear_transform(scene, matrix)
    segmentation = segmentation_of(scene, volume, lesion_mask(volume), tmp_path)
    for node in (anatomy, segmentation):
        node.SetAndObserveTransformNodeID(transform.GetID())
    choice = TargetChoice(key="tumour", region=SEGMENT, segmentation=segmentation)
    job = logic.wait(logic.explain(ExplainRequest([anatomy], str(models["segmenter"]), ["gradcam"], choice)))
    assert job.state == "done", job.error
    target = nodes.attribute(logic.map_nodes(job)[0], "target", parse=True)
    lesion = lesion_mask(volume).sum()
    assert abs(target["voxels"] - lesion) <= 0.02 * lesion  # the lesion, not a place beside it
    model_segmentation = scene.GetNodeByID(job.segmentation_id)
    for output in (*logic.map_nodes(job), model_segmentation):
        assert output.GetTransformNodeID() == transform.GetID(), output.GetName()
    np.testing.assert_allclose(nodes.ijk_to_ras(logic.map_nodes(job)[0]), volume.geometry.ijk_to_ras(), atol=1e-4)
    # the model's segmentation, read back on the volume's grid, holds the voxels the worker wrote
    path, _ = build_target(TargetChoice("segmentation", "1", SEGMENT, segmentation=model_segmentation), anatomy,
                           tmp_path)
    written = read_volume(logic.cache.get(job.segmentation_key).path).array
    assert np.array_equal(selected_voxels(path, volume), written == 1)


def test_views_jump_to_the_map_peak_where_it_is_shown(scene, head, logic, models):
    """Under a transform the peak is shown at the transformed position: the views must go there."""
    volume, anatomy = head
    matrix = moved("rotation", grid_centre(volume.geometry))
    anatomy.SetAndObserveTransformNodeID(linear_transform(scene, matrix).GetID())
    request = ExplainRequest([anatomy], str(models["classifier"]), ["gradcam"], TargetChoice(key="tumour"))
    job = logic.wait(logic.explain(request))
    assert job.state == "done", job.error
    heat = logic.map_nodes(job)[0]
    values = nodes.voxels(heat)
    local = volume.geometry.ijk_to_ras_points([np.unravel_index(int(np.argmax(np.abs(values))), values.shape)])
    np.testing.assert_allclose(compare.peak_ras(heat), apply(matrix, local)[0], atol=1e-4)


def test_box_mask_clips_to_the_grid():
    """A box larger than the grid holds all of it, one beside it none (the visited extent is clipped)."""
    from XAIOverlayLib.target_spec import box_mask

    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    turn = moved("rotation", np.zeros(3))
    assert box_mask(affine, (5, 6, 7), turn, np.full(3, -100.0), np.full(3, 100.0)).all()
    assert not box_mask(affine, (5, 6, 7), turn, np.full(3, 200.0), np.full(3, 300.0)).any()
