"""Strategies across a cohort (SpRAy): descriptors, spectral clustering with the eigengap, and
``strategies.json`` with its mean maps, on synthetic maps with known answers and on a real cohort run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from xaioverlay.cohort.case import DONE, write_case_folder
from xaioverlay.cohort.manifest import Case, read_manifest
from xaioverlay.cohort.strategies import (
    STRATEGIES_FILE, eigengap_clusters, grid_descriptor, knn_affinity, segment_descriptor, spectral_clusters,
    write_strategies)
from xaioverlay.errors import InputError
from xaioverlay.outputs import write_json
from xaioverlay.volumes import Geometry, Volume, read_volume, write_volume

GRID = Geometry((16, 16, 16), (4.0, 4.0, 4.0), (30.0, 30.0, -30.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
#: Where each synthetic group's relevance sits (voxel box corners), far apart in the field of view.
PLACES = [(2, 2, 2), (11, 11, 11), (2, 11, 6)]


def blob_map(rng: np.random.Generator, place, sign: float = 1.0) -> np.ndarray:
    """(16, 16, 16) weak signed noise everywhere plus relevance ±1 in a 3³ box at ``place``."""
    values = rng.normal(0.0, 0.01, GRID.size)
    i, j, k = place
    values[i:i + 3, j:j + 3, k:k + 3] += sign
    return values


def groups_of_maps(sizes, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors (N, 512) of groups of maps (each group's relevance in its own place), and the group (N,)."""
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(group)
    maps = [blob_map(rng, PLACES[g], sign=rng.choice([-1.0, 1.0])) * rng.uniform(0.1, 100) for g in group]
    return np.stack([grid_descriptor(m) for m in maps]), group


def same_partition(labels: np.ndarray, truth: np.ndarray) -> bool:
    return all(len(set(labels[truth == g])) == 1 for g in set(truth)) and len(set(labels)) == len(set(truth))


def test_two_groups_of_maps_separated_exactly_and_eigengap_picks_two():
    descriptors, group = groups_of_maps([12, 9])
    labels, eigenvalues, k = spectral_clusters(descriptors)
    assert k == 2
    assert same_partition(labels, group)
    assert labels[0] == 0, "clusters numbered in order of their first member"
    assert eigenvalues[1] < 1e-9 < eigenvalues[2], "two components of the neighbour graph: two zero eigenvalues"


def test_three_groups_of_maps_separated_exactly_and_eigengap_picks_three():
    descriptors, group = groups_of_maps([10, 8, 12], seed=1)
    labels, _, k = spectral_clusters(descriptors)
    assert k == 3
    assert same_partition(labels, group)


def test_a_small_share_one_group_has_and_the_other_lacks_separates_them():
    """Segment descriptors (head, brain, lesion, outside) of two groups alike in their large shares, which vary
    from case to case by up to 0.3, one group also with 10-15 % of its relevance outside the head (a marker):
    on the Hellinger distance no case's nearest neighbours cross between the groups, so no cluster mixes
    them; the Euclidean distance weighs the marker's 0.1 against the large shares' 0.3 spread and mixed them."""
    rng = np.random.default_rng(4)
    group = np.repeat([0, 1], [14, 13])
    rows = []
    for g in group:
        head, lesion = rng.uniform(0.1, 0.4), rng.uniform(0.2, 0.5)
        outside = rng.uniform(0.1, 0.15) if g else 0.0
        rows.append(np.array([head, 1.0 - head - lesion, lesion, 0.0]) * (1 - outside) + [0, 0, 0, outside])
    descriptors = np.stack(rows)
    affinity = knn_affinity(descriptors, 5)
    assert not affinity[group == 0][:, group == 1].any()
    labels, eigenvalues, _ = spectral_clusters(descriptors)
    assert eigenvalues[1] < 1e-9, "two components of the neighbour graph"
    assert not set(labels[group == 0]) & set(labels[group == 1])


