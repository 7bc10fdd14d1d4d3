"""Synthetic head-MRI-like phantoms with ground truth, for demos and tests.

Every structure is an analytic function of physical RAS coordinates (mm): ellipsoids and smooth
random fields (sums of plane waves) evaluated at each voxel's centre. The same seed rendered on any
grid -- oblique, anisotropic, shifted -- therefore shows the same anatomy at the same physical place;
only the noise (drawn per voxel) depends on the grid.

A phantom holds a scalp, a bright skull shell, cerebrospinal fluid, a brain (grey matter rim and
white matter, with texture), two lateral ventricles, a multiplicative bias field and Rician noise.
With ``tumour=True`` it also holds a tumour: a dark necrotic core, a bright enhancing rim and mild
surrounding oedema (bright on the FLAIR-like contrast). One to three bright solid "decoy" blobs, as
bright as the enhancing rim but with no core, are present with or without the tumour, so that
"anything bright" does not solve the classification task.

``make_phantom(seed, tumour=False)`` renders the *same* phantom with only the tumour and its oedema
removed: all random draws (tumour parameters included) happen whatever ``tumour`` is, and every
tumour-related paint has its support inside the labelled tumour/oedema region.

Background (outside the head) is exactly 0, as in skull-stripped or masked data, so intensity
normalisation over non-zero voxels (MONAI ``NormalizeIntensity(nonzero=True)``) uses the head only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .volumes import Geometry, Volume

__all__ = [
    "DEFAULT_GEOMETRY",
    "HELD_OUT_SEEDS",
    "LABEL_NAMES",
    "Phantom",
    "RandomField",
    "make_phantom",
    "grid_ras",
    "with_shortcut_tag",
]


def _ras_aligned_geometry(size: tuple[int, int, int], spacing: float, centre_ras=(0.0, 0.0, 0.0)) -> Geometry:
    """Axis-aligned grid whose i, j, k axes point to R, A, S and whose centre lies at ``centre_ras``."""
    half = (np.asarray(size, float) - 1.0) / 2.0 * spacing
    origin_ras = np.asarray(centre_ras, float) - half
    origin_lps = (-origin_ras[0], -origin_ras[1], origin_ras[2])
    return Geometry(
        size=tuple(int(s) for s in size),
        spacing=(float(spacing),) * 3,
        origin=tuple(float(o) for o in origin_lps),
        direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    )


#: 64 × 80 × 64 voxels of 2.5 mm, i → R, j → A, k → S (so MONAI's ``Orientation("RAS")`` is a no-op),
#: grid centre at RAS (0, 0, 0), where the head is centred. Field of view 160 × 200 × 160 mm.
DEFAULT_GEOMETRY: Geometry = _ras_aligned_geometry((64, 80, 64), 2.5)

#: Seeds reserved for evaluation; training code must never draw from them.
HELD_OUT_SEEDS: range = range(100_000, 100_100)

#: Values of :attr:`Phantom.labels`.
LABEL_NAMES: dict[int, str] = {0: "none", 1: "necrotic core", 2: "enhancing rim", 3: "oedema"}

# Edge width (mm) of painted structures. Paints fade in *inside* their boundary (see _inside), so the
# image changes only where the label says the structure is.
_EDGE_MM = 1.2
_NOISE_SIGMA = 0.025

# Tissue intensities (T1c-like, FLAIR-like), before texture, bias and noise.
_T1C = {"scalp": 0.55, "skull": 0.85, "csf": 0.12, "grey": 0.42, "white": 0.55, "core": 0.16, "rim": 1.0}
_FLAIR = {"scalp": 0.50, "skull": 0.15, "csf": 0.05, "grey": 0.52, "white": 0.42, "core": 0.38, "rim": 0.70,
          "oedema": 0.85, "decoy": 0.48}


# --------------------------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class RandomField:
    """A smooth, zero-mean, unit-variance random field: a sum of K plane waves in physical space.

    ``f(x) = sqrt(2 / K) * sum_k cos(w_k · x + phi_k)``, ``x`` in RAS mm. Evaluating it at points or
    on any grid gives the same values at the same physical places.

    Attributes:
        wavevectors: (K, 3) angular wave vectors, rad/mm.
        phases: (K,) phases, rad.
    """

    wavevectors: np.ndarray
    phases: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, wavelengths_mm: tuple[float, float], n_waves: int = 48) -> "RandomField":
        """Wave directions uniform on the sphere, wavelengths log-uniform in ``wavelengths_mm``."""
        directions = rng.standard_normal((n_waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        low, high = np.log(wavelengths_mm[0]), np.log(wavelengths_mm[1])
        wavelengths = np.exp(rng.uniform(low, high, n_waves))
        phases = rng.uniform(0.0, 2.0 * np.pi, n_waves)
        return cls(directions * (2.0 * np.pi / wavelengths)[:, None], phases)

    @property
    def _amplitude(self) -> float:
        return float(np.sqrt(2.0 / len(self.phases)))

    def at_points(self, points_ras: np.ndarray) -> np.ndarray:
        """Field values at RAS points. ``points_ras``: (..., 3) → (...)."""
        points = np.asarray(points_ras, float)
        return self._amplitude * np.cos(points @ self.wavevectors.T + self.phases).sum(axis=-1)

    def on_grid(self, geometry: Geometry) -> np.ndarray:
        """Field values at every voxel centre of ``geometry``: (ni, nj, nk) float32.

        The phase of each wave is linear in (i, j, k), so each wave factorises into three 1-D complex
        exponentials; their products summed over waves is one small matrix product.
        """
        affine = geometry.ijk_to_ras()
        ni, nj, nk = geometry.size
        steps = self.wavevectors @ affine[:3, :3]  # (K, 3): phase increment per voxel along i, j, k
        offsets = self.wavevectors @ affine[:3, 3] + self.phases  # (K,)
        e_i = np.exp(1j * (offsets[:, None] + steps[:, 0:1] * np.arange(ni)))  # (K, ni)
        e_j = np.exp(1j * steps[:, 1:2] * np.arange(nj))  # (K, nj)
        e_k = np.exp(1j * steps[:, 2:3] * np.arange(nk))  # (K, nk)
        plane = (e_i[:, :, None] * e_j[:, None, :]).reshape(len(self.phases), ni * nj)  # (K, ni*nj)
        values = (plane.T @ e_k).real.reshape(ni, nj, nk)
        return (self._amplitude * values).astype(np.float32)


def grid_ras(geometry: Geometry) -> np.ndarray:
    """RAS mm of every voxel centre: (ni, nj, nk, 3) float64."""
    affine = geometry.ijk_to_ras()
    axes = [np.arange(n, dtype=float) for n in geometry.size]
    i, j, k = np.meshgrid(*axes, indexing="ij")
    return np.stack([i, j, k], axis=-1) @ affine[:3, :3].T + affine[:3, 3]


# ------------------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in RAS mm, optionally with a lobulated (randomly perturbed) surface.

    Attributes:
        centre: (3,) RAS mm.
        semi_axes: (3,) mm, along the columns of ``rotation``.
        rotation: (3, 3) orthonormal matrix whose columns are the ellipsoid's axes in RAS.
        lobes: optional random field modulating the radius: r(x) = r0 * (1 + lobe_amplitude * f(x)).
        lobe_amplitude: relative radius change per unit of the field.
    """

    centre: np.ndarray
    semi_axes: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    lobes: RandomField | None = None
    lobe_amplitude: float = 0.0

    def scaled(self, factor: float = 1.0, shrink_mm: float = 0.0) -> "Ellipsoid":
        """Same centre and axes with semi-axes ``factor * a - shrink_mm`` (nested layers)."""
        return Ellipsoid(self.centre, self.semi_axes * factor - shrink_mm, self.rotation, self.lobes, self.lobe_amplitude)

    def signed_distance(self, points_ras: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm, negative inside) to the surface at RAS points. (..., 3) → (...)."""
        points = np.asarray(points_ras, float)
        u = (points - self.centre) @ self.rotation / self.semi_axes
        lobes = self.lobes.at_points(points) if self.lobes is not None and self.lobe_amplitude else None
        return self._distance(u[..., 0], u[..., 1], u[..., 2], lobes)

    def distance_on_grid(self, geometry: Geometry, lobe_values: np.ndarray | None = None) -> np.ndarray:
        """:meth:`signed_distance` at every voxel centre of ``geometry``: (ni, nj, nk) float32.

        The normalised coordinates are linear in (i, j, k), so they are built from 1-D ramps.
        ``lobe_values``: this ellipsoid's lobe field on ``geometry`` when the caller has it already.
        """
        affine = geometry.ijk_to_ras()
        # u = (R^T (A ijk + b - c)) / a  =  per_index @ ijk + offset
        per_index = (self.rotation.T @ affine[:3, :3]) / self.semi_axes[:, None]  # (3, 3)
        offset = (self.rotation.T @ (affine[:3, 3] - self.centre)) / self.semi_axes  # (3,)
        ramps = [np.arange(n, dtype=np.float32) for n in geometry.size]
        u = []
        for m in range(3):
            u.append(
                (per_index[m, 0] * ramps[0] + np.float32(offset[m]))[:, None, None]
                + (per_index[m, 1] * ramps[1])[None, :, None]
                + (per_index[m, 2] * ramps[2])[None, None, :]
            )
        if lobe_values is None and self.lobes is not None and self.lobe_amplitude:
            lobe_values = self.lobes.on_grid(geometry)
        return self._distance(*(c.astype(np.float32) for c in u), lobe_values).astype(np.float32)

    def _distance(self, u0, u1, u2, lobe_values):
        """First-order distance ``(q - 1) / |grad q|``, ``q`` the normalised radius (exact on a sphere)."""
        q = np.sqrt(u0 * u0 + u1 * u1 + u2 * u2)
        a = self.semi_axes
        gradient = np.sqrt((u0 / a[0]) ** 2 + (u1 / a[1]) ** 2 + (u2 / a[2]) ** 2)
        scale = np.where(q > 1e-6, q / np.maximum(gradient, 1e-12), a.min())  # mm per unit of q
        if lobe_values is not None:
            q = q / np.maximum(1.0 + self.lobe_amplitude * lobe_values, 0.3)
        return (q - 1.0) * scale


def _inside(distance: np.ndarray, edge_mm: float = _EDGE_MM) -> np.ndarray:
    """Soft indicator: 0 where ``distance >= 0``, 1 where ``distance <= -edge_mm``, smooth between.

    Its support is exactly the labelled inside (``distance < 0``). (...) → (...) float32.
    """
    t = np.clip(-distance / edge_mm, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Rotation by a uniform angle in [0, max_degrees] about a random axis: (3, 3)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0.0, max_degrees))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


# ------------------------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Anatomy:
    """Everything random about one seed, independent of the grid and of the ``tumour`` flag."""

    head: Ellipsoid  # outer scalp surface
    shape_field: RandomField
    ventricles: tuple[Ellipsoid, ...]
    grey_field: RandomField  # wobbles the grey/white boundary
    texture: RandomField
    bias_t1c: RandomField
    bias_flair: RandomField
    tumour_rim: Ellipsoid  # outer tumour surface
    tumour_core: Ellipsoid
    oedema: Ellipsoid
    tumour_radius_mm: float
    rim_brightness: float
    decoys: tuple[Ellipsoid, ...]
    decoy_brightness: tuple[float, ...]
    contrast: float  # global tissue-contrast jitter


_SCALP_MM, _SKULL_MM, _CSF_MM, _GREY_MM = 4.0, 5.0, 3.0, 4.0
_BRAIN_SHRINK_MM = _SCALP_MM + _SKULL_MM + _CSF_MM


def _head_distance(anatomy: _Anatomy, geometry: Geometry, shape_values: np.ndarray, shrink_mm: float) -> np.ndarray:
    """Signed distance (mm) to the head surface moved inwards by ``shrink_mm``: (ni, nj, nk) float32."""
    return anatomy.head.scaled(shrink_mm=shrink_mm).distance_on_grid(geometry, shape_values)


def _draw_anatomy(seed: int) -> _Anatomy:
    """All random draws for ``seed``, each from its own stream so that adding one never shifts another."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(6)]
    head_rng, field_rng, tumour_rng, decoy_rng, contrast_rng, _ = streams

    semi_axes = np.array([66.0, 84.0, 64.0]) * head_rng.uniform(0.94, 1.05) * head_rng.uniform(0.96, 1.04, 3)
    head = Ellipsoid(
        centre=head_rng.uniform(-2.0, 2.0, 3),
        semi_axes=semi_axes,
        rotation=_random_rotation(head_rng, 4.0),
        lobes=RandomField.draw(head_rng, (90.0, 220.0), 16),
        lobe_amplitude=0.025,
    )
    brain = head.scaled(shrink_mm=_BRAIN_SHRINK_MM)
    ventricles = []
    for side in (-1.0, 1.0):
        offset = np.array([side * 0.13, 0.04, 0.12]) * brain.semi_axes
        ventricles.append(
            Ellipsoid(
                centre=brain.centre + head.rotation @ offset,
                semi_axes=np.array([0.09, 0.30, 0.15]) * brain.semi_axes * head_rng.uniform(0.85, 1.15),
                rotation=head.rotation @ _random_rotation(head_rng, 6.0),
            )
        )

    fields = dict(
        grey_field=RandomField.draw(field_rng, (12.0, 40.0), 24),
        texture=RandomField.draw(field_rng, (6.0, 30.0), 64),
        bias_t1c=RandomField.draw(field_rng, (150.0, 400.0), 8),
        bias_flair=RandomField.draw(field_rng, (150.0, 400.0), 8),
        shape_field=head.lobes,
    )

    # Tumour: drawn whatever the flag, so the tumour-free twin has the same decoys.
    radius = float(tumour_rng.uniform(8.0, 16.0))
    stretch = tumour_rng.uniform(0.88, 1.12, 3)
    stretch /= np.cbrt(stretch.prod())
    rotation = _random_rotation(tumour_rng, 180.0)
    lobes_rim = RandomField.draw(tumour_rng, (10.0, 30.0), 24)
    lobes_core = RandomField.draw(tumour_rng, (8.0, 25.0), 24)
    lobes_oedema = RandomField.draw(tumour_rng, (15.0, 45.0), 24)
    core_fraction = float(tumour_rng.uniform(0.45, 0.65))
    oedema_extra = float(tumour_rng.uniform(4.0, 12.0))
    rim_brightness = float(tumour_rng.uniform(0.92, 1.08))
    # Centre deep enough that the whole tumour lies in the brain, and not inside a ventricle (the
    # tumour may abut one). Shrink the tumour in the rare case it finds no place.
    centre = None
    while centre is None:
        reach = radius * stretch.max() * 1.25  # beyond the lobulated outer surface
        centre = _place(
            tumour_rng,
            brain,
            head.rotation,
            lambda c: brain.signed_distance(c) < -(reach + 2.0)
            and min(v.signed_distance(c) for v in ventricles) > 0.8 * radius,
        )
        if centre is None:
            radius *= 0.9
    tumour_rim = Ellipsoid(centre, radius * stretch, rotation, lobes_rim, 0.06)
    tumour_core = Ellipsoid(centre, core_fraction * radius * stretch, rotation, lobes_core, 0.08)
    oedema = Ellipsoid(centre, radius * stretch + oedema_extra, rotation, lobes_oedema, 0.15)

    # Decoys: solid bright blobs inside the brain, away from the tumour's oedema and from each other.
    decoys: list[Ellipsoid] = []
    brightness: list[float] = []
    tumour_keep_out = radius * stretch.max() + oedema_extra * 1.15 + 4.0
    for _ in range(int(decoy_rng.integers(1, 4))):
        r = float(decoy_rng.uniform(5.0, 12.0))
        d_stretch = decoy_rng.uniform(0.85, 1.15, 3)
        d_rotation = _random_rotation(decoy_rng, 180.0)
        level = float(decoy_rng.uniform(0.92, 1.08))
        while True:
            extent = r * d_stretch.max()
            found = _place(
                decoy_rng,
                brain,
                head.rotation,
                lambda c: brain.signed_distance(c) < -(extent + 2.0)
                and np.linalg.norm(c - centre) > tumour_keep_out + extent
                and all(np.linalg.norm(c - d.centre) > extent + d.semi_axes.max() + 3.0 for d in decoys),
            )
            if found is not None:
                break
            r *= 0.9
        decoys.append(Ellipsoid(found, r * d_stretch, d_rotation))
        brightness.append(level)

    return _Anatomy(
        head=head,
        ventricles=tuple(ventricles),
        tumour_rim=tumour_rim,
        tumour_core=tumour_core,
        oedema=oedema,
        tumour_radius_mm=radius,
        rim_brightness=rim_brightness,
        decoys=tuple(decoys),
        decoy_brightness=tuple(brightness),
        contrast=float(contrast_rng.uniform(0.9, 1.1)),
        **fields,
    )


