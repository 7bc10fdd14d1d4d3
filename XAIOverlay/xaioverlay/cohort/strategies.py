"""Strategies across a cohort (SpRAy, Lapuschkin et al., Nature Communications 2019): where the model
looks, grouped over every case.

Each done case's map of one method becomes a fixed-length descriptor of *where* its relevance lies:

- with a ``segments`` column in the manifest (a label atlas registered to each case, or the case's own
  segmentation): the share of the case's absolute relevance in each label, plus the share outside every
  label — one entry per label value present in any case;
- otherwise the coarse normalised grid: the absolute map summed over an 8 × 8 × 8 partition of the
  volume's voxel grid (each cell an eighth of the field of view along each axis; voxels split exactly
  between the cells they straddle) and divided by its total. Cases are comparable when their fields of
  view cover the anatomy alike (the same scanner protocol, or volumes cropped to the body).

Both descriptors sum to 1; they do not change when the map is multiplied by a non-zero number (the
size of a case's relevance and its sign), and the grid descriptor does not change when the map is
sampled on a finer grid by repeating each voxel (resolution). The descriptors are clustered
spectrally: a symmetric k-nearest-neighbour graph (k = round(√N) clipped to [2, 10]) on the Hellinger
distance, the natural one between distributions (the Euclidean distance of the descriptors' square
roots: a small share that one group has and another lacks — a marker, a lesion — weighs as much as a
change of a large share by the same factor), the eigenvectors of its normalised Laplacian, the number
of clusters k chosen by the largest gap among its smallest eigenvalues (at most 8), then k-means on
the row-normalised embedding.

``DIR/strategies.json`` lists the clusters, their members, each cluster's mean map on the reference
case's grid (the first done case; every member's absolute map divided by its total, moved onto that
grid keeping region sums, then averaged: each voxel holds the mean share of a case's relevance),
written as NIfTI with a PNG (maximum projections over the reference case's anatomy, mean-projected), and the mean
share of each member's relevance inside and outside its reference mask (cases with a non-empty mask).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..outputs import write_json
from ..volumes import (Volume, atomic_path, overlap_weights, read_volume, resample_additive, resample_array,
                       write_volume)
from .manifest import Case

log = logging.getLogger(__name__)

STRATEGIES_FILE = "strategies.json"
STRATEGIES_DIR = "strategies"
GRID_CELLS = 8
MAX_CLUSTERS = 8


# ------------------------------------------------------------------------------------ descriptors


def grid_descriptor(relevance: np.ndarray, cells: int = GRID_CELLS) -> np.ndarray:
    """|relevance| (X, Y, Z) summed over a cells³ partition of the index grid, L1-normalised → (cells³,).

    A voxel straddling two cells is split between them by overlap. An all-zero map gives all zeros.
    """
    magnitude = np.abs(np.nan_to_num(np.asarray(relevance, np.float64)))
    weights = [overlap_weights(cells / n, cells / n / 2 - 0.5, n, cells).astype(np.float64)
               for n in magnitude.shape]  # (cells, n) per axis
    blocks = np.einsum("ai,bj,ck,ijk->abc", *weights, magnitude, optimize=True)
    return _l1(blocks.ravel())


def segment_descriptor(relevance: np.ndarray, segments: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Share of |relevance| (X, Y, Z) in each of ``labels`` of ``segments`` (X, Y, Z), then outside them all
    → (len(labels) + 1,), L1-normalised."""
    magnitude = np.abs(np.nan_to_num(np.asarray(relevance, np.float64)))
    inside = [magnitude[segments == label].sum() for label in labels]
    return _l1(np.array([*inside, magnitude.sum() - sum(inside)]))


def _l1(values: np.ndarray) -> np.ndarray:
    total = values.sum()
    return values / total if total > 0 else values


# ------------------------------------------------------------------------------------- clustering


def hellinger_distances(descriptors: np.ndarray) -> np.ndarray:
    """(N, N) Hellinger distances between descriptors (N, D) that are distributions (non-negative, sum 1):
    ‖√p − √q‖ / √2, in [0, 1]."""
    roots = np.sqrt(np.clip(descriptors, 0.0, None))
    return np.linalg.norm(roots[:, None, :] - roots[None, :, :], axis=2) / np.sqrt(2.0)


def knn_affinity(descriptors: np.ndarray, neighbours: int) -> np.ndarray:
    """Symmetric 0/1 affinity (N, N) of descriptors (N, D): i ~ j when either is among the other's
    ``neighbours`` nearest (Hellinger distance; ties broken by the lower index)."""
    distance = hellinger_distances(descriptors)
    np.fill_diagonal(distance, np.inf)
    nearest = np.argsort(distance, axis=1, kind="stable")[:, :neighbours]
    affinity = np.zeros(distance.shape)
    np.put_along_axis(affinity, nearest, 1.0, axis=1)
    return np.maximum(affinity, affinity.T)