def test_eigengap_picks_the_largest_jump():
    assert eigengap_clusters(np.array([0.0, 0.0, 0.0, 0.9, 1.0, 1.1])) == 3
    assert eigengap_clusters(np.array([0.0, 0.8, 0.85, 0.9])) == 1
    assert eigengap_clusters(np.array([0.0, 0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 2.0]),
                             max_clusters=4) == 2, "k is at most max_clusters"


def test_grid_descriptor_ignores_scale_sign_and_resolution():
    rng = np.random.default_rng(3)
    relevance = rng.normal(size=(12, 20, 9))
    descriptor = grid_descriptor(relevance)
    assert descriptor.shape == (512,) and descriptor.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(grid_descriptor(-37.5 * relevance), descriptor, rtol=1e-12)
    finer = relevance.repeat(2, 0).repeat(3, 1).repeat(2, 2)  # the same map on a grid 2 × 3 × 2 finer
    np.testing.assert_allclose(grid_descriptor(finer), descriptor, rtol=1e-9, atol=1e-15)


def test_grid_descriptor_puts_a_voxel_in_the_cell_of_its_place():
    relevance = np.zeros((16, 16, 16))
    relevance[15, 0, 9] = -4.0  # last eighth along i, first along j, fifth along k
    descriptor = grid_descriptor(relevance).reshape(8, 8, 8)
    assert descriptor[7, 0, 4] == pytest.approx(1.0)


def test_segment_descriptor_is_the_share_of_relevance_per_label_and_outside():
    segments = np.zeros((4, 4, 4), int)
    segments[0] = 3
    segments[1] = 5
    relevance = np.zeros((4, 4, 4))
    relevance[0, 0, 0] = 2.0
    relevance[1, 0, 0] = -1.0
    relevance[3, 3, 3] = 1.0
    expected = [0.5, 0.25, 0.25]
    np.testing.assert_allclose(segment_descriptor(relevance, segments, [3, 5]), expected)
    np.testing.assert_allclose(segment_descriptor(-9 * relevance, segments, [3, 5]), expected)


# ------------------------------------------------------------------- strategies.json on a cohort folder


def fake_cohort(tmp_path, groups, *, method="gxi", segments=False) -> tuple:
    """Case folders as ``xaioverlay cohort`` publishes them, with synthetic maps (group g's relevance at PLACES[g],
    inside the case's reference mask for group 0 only) and a manifest; returns (out, cases)."""
    rng = np.random.default_rng(7)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "out"
    (out / "cases").mkdir(parents=True)
    lines = ["case_id,image,label,reference_mask" + (",segments" if segments else "")]
    for number, group in enumerate(groups):
        case_id = f"c{number:02d}"
        relevance = np.zeros(GRID.size)
        i, j, k = PLACES[group]
        relevance[i:i + 3, j:j + 3, k:k + 3] = rng.uniform(0.5, 2.0)
        mask = np.zeros(GRID.size, np.uint8)
        mask[2:5, 2:5, 2:5] = 1  # where group 0 puts its relevance
        write_volume(Volume(rng.uniform(0, 1, GRID.size).astype(np.float32), GRID), inputs / f"{case_id}.nrrd")
        write_volume(Volume(mask, GRID), inputs / f"{case_id}_mask.nrrd")
        row = f"{case_id},{case_id}.nrrd,{group},{case_id}_mask.nrrd"
        if segments:
            labels = np.zeros(GRID.size, np.uint8)
            for label, (a, b, c) in enumerate(PLACES, start=1):
                labels[a:a + 4, b:b + 4, c:c + 4] = label
            write_volume(Volume(labels, GRID), inputs / f"{case_id}_segments.nrrd")
            row += f",{case_id}_segments.nrrd"
        lines.append(row)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{case_id}-", dir=out / "cases"))
        write_volume(Volume(relevance.astype(np.float32), GRID), staging / f"{method}.nrrd")
        write_json({"methods": [{"spec": method, "method": method, "file": f"{method}.nrrd"}]},
                   staging / "explanation.json")
        case = Case(case_id, (str(inputs / f"{case_id}.nrrd"),), str(group), str(inputs / f"{case_id}_mask.nrrd"))
        write_case_folder(case, out / "cases", DONE, [{"case_id": case_id, "method": method}], None,
                          staging=staging)
    (inputs / "cases.csv").write_text("\n".join(lines) + "\n")
    return out, read_manifest(inputs / "cases.csv")