def _place(rng: np.random.Generator, brain: Ellipsoid, rotation: np.ndarray, accept, tries: int = 2000):
    """A random RAS point in the brain's bounding box that ``accept`` takes; None after ``tries`` draws."""
    for _ in range(tries):
        candidate = brain.centre + rotation @ (rng.uniform(-1.0, 1.0, 3) * brain.semi_axes)
        if accept(candidate):
            return candidate
    return None


def _local_box(geometry: Geometry, ellipsoid: Ellipsoid, margin_mm: float) -> tuple[slice, slice, slice] | None:
    """Index box of ``geometry`` that holds ``ellipsoid`` grown by ``margin_mm``; None if outside the grid."""
    reach = ellipsoid.semi_axes.max() * (1.0 + 4.0 * ellipsoid.lobe_amplitude) + margin_mm
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float) * reach
    ijk = geometry.ras_to_ijk(ellipsoid.centre + corners)
    low = np.maximum(np.floor(ijk.min(axis=0)).astype(int) - 1, 0)
    high = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 2, geometry.size)
    if np.any(high <= low):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _sub_geometry(geometry: Geometry, box: tuple[slice, slice, slice]) -> Geometry:
    """The part of ``geometry`` covered by the index ``box`` (same spacing and direction)."""
    start = np.array([b.start for b in box], float)
    origin = (geometry.ijk_to_lps() @ np.r_[start, 1.0])[:3]
    return Geometry(
        size=tuple(b.stop - b.start for b in box),
        spacing=geometry.spacing,
        origin=tuple(float(o) for o in origin),
        direction=geometry.direction,
    )