def laplacian_spectrum(affinity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (N,) ascending and eigenvectors (N, N) (columns) of I − D^-½ W D^-½."""
    degree = affinity.sum(1)
    scale = 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0))
    laplacian = np.eye(len(affinity)) - scale[:, None] * affinity * scale[None, :]
    values, vectors = np.linalg.eigh(laplacian)
    return np.clip(values, 0.0, None), vectors


def eigengap_clusters(eigenvalues: np.ndarray, max_clusters: int = MAX_CLUSTERS) -> int:
    """k in [1, max_clusters] after which the ascending ``eigenvalues`` (N,) jump most: argmax λ_k − λ_(k−1)."""
    top = min(max_clusters, len(eigenvalues) - 1)
    if top < 1:
        return 1
    gaps = np.diff(eigenvalues[: top + 1])  # gaps[k - 1] = λ_k − λ_(k−1)
    return int(np.argmax(gaps)) + 1


def kmeans(points: np.ndarray, k: int, iterations: int = 100) -> np.ndarray:
    """Labels (N,) of k-means on points (N, D); deterministic farthest-point start from point 0."""
    centres = [points[0]]
    for _ in range(1, k):
        distance = np.min([np.linalg.norm(points - c, axis=1) for c in centres], axis=0)
        centres.append(points[int(np.argmax(distance))])
    centres = np.array(centres)
    labels = np.zeros(len(points), int)
    for _ in range(iterations):
        labels = np.argmin(np.linalg.norm(points[:, None, :] - centres[None], axis=2), axis=1)
        moved = np.array([points[labels == c].mean(0) if (labels == c).any() else centres[c] for c in range(k)])
        if np.allclose(moved, centres):
            break
        centres = moved
    return labels


def spectral_clusters(descriptors: np.ndarray, max_clusters: int = MAX_CLUSTERS,
                      neighbours: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Cluster descriptors (N, D) on their k-nearest-neighbour graph, k chosen by the eigengap.

    Returns:
        (labels (N,) numbered in order of each cluster's first member, eigenvalues (N,) ascending, k).
    """
    count = len(descriptors)
    if count < 3:
        return np.zeros(count, int), np.zeros(count), 1
    neighbours = neighbours or int(np.clip(round(np.sqrt(count)), 2, 10))
    values, vectors = laplacian_spectrum(knn_affinity(descriptors, min(neighbours, count - 1)))
    k = eigengap_clusters(values, max_clusters)
    embedding = vectors[:, :k]
    embedding = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    raw = kmeans(embedding, k)
    order = {label: number for number, label in enumerate(dict.fromkeys(raw.tolist()))}
    return np.array([order[label] for label in raw.tolist()]), values, len(order)


# ------------------------------------------------------------------------------------ the cohort


def _on_grid(volume: Volume, target: Volume, interpolation: str) -> np.ndarray:
    if volume.geometry.same_grid(target.geometry):
        return volume.array
    return resample_array(volume.array, volume.geometry.ijk_to_ras(), target.geometry.size,
                          target.geometry.ijk_to_ras(), interpolation=interpolation)


def map_of(folder: Path, method: str) -> Volume | None:
    """The map of ``method`` (a spec, or a method name) in case folder ``folder``; None if it has none."""
    record = json.loads((folder / "explanation.json").read_text(encoding="utf-8"))
    entries = record.get("methods", [])
    for entry in [e for e in entries if e.get("spec") == method] or [e for e in entries if e.get("method") == method]:
        return read_volume(folder / entry["file"])
    return None


def share_inside_mask(relevance: Volume, mask_path: str | None) -> float | None:
    """Share of |relevance| inside the case's reference mask; None without a (non-empty) mask."""
    if not mask_path:
        return None
    mask = _on_grid(read_volume(mask_path), relevance, "nearest") > 0
    magnitude = np.abs(np.nan_to_num(relevance.array))
    if not mask.any() or magnitude.sum() <= 0:
        return None
    return float(magnitude[mask].sum() / magnitude.sum())


def render_cluster_png(anatomy: Volume, mean_map: Volume, title: str, path: Path) -> Path:
    """Axial and coronal maximum projections of ``mean_map`` over mean projections of ``anatomy`` (same grid),
    as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..montage import SEQUENTIAL_CMAP, display_grid

    affine, size = display_grid(anatomy)
    source = anatomy.geometry.ijk_to_ras()
    background = resample_array(anatomy.array.astype(np.float32), source, size, affine)  # [R, A, S]
    values = resample_array(mean_map.array.astype(np.float32), source, size, affine)
    limit = float(values.max()) or 1.0
    figure = Figure(figsize=(7, 3.8), dpi=90)
    FigureCanvasAgg(figure)
    for column, (axis, name) in enumerate(((2, "axial (max over S)"), (1, "coronal (max over A)"))):
        axes = figure.add_subplot(1, 2, column + 1)
        shade = background.mean(axis).T[::-1, ::-1]
        axes.imshow(shade, cmap="gray", vmin=0, vmax=float(shade.max()) or 1.0, interpolation="nearest")
        plane = values.max(axis).T[::-1, ::-1]
        axes.imshow(np.ma.masked_where(plane < 0.1 * limit, plane), cmap=SEQUENTIAL_CMAP, vmin=0, vmax=limit,
                    alpha=0.8, interpolation="nearest")
        axes.set_title(name, fontsize=9)
        axes.set_xticks([])
        axes.set_yticks([])
    figure.suptitle(title, fontsize=10)
    temporary = atomic_path(path)
    try:
        figure.savefig(str(temporary), format="png")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_strategies(out: str | os.PathLike, cases: Sequence[Case], method: str | None = None,
                     max_clusters: int = MAX_CLUSTERS) -> Path | None:
    """Cluster the done cases of cohort folder ``out`` by where ``method``'s relevance lies; write
    ``out/strategies.json`` (last, atomically) and ``out/strategies/cluster_<id>.nii.gz`` / ``.png``.

    ``method`` defaults to the first method of the first done case. Returns the JSON's path, or None
    when fewer than two done cases have that method's map.
    """
    from .table import complete_records

    out = Path(out)
    by_id = {case.case_id: case for case in cases}
    records = [r for r in complete_records(cases, out / "cases") if r["status"] == "done" and r["rows"]]
    if not records:
        return None
    method = method or records[0]["rows"][0]["method"]
    maps: list[tuple[Case, Volume]] = []
    for record in records:
        relevance = map_of(out / "cases" / record["case_id"], method)
        if relevance is None:
            log.warning("case %s has no %s map; left out of the strategies", record["case_id"], method)
        else:
            maps.append((by_id[record["case_id"]], relevance))
    if not maps:
        ran = ", ".join(row["method"] for row in records[0]["rows"])
        raise InputError(f"--strategies-method {method}: no case has this map (the cohort ran {ran}); "
                         "give one of the methods the cohort ran")
    if len(maps) < 2:
        return None

    with_segments = all(case.segments for case, _ in maps)
    if with_segments:
        segments = [_on_grid(read_volume(case.segments), relevance, "nearest") for case, relevance in maps]
        labels = sorted({int(v) for s in segments for v in np.unique(s) if v > 0})
        descriptors = np.stack([segment_descriptor(r.array, s, labels) for (_, r), s in zip(maps, segments)])
    else:
        descriptors = np.stack([grid_descriptor(relevance.array) for _, relevance in maps])
    assignment, eigenvalues, k = spectral_clusters(descriptors, max_clusters)

    reference_case, reference = maps[0]
    anatomy = read_volume(reference_case.images[0])
    folder = out / STRATEGIES_DIR
    folder.mkdir(exist_ok=True)
    clusters = []
    for cluster in range(k):
        members = [(case, relevance) for (case, relevance), c in zip(maps, assignment) if c == cluster]
        mean = np.zeros(reference.geometry.size, np.float64)
        for _, relevance in members:
            magnitude = np.abs(np.nan_to_num(relevance.array)).astype(np.float32)
            if not relevance.geometry.same_grid(reference.geometry):
                magnitude = resample_additive(magnitude, relevance.geometry.ijk_to_ras(), reference.geometry.size,
                                              reference.geometry.ijk_to_ras())
            mean += _l1(magnitude.astype(np.float64))
        mean_map = Volume((mean / len(members)).astype(np.float32), reference.geometry, f"cluster_{cluster}")
        write_volume(mean_map, folder / f"cluster_{cluster}.nii.gz")
        render_cluster_png(Volume(_on_grid(anatomy, reference, "linear"), reference.geometry), mean_map,
                           f"cluster {cluster}: {len(members)} cases, {method}", folder / f"cluster_{cluster}.png")
        shares = [s for s in (share_inside_mask(r, case.reference_mask) for case, r in members) if s is not None]
        inside = float(np.mean(shares)) if shares else None
        clusters.append({
            "id": cluster, "members": [case.case_id for case, _ in members], "size": len(members),
            "mean_map": f"{STRATEGIES_DIR}/cluster_{cluster}.nii.gz",
            "mean_map_png": f"{STRATEGIES_DIR}/cluster_{cluster}.png",
            "relevance_inside": None if inside is None else round(inside, 6),
            "relevance_outside": None if inside is None else round(1.0 - inside, 6),
            "cases_with_mask": len(shares),
        })
    result = {
        "method": method,
        "descriptor": "segments" if with_segments else f"grid{GRID_CELLS}",
        "chosen_k": k,
        "eigenvalues": [round(float(v), 6) for v in eigenvalues[: max_clusters + 1]],
        "reference_case": reference_case.case_id,
        **({"segment_labels": labels} if with_segments else {}),
        "clusters": clusters,
    }
    path = write_json(result, out / STRATEGIES_FILE)
    for stale in folder.iterdir():  # clusters of an earlier run that found more of them
        match = re.fullmatch(r"cluster_(\d+)\.(nii\.gz|png)", stale.name)
        if match and int(match.group(1)) >= k:
            stale.unlink(missing_ok=True)
    return path