def test_strategies_json_has_the_clusters_mean_maps_and_shares_inside_the_masks(tmp_path):
    groups = [0, 1] * 5 + [0]
    out, cases = fake_cohort(tmp_path, groups)
    path = write_strategies(out, cases)
    assert path == out / STRATEGIES_FILE
    strategies = json.loads(path.read_text())
    assert {"method", "descriptor", "chosen_k", "eigenvalues", "reference_case", "clusters"} <= set(strategies)
    assert (strategies["method"], strategies["descriptor"], strategies["chosen_k"]) == ("gxi", "grid8", 2)
    assert strategies["reference_case"] == "c00"
    first, second = strategies["clusters"]
    assert first["members"] == [f"c{n:02d}" for n, g in enumerate(groups) if g == 0]
    assert second["members"] == [f"c{n:02d}" for n, g in enumerate(groups) if g == 1]
    assert (first["relevance_inside"], first["relevance_outside"]) == (1.0, 0.0)
    assert (second["relevance_inside"], second["relevance_outside"]) == (0.0, 1.0)
    for cluster, (i, j, k) in zip((first, second), PLACES):
        mean_map = read_volume(out / cluster["mean_map"])
        assert mean_map.geometry.same_grid(GRID), "mean map on the reference case's grid"
        assert mean_map.array.sum() == pytest.approx(1.0, rel=1e-5), "mean share of each case's relevance"
        assert mean_map.array[i:i + 3, j:j + 3, k:k + 3].sum() == pytest.approx(1.0, rel=1e-5)
        assert (out / cluster["mean_map_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_strategies_with_segments_use_the_share_per_label(tmp_path):
    out, cases = fake_cohort(tmp_path, [0, 1, 2] * 4, segments=True)
    strategies = json.loads(write_strategies(out, cases).read_text())
    assert strategies["descriptor"] == "segments"
    assert (strategies["segment_labels"], strategies["chosen_k"]) == ([1, 2, 3], 3)
    assert [c["members"] for c in strategies["clusters"]] == [[f"c{n:02d}" for n in range(g, 12, 3)] for g in range(3)]


def test_strategies_of_a_method_the_cohort_did_not_run_refused_in_one_line(tmp_path):
    out, cases = fake_cohort(tmp_path, [0, 1, 0])
    with pytest.raises(InputError, match=r"^--strategies-method lrp: no case has this map \(the cohort ran gxi\)"):
        write_strategies(out, cases, "lrp")


@pytest.mark.slow
def test_strategies_of_a_real_cohort_run_schema_and_mean_maps(tmp_path):
    pytest.importorskip("distributed", reason="cohorts need dask[distributed] (the test extra installs it)")
    from support import SMALL_DENSENET, save_spec_model
    from test_cohort_run import SMALL_GRID, write_cases
    from xaioverlay.cohort import CaseSettings, run_cohort

    model = save_spec_model(tmp_path / "model", SMALL_DENSENET, task="classification", class_names=["no", "yes"])
    manifest = tmp_path / "volumes" / "cases.csv"
    manifest.write_text("\n".join(write_cases(tmp_path / "volumes", 8)) + "\n")
    out = tmp_path / "out"
    settings = CaseSettings(model=str(model), methods="gxi,gradcam", device="cpu", torch_threads=1, similar=0)
    assert run_cohort(manifest, settings, out, workers=1).done == 8

    strategies = json.loads(write_strategies(out, read_manifest(manifest)).read_text())
    assert strategies["method"] == "gxi", "the first method run"
    assert strategies["reference_case"] == "case_00" and strategies["descriptor"] == "grid8"
    assert isinstance(strategies["chosen_k"], int) and len(strategies["clusters"]) == strategies["chosen_k"]
    assert all(isinstance(v, float) for v in strategies["eigenvalues"]) and strategies["eigenvalues"][0] < 1e-6
    members = [case_id for cluster in strategies["clusters"] for case_id in cluster["members"]]
    assert sorted(members) == [f"case_{n:02d}" for n in range(8)], "every done case in exactly one cluster"
    reference = read_volume(tmp_path / "volumes" / "p0.nrrd")
    for number, cluster in enumerate(strategies["clusters"]):
        assert cluster["id"] == number
        assert {"members", "mean_map", "mean_map_png", "relevance_inside", "relevance_outside"} <= set(cluster)
        mean_map = read_volume(out / cluster["mean_map"])
        assert mean_map.geometry.same_grid(reference.geometry)
        assert mean_map.array.min() >= 0 and mean_map.array.sum() == pytest.approx(1.0, rel=1e-4)
        assert (out / cluster["mean_map_png"]).stat().st_size > 1000
        with_tumour = [m for m in cluster["members"] if int(m[-2:]) % 2 == 0]  # write_cases: even cases have one
        assert cluster["cases_with_mask"] == len(with_tumour)
        if with_tumour:
            assert 0.0 <= cluster["relevance_inside"] <= 1.0
            assert cluster["relevance_inside"] + cluster["relevance_outside"] == pytest.approx(1.0)


@pytest.mark.slow
def test_shortcut_classifier_strategies_separate_tag_relevance_from_tumour_relevance(tmp_path):
    """The committed shortcut classifier (tools/train_shortcut_classifier.py) on the README's 40 held-out
    phantoms of ``make_phantom_cohort.py --shortcut --segments``: with the per-segment descriptor the strategies
    put the 13 tagged tumours, the 13 untagged tumours and the 14 tumour-free cases in three clusters; every
    tagged case has relevance on its tag, the untagged tumours' cluster on the tumour. (On the first 18 of
    them the eigengap chose four clusters: the 6 tagged cases split 4 + 2, with one untagged tumour.)"""
    pytest.importorskip("distributed", reason="cohorts need dask[distributed] (the test extra installs it)")
    import csv
    import subprocess
    import sys

    from xaioverlay.cohort import CaseSettings, run_cohort
    from xaioverlay.cohort.strategies import map_of, share_inside_mask

    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, str(root / "tools" / "make_phantom_cohort.py"), str(tmp_path / "in"),
                    "--cases", "40", "--shortcut", "--segments"], check=True, capture_output=True)
    manifest = tmp_path / "in" / "cases.csv"
    model = root / "Resources" / "bundles" / "shortcut_classifier"
    settings = CaseSettings(model=str(model), methods="gxi", target="class:tumour", device="cpu", torch_threads=1,
                            similar=0)
    assert run_cohort(manifest, settings, tmp_path / "out", workers=1).done == 40
    strategies = json.loads(write_strategies(tmp_path / "out", read_manifest(manifest)).read_text())
    rows = list(csv.DictReader(manifest.open(encoding="utf-8")))
    groups = {kind: sorted(r["case_id"] for r in rows if (r["label"], r["shortcut_tag"]) == kind)
              for kind in (("1", "1"), ("1", "0"), ("0", "0"))}
    assert strategies["descriptor"] == "segments" and strategies["chosen_k"] == 3
    assert sorted(sorted(c["members"]) for c in strategies["clusters"]) == sorted(groups.values())
    by_case = {r["case_id"]: r for r in rows}

    def tag_share(case_id):
        relevance = map_of(tmp_path / "out" / "cases" / case_id, "gxi")
        return share_inside_mask(relevance, str(tmp_path / "in" / by_case[case_id]["tag_mask"]))

    assert min(tag_share(c) for c in groups[("1", "1")]) > 0.01  # 64 voxels: 0.02 % of the volume
    tumour = {tuple(sorted(c["members"])): c["relevance_inside"] for c in strategies["clusters"]}
    assert tumour[tuple(groups[("1", "0")])] > 0.2