def _paint(target: np.ndarray, weight: np.ndarray, value, box=None) -> None:
    """``target = target * (1 - weight) + value * weight`` in place (within ``box`` if given)."""
    region = target if box is None else target[box]
    region += weight * (value - region)


@dataclass
class Phantom:
    """One rendered phantom with its ground truth (all volumes share one geometry)."""

    image: Volume  #: T1c-like float32 intensity, the demo models' single input channel.
    flair: Volume  #: FLAIR-like float32 second contrast; oedema bright.
    labels: Volume  #: uint8: 0 none, 1 necrotic core, 2 enhancing rim, 3 oedema.
    tumour_mask: Volume  #: uint8 0/1: core ∪ enhancing rim (what the segmenter learns).
    brain_mask: Volume  #: uint8 0/1 (ventricles included).
    has_tumour: bool
    tumour_centre_ras: tuple[float, float, float] | None
    tumour_radius_mm: float | None
    decoy_centres_ras: list[tuple[float, float, float]]
    seed: int


def make_phantom(seed: int, *, tumour: bool = True, geometry: Geometry | None = None) -> Phantom:
    """Render phantom ``seed`` on ``geometry`` (default :data:`DEFAULT_GEOMETRY`).

    Deterministic: the same arguments give identical arrays. ``tumour=False`` gives the same phantom
    (head, decoys, texture, bias, noise) with only the tumour and its oedema removed; the two images
    differ only where ``labels > 0`` in the tumour rendering.
    """
    geometry = DEFAULT_GEOMETRY if geometry is None else geometry
    anatomy = _draw_anatomy(seed)
    shape = anatomy.shape_field.on_grid(geometry)
    texture = anatomy.texture.on_grid(geometry)
    contrast = anatomy.contrast

    d_head = _head_distance(anatomy, geometry, shape, 0.0)
    d_skull_outer = _head_distance(anatomy, geometry, shape, _SCALP_MM)
    d_csf_outer = _head_distance(anatomy, geometry, shape, _SCALP_MM + _SKULL_MM)
    d_brain = _head_distance(anatomy, geometry, shape, _BRAIN_SHRINK_MM)
    d_white = _head_distance(anatomy, geometry, shape, _BRAIN_SHRINK_MM + _GREY_MM) + 1.5 * anatomy.grey_field.on_grid(
        geometry
    )
    d_ventricle = np.minimum.reduce([v.distance_on_grid(geometry) for v in anatomy.ventricles])

    t1c = np.zeros(geometry.size, np.float32)
    flair = np.zeros(geometry.size, np.float32)
    tissue_texture = 1.0 + 0.06 * texture
    layers = [
        (d_head, "scalp"),
        (d_skull_outer, "skull"),
        (d_csf_outer, "csf"),
        (d_brain, "grey"),
        (d_white, "white"),
        (d_ventricle, "csf"),
    ]
    for distance, tissue in layers:
        weight = _inside(distance)
        _paint(t1c, weight, _T1C[tissue] * contrast * tissue_texture)
        _paint(flair, weight, _FLAIR[tissue] * contrast * tissue_texture)

    brain_mask = (d_brain < 0).astype(np.uint8)
    labels = np.zeros(geometry.size, np.uint8)
    if tumour:
        _paint_tumour(anatomy, geometry, d_brain, d_ventricle, t1c, flair, labels, tissue_texture)

    for decoy, level in zip(anatomy.decoys, anatomy.decoy_brightness):
        box = _local_box(geometry, decoy, 2.0)
        if box is None:
            continue
        weight = _inside(decoy.distance_on_grid(_sub_geometry(geometry, box)))
        _paint(t1c, weight, _T1C["rim"] * level * contrast * tissue_texture[box], box)
        _paint(flair, weight, _FLAIR["decoy"] * contrast * tissue_texture[box], box)

    head_mask = d_head < 0
    noise_rng = np.random.default_rng(np.random.SeedSequence(int(seed)).spawn(6)[5])
    images = []
    for array, bias_field in ((t1c, anatomy.bias_t1c), (flair, anatomy.bias_flair)):
        array *= np.exp(0.12 * bias_field.on_grid(geometry))
        images.append(_rician(array, head_mask, _NOISE_SIGMA, noise_rng))

    tumour_mask = ((labels == 1) | (labels == 2)).astype(np.uint8)
    name = f"phantom_{seed}" + ("" if tumour else "_no_tumour")
    return Phantom(
        image=Volume(images[0], geometry, f"{name}_t1c"),
        flair=Volume(images[1], geometry, f"{name}_flair"),
        labels=Volume(labels, geometry, f"{name}_labels"),
        tumour_mask=Volume(tumour_mask, geometry, f"{name}_tumour_mask"),
        brain_mask=Volume(brain_mask, geometry, f"{name}_brain_mask"),
        has_tumour=bool(tumour),
        tumour_centre_ras=tuple(float(c) for c in anatomy.tumour_rim.centre) if tumour else None,
        tumour_radius_mm=anatomy.tumour_radius_mm if tumour else None,
        decoy_centres_ras=[tuple(float(c) for c in d.centre) for d in anatomy.decoys],
        seed=int(seed),
    )


