"""Volumes keep their geometry through every format, and resampling follows physical space."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from support import blob_volume, oblique_geometry
from xaioverlay.errors import InputError
from xaioverlay.volumes import Geometry, Volume, read_volume, read_volumes, resample_array, write_volume


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_every_file_format_round_trips_array_and_oblique_geometry(tmp_path, suffix):
    geometry = oblique_geometry(size=(12, 10, 6))
    array = np.random.default_rng(1).normal(size=geometry.size).astype(np.float32)
    path = write_volume(Volume(array, geometry), tmp_path / f"vol{suffix}")
    back = read_volume(path)
    assert back.array.shape == geometry.size
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.geometry.ijk_to_lps(), geometry.ijk_to_lps(), atol=1e-4)
    assert back.name == "vol"


def write_dicom_series(folder, array, spacing, origin) -> None:
    """One DICOM file per k-plane of ``array`` ([i, j, k], int16), as a scanner writes a series."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[2]):
        plane = sitk.GetImageFromArray(array[:, :, k:k + 1].transpose(2, 1, 0).copy())  # one-slice 3D image
        position = (origin[0], origin[1], origin[2] + k * spacing[2])
        plane.SetSpacing(spacing)
        plane.SetOrigin(position)
        for tag, value in {
            "0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0032": "\\".join(f"{v:.4f}" for v in position), "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2]), "0020|0013": str(k + 1),
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{k + 1}",
        }.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(plane)


SERIES = (np.arange(6 * 7 * 5).reshape(6, 7, 5) % 97).astype(np.int16)  # [i, j, k]


def test_dicom_series_folder_reads_with_slice_geometry(tmp_path):
    spacing, origin = (0.8, 0.8, 2.5), (-40.0, 30.0, 12.0)
    write_dicom_series(tmp_path / "series", SERIES, spacing, origin)
    volume = read_volume(tmp_path / "series")
    assert volume.array.shape == (6, 7, 5)
    np.testing.assert_array_equal(volume.array, SERIES)
    np.testing.assert_allclose(volume.geometry.spacing, spacing, atol=1e-4)
    np.testing.assert_allclose(volume.geometry.origin, origin, atol=1e-4)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_dicom_series_with_a_truncated_slice_is_refused_naming_the_slice(tmp_path, fraction):
    write_dicom_series(tmp_path / "series", SERIES, (0.8, 0.8, 2.5), (-40.0, 30.0, 12.0))
    slice_file = tmp_path / "series" / "slice002.dcm"
    data = slice_file.read_bytes()
    slice_file.write_bytes(data[: int(len(data) * fraction)])  # GDCM leaves it out of the series, silently
    with pytest.raises(InputError, match="slice002.dcm is truncated or corrupt") as error:
        read_volume(tmp_path / "series")
    assert "\n" not in str(error.value)


def test_dicom_objects_of_other_series_beside_the_slices_are_left_alone(tmp_path):
    """A dose report (SR) or DICOMDIR in an exported folder is not a damaged slice (GDCM reads no image from it)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    write_dicom_series(tmp_path / "series", SERIES, (0.8, 0.8, 2.5), (-40.0, 30.0, 12.0))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.67", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report = Dataset()
    report.file_meta, report.Modality, report.SeriesInstanceUID = meta, "SR", generate_uid()
    report.SOPClassUID, report.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    report.save_as(tmp_path / "series" / "dose_report.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(read_volume(tmp_path / "series").array, SERIES)


def test_ras_affine_matches_nibabel_reading_the_same_nifti(tmp_path):
    import nibabel

    geometry = oblique_geometry(size=(9, 8, 7))
    path = write_volume(Volume(np.zeros(geometry.size, np.float32), geometry), tmp_path / "v.nii.gz")
    np.testing.assert_allclose(read_volume(path).geometry.ijk_to_ras(), nibabel.load(str(path)).affine, atol=1e-4)


def test_resample_array_puts_a_physical_point_at_the_same_place_on_another_grid():
    source = oblique_geometry(size=(40, 36, 20))
    centre = source.ijk_to_ras_points([[22, 15, 9]])[0]
    volume = blob_volume(source, centre, radius_mm=5.0)
    lps_centre = np.array([-centre[0], -centre[1], centre[2]])
    target = Geometry((50, 50, 40), (1.0, 1.0, 1.0), tuple(lps_centre - 20.0))  # axis-aligned LPS grid around it
    resampled = resample_array(volume.array, source.ijk_to_ras(), target.size, target.ijk_to_ras(), interpolation="nearest")
    inside = np.argwhere(resampled > 0.5)
    assert len(inside) > 100
    centroid_ras = target.ijk_to_ras_points(inside.mean(0, keepdims=True))[0]
    assert np.linalg.norm(centroid_ras - centre) < 1.0


def test_linear_function_of_position_is_reproduced_exactly_by_linear_resampling():
    source = Geometry((30, 30, 30), (2.0, 2.0, 2.0), (-30.0, -30.0, -30.0))
    target = oblique_geometry(size=(12, 12, 6), spacing=(1.5, 1.1, 2.0), origin=(-5.0, -8.0, -10.0))
    def field(ras):
        return 0.5 * ras[..., 0] - 0.25 * ras[..., 1] + 2.0 * ras[..., 2] + 7.0
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in source.size], indexing="ij"), -1).reshape(-1, 3)
    values = field(source.ijk_to_ras_points(grid)).reshape(source.size).astype(np.float32)
    out = resample_array(values, source.ijk_to_ras(), target.size, target.ijk_to_ras())
    tgrid = np.stack(np.meshgrid(*[np.arange(n) for n in target.size], indexing="ij"), -1).reshape(-1, 3)
    expected = field(target.ijk_to_ras_points(tgrid)).reshape(target.size)
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_channels_on_other_grids_are_resampled_onto_the_first(tmp_path):
    first = oblique_geometry(size=(30, 28, 12))
    centre = first.ijk_to_ras_points([[15, 14, 6]])[0]
    a = write_volume(blob_volume(first, centre, 6.0), tmp_path / "a.nrrd")
    other = Geometry((60, 60, 40), (1.0, 1.0, 1.0), tuple(np.array([-centre[0], -centre[1], centre[2]]) - 30))
    b = write_volume(blob_volume(other, centre, 6.0, value=5.0), tmp_path / "b.nii.gz")
    volumes = read_volumes([a, b])
    assert volumes[1].geometry == volumes[0].geometry
    assert volumes[1].array[15, 14, 6] == pytest.approx(5.0, abs=0.5)


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing.nrrd", "no such file"),
    (lambda p: (p / "a.txt").write_text("x") and p / "a.txt", "unsupported file type"),
])
def test_bad_paths_give_one_line_errors(tmp_path, make, message):
    with pytest.raises(InputError, match=message) as error:
        read_volume(make(tmp_path))
    assert "\n" not in str(error.value)


def test_2d_image_and_nan_voxels_are_refused(tmp_path):
    flat = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkFloat32), str(flat))
    with pytest.raises(InputError, match="not a 3D volume"):
        read_volume(flat)
    array = np.zeros((8, 8, 8), np.float32)
    array[2, 3, 4] = np.nan
    array[1, 1, 1] = np.inf
    path = write_volume(Volume(array, Geometry((8, 8, 8), (1, 1, 1), (0, 0, 0))), tmp_path / "nan.nrrd")
    with pytest.raises(InputError, match="2 NaN or infinite voxels"):
        read_volume(path)
