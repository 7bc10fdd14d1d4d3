"""Synthetic phantoms: determinism, tumour-free twins, physical placement on any grid, ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from xaioverlay.phantoms import DEFAULT_GEOMETRY, HELD_OUT_SEEDS, RandomField, grid_ras, make_phantom
from xaioverlay.volumes import Geometry, resample_array


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _oblique_geometry() -> Geometry:
    """Oblique, anisotropic grid (1.8 × 2.2 × 3.0 mm) covering the head, origin far from any round number."""
    direction = _rotation([1.0, 2.0, 0.5], 23.0) @ np.diag([1.0, -1.0, 1.0])  # LPS columns, one axis flipped
    spacing = np.array([1.8, 2.2, 3.0])
    size = np.array([110, 110, 70])
    centre_lps = np.array([4.3, -7.1, 2.9])
    origin = centre_lps - direction @ (spacing * (size - 1) / 2)
    return Geometry(tuple(int(s) for s in size), tuple(spacing), tuple(origin), tuple(direction.ravel()))


def _centroid_ras(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    return geometry.ijk_to_ras_points(np.argwhere(mask)).mean(axis=0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def pair():
    return make_phantom(3), make_phantom(3, tumour=False)


def test_default_geometry_is_ras_aligned_and_centred():
    g = DEFAULT_GEOMETRY
    assert g.size == (64, 80, 64) and g.spacing == (2.5, 2.5, 2.5)
    np.testing.assert_allclose(g.ijk_to_ras()[:3, :3], np.diag([2.5, 2.5, 2.5]))
    centre = g.ijk_to_ras_points(np.array([(np.array(g.size) - 1) / 2]))[0]
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)
    assert HELD_OUT_SEEDS[0] == 100_000 and len(HELD_OUT_SEEDS) >= 20


def test_same_seed_gives_identical_arrays_and_other_seeds_differ(pair):
    again = make_phantom(3)
    for name in ("image", "flair", "labels", "tumour_mask", "brain_mask"):
        np.testing.assert_array_equal(getattr(pair[0], name).array, getattr(again, name).array)
    assert again.tumour_centre_ras == pair[0].tumour_centre_ras
    other = make_phantom(4)
    assert not np.array_equal(other.image.array, pair[0].image.array)
    assert other.tumour_centre_ras != pair[0].tumour_centre_ras


def test_types_and_ground_truth_consistency(pair):
    p = pair[0]
    assert p.image.array.dtype == np.float32 and p.flair.array.dtype == np.float32
    for volume in (p.labels, p.tumour_mask, p.brain_mask):
        assert volume.array.dtype == np.uint8
        assert volume.geometry == DEFAULT_GEOMETRY
    assert set(np.unique(p.labels.array)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(p.tumour_mask.array, np.isin(p.labels.array, (1, 2)).astype(np.uint8))
    assert p.has_tumour and p.seed == 3
    assert 8.0 <= p.tumour_radius_mm <= 16.0
    # Volume of core ∪ rim close to that of a sphere of the nominal radius.
    volume_mm3 = p.tumour_mask.array.sum() * 2.5**3
    assert 0.6 < volume_mm3 / (4 / 3 * np.pi * p.tumour_radius_mm**3) < 1.5


def test_tumour_free_twin_differs_only_inside_tumour_and_oedema(pair):
    with_tumour, without = pair
    assert not without.has_tumour and without.tumour_centre_ras is None and without.tumour_radius_mm is None
    assert not without.labels.array.any() and not without.tumour_mask.array.any()
    np.testing.assert_array_equal(with_tumour.brain_mask.array, without.brain_mask.array)
    assert with_tumour.decoy_centres_ras == without.decoy_centres_ras
    lesion = with_tumour.labels.array > 0
    for name in ("image", "flair"):
        changed = getattr(with_tumour, name).array != getattr(without, name).array
        assert changed.any()
        assert not (changed & ~lesion).any(), f"{name} differs outside the tumour+oedema labels"
        # The tumour itself is changed almost everywhere, not only at a few voxels.
        assert changed[with_tumour.tumour_mask.array > 0].mean() > 0.9


def test_tumour_has_dark_core_bright_rim_and_mild_oedema(pair):
    p, twin = pair
    image, flair, labels = p.image.array, p.flair.array, p.labels.array
    white_matter = (p.brain_mask.array > 0) & (labels == 0)
    brain_level = np.median(image[white_matter])
    assert image[labels == 2].mean() > 1.5 * brain_level
    assert np.median(image[labels == 1]) < 0.6 * brain_level  # edges of a small core hold rim partial volume
    oedema_change = image[labels == 3].mean() / twin.image.array[labels == 3].mean()
    assert 0.7 < oedema_change < 0.95
    assert flair[labels == 3].mean() > 1.4 * np.median(flair[white_matter])


def test_decoys_are_bright_solid_blobs_present_with_and_without_tumour(pair):
    for p in pair:
        assert 1 <= len(p.decoy_centres_ras) <= 3
        geometry = p.image.geometry
        brain_level = np.median(p.image.array[(p.brain_mask.array > 0) & (p.labels.array == 0)])
        for centre in p.decoy_centres_ras:
            i, j, k = np.round(geometry.ras_to_ijk(np.array(centre))[0]).astype(int)
            assert p.brain_mask.array[i, j, k] == 1
            assert p.labels.array[i, j, k] == 0
            # Solid: the centre is as bright as the enhancing rim (no dark core).
            centre_value = p.image.array[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2].mean()
            assert centre_value > 1.5 * brain_level
    rim_level = pair[0].image.array[pair[0].labels.array == 2].mean()
    i, j, k = np.round(pair[0].image.geometry.ras_to_ijk(np.array(pair[0].decoy_centres_ras[0]))[0]).astype(int)
    assert 0.75 < pair[0].image.array[i, j, k] / rim_level < 1.35


@pytest.mark.parametrize("seed", [0, 11, 29, 100_003])
def test_tumour_and_oedema_lie_inside_the_brain(seed):
    p = make_phantom(seed)
    lesion = p.labels.array > 0
    assert p.tumour_mask.array.sum() > 50
    assert not (lesion & (p.brain_mask.array == 0)).any()
    centre_ijk = np.round(p.image.geometry.ras_to_ijk(np.array(p.tumour_centre_ras))[0]).astype(int)
    assert p.brain_mask.array[tuple(centre_ijk)] == 1


def test_background_outside_the_head_is_exactly_zero(pair):
    image = pair[0].image.array
    assert image[0, 0, 0] == 0.0 and image[-1, -1, -1] == 0.0
    brain = pair[0].brain_mask.array > 0
    assert (image[brain] > 0).all()


def test_tumour_centroid_matches_its_physical_centre_on_an_oblique_anisotropic_grid():
    oblique = _oblique_geometry()
    for seed in (3, 100_001):
        default = make_phantom(seed)
        tilted = make_phantom(seed, geometry=oblique)
        assert tilted.tumour_centre_ras == default.tumour_centre_ras
        for p in (default, tilted):
            error = np.linalg.norm(_centroid_ras(p.tumour_mask.array > 0, p.image.geometry) - p.tumour_centre_ras)
            assert error < min(p.image.geometry.spacing), f"seed {seed}: centroid {error:.2f} mm from the centre"


def test_same_anatomy_at_the_same_physical_place_on_any_grid():
    oblique = _oblique_geometry()
    default, tilted = make_phantom(100_001), make_phantom(100_001, geometry=oblique)
    for name, minimum in (("brain_mask", 0.97), ("tumour_mask", 0.8)):
        moved = resample_array(
            getattr(default, name).array,
            DEFAULT_GEOMETRY.ijk_to_ras(),
            oblique.size,
            oblique.ijk_to_ras(),
            interpolation="nearest",
        )
        assert _dice(moved > 0, getattr(tilted, name).array > 0) > minimum, name
    # Decoys are bright at their physical place on the oblique grid as well.
    for centre in tilted.decoy_centres_ras:
        ijk = np.round(oblique.ras_to_ijk(np.array(centre))[0]).astype(int)
        assert tilted.image.array[tuple(ijk)] > 0.7


def test_random_field_on_grid_equals_field_at_points():
    field = RandomField.draw(np.random.default_rng(0), (5.0, 40.0), 16)
    oblique = _oblique_geometry()
    small = Geometry((7, 5, 6), oblique.spacing, oblique.origin, oblique.direction)
    points = small.ijk_to_ras_points(np.argwhere(np.ones(small.size)))
    np.testing.assert_allclose(field.on_grid(small).ravel(), field.at_points(points), atol=1e-5)
    np.testing.assert_allclose(grid_ras(small).reshape(-1, 3), points, atol=1e-9)


def test_seeds_vary_tumour_and_decoys():
    phantoms = [make_phantom(seed) for seed in range(6)]
    centres = np.array([p.tumour_centre_ras for p in phantoms])
    assert np.ptp(centres, axis=0).min() > 15.0  # spread in all three directions
    radii = [p.tumour_radius_mm for p in phantoms]
    assert all(8.0 <= r <= 16.0 for r in radii) and np.ptp(radii) > 2.0
    assert len({len(p.decoy_centres_ras) for p in phantoms}) >= 2
    brain_sizes = [p.brain_mask.array.sum() for p in phantoms]
    assert np.ptp(brain_sizes) / np.mean(brain_sizes) > 0.03  # head size varies


def test_negative_seed_is_refused():
    with pytest.raises(ValueError):
        make_phantom(-1)