#: Where :func:`with_shortcut_tag` puts its tag: right, anterior, superior corner of the default field
#: of view (RAS mm), outside every phantom's head.
SHORTCUT_TAG_RAS = (62.0, 82.0, 62.0)


def with_shortcut_tag(image: Volume, seed: int, *, side_mm: float = 10.0, jitter_mm: float = 4.0) -> Volume:
    """``image`` with a bright cube (a scanner's marker, a positioning aid) painted outside the head.

    The cube (``side_mm`` wide, as bright as the enhancing rim) is centred near :data:`SHORTCUT_TAG_RAS`,
    moved by up to ``jitter_mm`` per axis (drawn from ``seed``); only background voxels (exactly 0) are
    painted, so the head is unchanged. A shortcut for a classifier to learn when the tag comes with the
    tumour in its training set.
    """
    rng = np.random.default_rng([int(seed), 7])
    centre = np.asarray(SHORTCUT_TAG_RAS) + rng.uniform(-jitter_mm, jitter_mm, 3)
    inside = (np.abs(grid_ras(image.geometry) - centre) <= side_mm / 2).all(-1) & (image.array == 0)
    array = image.array.copy()
    array[inside] = _T1C["rim"] * (1.0 + _NOISE_SIGMA * rng.standard_normal(int(inside.sum())))
    return Volume(array.astype(image.array.dtype), image.geometry, f"{image.name}_tagged")


