"""Maps land on the anatomy: the first input's exact grid, whatever the model's preprocessing did."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from support import blob_volume, oblique_geometry, save_bundle
from xaioverlay.cli import main
from xaioverlay.explain import explain, to_input_grid
from xaioverlay.models import load_model
from xaioverlay.volumes import read_volume, write_volume

# A blob detector: 5³ box filter minus a threshold, ReLU, global max pooling, two logits (-s, +s).
# Grad-CAM on the ReLU output equals the filtered image scaled by 1/N: its peak is the brightest blob.
DETECTOR = "$torch.nn.Sequential(torch.nn.Conv3d(1, 1, 5, padding=2), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool3d(1), torch.nn.Flatten(), torch.nn.Linear(1, 2))"
REORIENT_AND_RESAMPLE = [
    {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
    {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
]


def detector_weights() -> dict:
    return {
        "0.weight": torch.full((1, 1, 5, 5, 5), 1 / 125), "0.bias": torch.tensor([-0.2]),
        "4.weight": torch.tensor([[-1.0], [1.0]]), "4.bias": torch.zeros(2),
    }


def detector_bundle(folder):
    return save_bundle(folder, DETECTOR, detector_weights(), preprocessing=REORIENT_AND_RESAMPLE,
                       output_type="probabilities", class_names=["no lesion", "lesion"])


def lesion_and_decoy(geometry):
    """A bright lesion and a dimmer decoy at known physical (RAS) places on ``geometry``."""
    lesion = geometry.ijk_to_ras_points([[30, 14, 8]])[0]
    decoy = geometry.ijk_to_ras_points([[12, 26, 14]])[0]
    volume = blob_volume(geometry, lesion, 7.0, value=1.0)
    volume.array += blob_volume(geometry, decoy, 7.0, value=0.6).array
    return volume, lesion


def test_map_peak_lands_on_lesion_in_oblique_anisotropic_volume_after_reorienting_preprocessing(tmp_path):
    geometry = oblique_geometry()  # 1.2 × 1.0 × 3.0 mm, rotated about two axes, origin far from 0
    volume, lesion = lesion_and_decoy(geometry)
    model = load_model(detector_bundle(tmp_path / "detector"), device="cpu")
    explanation = explain(model, [volume], "gradcam,hirescam", "class:lesion")
    grid_of_model = explanation.model_grid
    assert grid_of_model["spacing_mm"] == [2.0, 2.0, 2.0]  # the model really saw a resampled volume
    assert grid_of_model["size"] != list(geometry.size)
    for result in explanation.results:
        assert result.volume.geometry == geometry
        peak = np.unravel_index(np.argmax(result.volume.array), geometry.size)
        peak_ras = geometry.ijk_to_ras_points([peak])[0]
        assert np.linalg.norm(peak_ras - lesion) <= 3.5, (result.name, peak_ras, lesion)


def test_explain_cli_writes_nrrd_that_overlays_the_oblique_input_in_any_viewer(tmp_path):
    geometry = oblique_geometry()
    volume, lesion = lesion_and_decoy(geometry)
    source = write_volume(volume, tmp_path / "oblique.nrrd")
    before = source.read_bytes()
    bundle = detector_bundle(tmp_path / "detector")
    code = main(["explain", "--model", str(bundle), "--input", str(source), "--methods", "gradcam",
                 "--out", str(tmp_path / "out"), "--progress", "none"])
    assert code == 0
    assert source.read_bytes() == before  # the input is never modified
    written = sitk.ReadImage(str(tmp_path / "out" / "gradcam.nrrd"))  # as any ITK-based viewer reads it
    original = sitk.ReadImage(str(source))
    assert written.GetSize() == original.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), original.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), atol=1e-6)
    assert written.GetPixelID() == sitk.sitkFloat32
    peak_ras = read_volume(tmp_path / "out" / "gradcam.nrrd").geometry.ijk_to_ras_points(
        [np.unravel_index(np.argmax(sitk.GetArrayFromImage(written).transpose(2, 1, 0)), geometry.size)])[0]
    assert np.linalg.norm(peak_ras - lesion) <= 3.5


def test_map_defined_in_physical_space_on_model_grid_comes_back_exactly(tmp_path):
    """A linear function of RAS position on the model grid must read the same at every input voxel it covers."""
    geometry = oblique_geometry(size=(30, 26, 12))
    volume, _ = lesion_and_decoy(geometry)
    model = load_model(detector_bundle(tmp_path / "detector"), device="cpu")
    model_input = model.preprocess([volume])
    shape = model_input.spatial_shape
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    ras = (model_input.ijk_to_ras @ np.c_[grid, np.ones(len(grid))].T).T[:, :3]
    field = (0.3 * ras[:, 0] - 0.7 * ras[:, 1] + 0.2 * ras[:, 2]).reshape(shape)
    back, _ = to_input_grid(torch.as_tensor(field, dtype=torch.float32), model_input)
    input_grid = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.size], indexing="ij"), -1).reshape(-1, 3)
    input_ras = geometry.ijk_to_ras_points(input_grid)
    expected = (0.3 * input_ras[:, 0] - 0.7 * input_ras[:, 1] + 0.2 * input_ras[:, 2]).reshape(geometry.size)
    # compare where the model grid covers the input voxel with a full interpolation neighbourhood
    index = (np.linalg.inv(model_input.ijk_to_ras) @ np.c_[input_ras, np.ones(len(input_ras))].T).T[:, :3]
    covered = np.all((index >= 0) & (index <= np.array(shape) - 1), axis=1).reshape(geometry.size)
    assert covered.mean() > 0.8
    np.testing.assert_allclose(back.array[covered], expected[covered], atol=1e-3)
