"""Additive maps (LRP, gradient × input, IG) keep their sums when moved to the input grid; intensities stay
trilinear."""

from __future__ import annotations

import numpy as np
import pytest

from support import SMALL_UNET, blob_volume, oblique_geometry, rotation_x, rotation_z, save_spec_model
from xaioverlay.explain import explain
from xaioverlay.models import load_model
from xaioverlay.volumes import Geometry, resample_additive, resample_array


def centres_ras(geometry: Geometry) -> np.ndarray:
    """RAS mm of every voxel centre: (ni, nj, nk, 3)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.size], indexing="ij"), -1).reshape(-1, 3)
    return geometry.ijk_to_ras_points(index).reshape(*geometry.size, 3)


def centred_geometry(size, spacing, direction: np.ndarray, centre_ras) -> Geometry:
    """A grid whose middle lies at ``centre_ras``."""
    half = direction @ ((np.asarray(size) - 1) / 2 * np.asarray(spacing))
    origin_lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(centre_ras, float) - half
    return Geometry(tuple(size), tuple(spacing), tuple(origin_lps), tuple(direction.ravel()))


def test_region_sums_are_kept_from_a_coarse_grid_to_a_rotated_grid_with_5x_smaller_voxels():
    centre = np.array([10.0, -20.0, 30.0])
    model = centred_geometry((24, 24, 30), (3.0, 2.5, 2.0), np.eye(3), centre)  # 15 mm³ voxels
    fine = centred_geometry((110, 80, 60), (1.0, 1.5, 2.0), rotation_z(0.5) @ rotation_x(0.3), centre)  # 3 mm³
    rng = np.random.default_rng(0)
    points = centres_ras(model)
    near_a = np.linalg.norm(points - (centre + [-12, 0, 0]), axis=-1)
    near_b = np.linalg.norm(points - (centre + [14, 4, 0]), axis=-1)
    values = rng.normal(0.3, 1.0, model.size) * (near_a < 7) - rng.random(model.size) * (near_b < 7)
    values = values.astype(np.float32)

    written = resample_additive(values, model.ijk_to_ras(), fine.size, fine.ijk_to_ras())

    assert written.dtype == np.float32 and written.shape == fine.size
    assert written.sum(dtype=np.float64) == pytest.approx(values.sum(dtype=np.float64), rel=0.01)
    region_fine = np.linalg.norm(centres_ras(fine) - (centre + [-12, 0, 0]), axis=-1) < 13
    region_model = near_a < 13
    assert written[region_fine].sum(dtype=np.float64) == pytest.approx(
        values[region_model].sum(dtype=np.float64), rel=0.01)
    assert written[~region_fine].sum(dtype=np.float64) == pytest.approx(
        values[~region_model].sum(dtype=np.float64), rel=0.01)


def test_a_uniform_density_stays_uniform_on_a_rotated_grid():
    """Sub-voxel sampling leaves no stripes: relevance spread evenly stays even (within 2 %) inside the volume."""
    model = centred_geometry((30, 30, 24), (2.0, 2.0, 2.0), rotation_z(0.3) @ rotation_x(0.2), np.zeros(3))
    fine = centred_geometry((30, 30, 20), (1.5, 1.5, 1.5), np.eye(3), np.zeros(3))
    written = resample_additive(np.ones(model.size, np.float32), model.ijk_to_ras(), fine.size, fine.ijk_to_ras())
    np.testing.assert_allclose(written[3:-3, 3:-3, 3:-3], (1.5 / 2.0) ** 3, rtol=0.02)


def test_a_twice_coarser_aligned_voxel_is_split_into_eight_equal_shares():
    coarse = Geometry((4, 3, 2), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0))
    fine = Geometry((8, 6, 4), (1.5, 1.5, 1.5), (-0.75, -0.75, -0.75))
    values = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    written = resample_additive(values, coarse.ijk_to_ras(), fine.size, fine.ijk_to_ras())
    expected = np.repeat(np.repeat(np.repeat(values, 2, 0), 2, 1), 2, 2) / 8
    np.testing.assert_allclose(written, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rotated", [False, True])
def test_a_non_finite_voxel_marks_only_the_voxels_it_overlaps(rotated):
    """One NaN on the model grid must not spread along whole rows (the axis-by-axis weights multiply by 0)."""
    direction = rotation_z(0.4) if rotated else np.eye(3)
    model = centred_geometry((12, 10, 8), (3.0, 3.0, 3.0), direction, np.zeros(3))
    fine = centred_geometry((40, 36, 30), (1.0, 1.0, 1.0), np.eye(3), np.zeros(3))
    values = np.ones(model.size, np.float32)
    values[6, 5, 4] = np.nan
    written = resample_additive(values, model.ijk_to_ras(), fine.size, fine.ijk_to_ras())
    assert 0 < np.isnan(written).sum() <= 6**3  # a 3 mm voxel overlaps at most 4³ 1 mm voxels (+ the splat's blur)


@pytest.fixture
def respaced_unet(tmp_path):
    """A UNet whose preprocessing respaces to voxels 5× larger (in volume) than the input's."""
    preprocessing = [{"name": "Orientationd", "args": {"keys": "image", "axcodes": "RAS"}},
                     {"name": "Spacingd", "args": {"keys": "image", "pixdim": [2.0, 2.0, 3.0]}},
                     {"name": "DivisiblePadd", "args": {"keys": "image", "k": 4}}]
    return load_model(save_spec_model(tmp_path / "respaced", SMALL_UNET, task="segmentation",
                                      class_names=["background", "tumour"], preprocessing=preprocessing), "cpu")


def test_written_relevance_sums_to_what_each_method_reports_on_an_oblique_anisotropic_input(respaced_unet):
    geometry = oblique_geometry(size=(56, 48, 28), spacing=(1.0, 1.2, 2.0))  # 2.4 mm³: 5× smaller than the model's
    centre = geometry.ijk_to_ras_points(np.array([[28, 24, 14]]))[0]
    volume = blob_volume(geometry, centre, 12.0, value=1.0)
    target = f"channel:1@point:{centre[0]},{centre[1]},{centre[2]},8"
    result = explain(respaced_unet, [volume], ["gxi", "ig:8", "lrp", "gradcam"], target)
    by_name = {r.name: r for r in result.results}
    assert result.model_input.spatial_shape != geometry.size
    for name in ("gxi", "ig", "lrp"):
        written = float(by_name[name].volume.array.sum(dtype=np.float64))
        model_grid = float(by_name[name].model_grid_map.double().sum())
        assert written == pytest.approx(model_grid, rel=0.01), name
        record = by_name[name].extras["input_grid"]
        assert record["sum_written"] == pytest.approx(written) and record["sum_model_grid"] == pytest.approx(model_grid)
    completeness = by_name["ig"].extras["completeness"]["sum_attributions"]
    assert float(by_name["ig"].volume.array.sum(dtype=np.float64)) == pytest.approx(completeness, rel=0.01)
    conservation = by_name["lrp"].extras["conservation"]["input_relevance"]
    assert float(by_name["lrp"].volume.array.sum(dtype=np.float64)) == pytest.approx(conservation, rel=0.01)

    cam = by_name["gradcam"]
    trilinear = resample_array(cam.model_grid_map.numpy(), result.model_input.ijk_to_ras, geometry.size,
                               geometry.ijk_to_ras(), interpolation="linear")
    np.testing.assert_array_equal(cam.volume.array, trilinear)
    assert cam.extras["input_grid"] == {"resampling": "trilinear"}