def _paint_tumour(anatomy, geometry, d_brain, d_ventricle, t1c, flair, labels, tissue_texture) -> None:
    """Paint oedema, enhancing rim and necrotic core in place, and write their labels.

    Oedema is confined to brain outside the ventricles; every paint's support lies inside its label.
    """
    box = _local_box(geometry, anatomy.oedema, 2.0)
    if box is None:
        return
    local = _sub_geometry(geometry, box)
    d_oedema = anatomy.oedema.distance_on_grid(local)
    d_rim = anatomy.tumour_rim.distance_on_grid(local)
    d_core = anatomy.tumour_core.distance_on_grid(local)
    # Ventricle weight that is 1 on the ventricle label and fades out *outside* it.
    outside_ventricle = 1.0 - _inside(d_ventricle[box] - _EDGE_MM)
    oedema_weight = _inside(d_oedema, 3.0) * _inside(d_brain[box]) * outside_ventricle
    t1c[box] *= 1.0 - 0.18 * oedema_weight
    _paint(flair, oedema_weight, _FLAIR["oedema"] * anatomy.contrast * tissue_texture[box], box)

    contrast = anatomy.contrast
    rim_weight = _inside(d_rim)
    _paint(t1c, rim_weight, _T1C["rim"] * anatomy.rim_brightness * contrast * tissue_texture[box], box)
    _paint(flair, rim_weight, _FLAIR["rim"] * contrast * tissue_texture[box], box)
    core_weight = _inside(np.maximum(d_core, d_rim))
    _paint(t1c, core_weight, _T1C["core"] * contrast * tissue_texture[box], box)
    _paint(flair, core_weight, _FLAIR["core"] * contrast * tissue_texture[box], box)

    local_labels = labels[box]
    in_brain = d_brain[box] < 0
    local_labels[(d_oedema < 0) & in_brain & (d_ventricle[box] >= 0)] = 3
    local_labels[d_rim < 0] = 2
    local_labels[(d_core < 0) & (d_rim < 0)] = 1


def _rician(signal: np.ndarray, mask: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of complex Gaussian noise added to ``signal`` inside ``mask``; exactly 0 outside.

    Draws 2 × signal.size normals from ``rng`` whatever the signal, so twins share their noise.
    """
    real = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    imaginary = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    magnitude = np.sqrt((signal + real) ** 2 + imaginary**2)
    return np.where(mask, magnitude, 0.0).astype(np.float32)
