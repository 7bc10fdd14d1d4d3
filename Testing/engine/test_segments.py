"""Segments (cubes, SLIC supervoxels, label volumes) on the model grid, refused in one line when unusable,
and stored beside the map of the method that used them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from support import blob_volume, oblique_geometry, save_spec_model
from xaioverlay import cli
from xaioverlay.errors import InputError
from xaioverlay.explain import explain
from xaioverlay.methods.occlusion import Occlusion
from xaioverlay.models import load_model
from xaioverlay.segments import check_duration, make_segments, parse_segments
from xaioverlay.volumes import Geometry, Volume, read_volume, write_volume

UNET = {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
                                 "strides": [2], "num_res_units": 0}}


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    return load_model(save_spec_model(folder, UNET, task="segmentation", class_names=["background", "tumour"]),
                      device="cpu")


def volume_on(geometry: Geometry, seed: int = 0) -> Volume:
    centre = geometry.ijk_to_ras_points(np.array([[s / 2 for s in geometry.size]]))[0]
    return blob_volume(geometry, centre, 5.0, value=2.0, noise=0.2, seed=seed)


@pytest.mark.parametrize("text, kind", [("cubes:16", "cubes"), ("cubes:12mm", "cubes"), ("cubes:8x8x4", "cubes"),
                                        ("slic:256", "slic"), ("SLIC:64,compactness=0.5", "slic"),
                                        ("labels:/data/organs.nii.gz", "labels")])
def test_specs_are_read_and_written_back(text, kind):
    spec = parse_segments(text)
    assert spec.kind == kind
    assert parse_segments(spec.text()) == spec


@pytest.mark.parametrize("text, says", [("cubes", "cannot read segments"), ("boxes:4", "cannot read segments"),
                                        ("cubes:big", "cannot read"), ("slic:1", "≥ 2"), ("slic:many", "≥ 2"),
                                        ("slic:64,compactness=-1", "compactness=C"),
                                        ("slic:64,sigma=2", "compactness=C")])
def test_unreadable_specs_get_one_line(text, says):
    with pytest.raises(InputError, match=says) as refused:
        parse_segments(text)
    assert "\n" not in str(refused.value)


def test_cubes_in_mm_follow_the_model_grid_spacing(segmenter):
    geometry = Geometry((16, 16, 8), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    model_input = segmenter.preprocess([volume_on(geometry)])
    ids = make_segments(parse_segments("cubes:8mm"), model_input)
    assert ids.dtype == torch.long and tuple(ids.shape) == (16, 16, 8)
    assert sorted(ids.unique().tolist()) == list(range(8))  # 2 × 2 × 2 cubes of 8×8×4 voxels
    assert int(ids[7, 7, 3]) == 0 and int(ids[8, 0, 0]) != 0 and int(ids[0, 0, 4]) == 1


def test_slic_supervoxels_are_contiguous_and_split_the_blob_from_the_background(segmenter):
    geometry = Geometry((24, 24, 24), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    volume = volume_on(geometry)
    model_input = segmenter.preprocess([volume])
    ids = make_segments(parse_segments("slic:27"), model_input)
    count = int(ids.max()) + 1
    assert 8 <= count <= 60 and sorted(ids.unique().tolist()) == list(range(count))
    blob = torch.as_tensor(volume.array > 1.0)
    # the supervoxels follow the blob's edge: the one holding its centre is mostly blob
    centre = ids == ids[12, 12, 12]
    assert float(blob[centre].float().mean()) > 0.8


def test_slic_on_anisotropic_voxels_keeps_supervoxels_round_in_mm(segmenter):
    geometry = Geometry((32, 32, 8), (1.0, 1.0, 4.0), (0.0, 0.0, 0.0))
    volume = Volume(np.zeros(geometry.size, np.float32), geometry)  # no edges: shape comes from spacing only
    ids = make_segments(parse_segments("slic:16"), segmenter.preprocess([volume]))
    extents = []
    for label in ids.unique():
        where = (ids == label).nonzero().float()
        extents.append((where.max(0).values - where.min(0).values + 1) * torch.tensor([1.0, 1.0, 4.0]))
    mm = torch.stack(extents).median(0).values
    assert float(mm[2]) >= 0.5 * float(mm[0])  # without spacing, z would be cut in 8 mm voxel-cubes' worth


def test_label_volume_on_another_grid_is_resampled_nearest_neighbour(segmenter, tmp_path):
    input_geometry = oblique_geometry(size=(20, 16, 12), spacing=(1.0, 1.2, 2.0))
    volume = volume_on(input_geometry)
    # labels on a finer, axis-aligned grid covering the same space: left half 5, right half 9, background 0
    fine = Geometry((60, 60, 60), (0.8, 0.8, 0.8), tuple(float(v) for v in np.array(input_geometry.origin) - 20.0))
    centre_ras = input_geometry.ijk_to_ras_points(np.array([[10.0, 8.0, 6.0]]))[0]
    ras = fine.ijk_to_ras_points(np.indices(fine.size).reshape(3, -1).T).reshape(*fine.size, 3)
    labels = np.where(ras[..., 0] < centre_ras[0], 5, 9).astype(np.uint8)
    labels[np.linalg.norm(ras - centre_ras, axis=-1) > 12] = 0
    path = write_volume(Volume(labels, fine), tmp_path / "organs.nrrd")
    model_input = segmenter.preprocess([volume])
    ids = make_segments(parse_segments(f"labels:{path}"), model_input)
    assert sorted(ids.unique().tolist()) == [0, 1, 2]  # 0, 5 and 9, renumbered in order
    model_ras = model_input.model_geometry.ijk_to_ras_points(np.indices(ids.shape).reshape(3, -1).T)
    model_ras = model_ras.reshape(*ids.shape, 3)
    expected = np.where(model_ras[..., 0] < centre_ras[0], 1, 2)
    expected[np.linalg.norm(model_ras - centre_ras, axis=-1) > 12] = 0
    far_from_edges = (np.abs(model_ras[..., 0] - centre_ras[0]) > 2.5) & (
        np.abs(np.linalg.norm(model_ras - centre_ras, axis=-1) - 12) > 2.5)
    assert (ids.numpy()[far_from_edges] == expected[far_from_edges]).all()


def test_unusable_label_volumes_are_refused_in_one_line(segmenter, tmp_path):
    geometry = Geometry((16, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    model_input = segmenter.preprocess([volume_on(geometry)])
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume at all")
    elsewhere = Volume(np.full((8, 8, 8), 3, np.uint8), Geometry((8, 8, 8), (1.0, 1.0, 1.0), (500.0, 0.0, 0.0)))
    outside = write_volume(elsewhere, tmp_path / "elsewhere.nrrd")
    for spec, says in ((f"labels:{tmp_path / 'missing.nrrd'}", "not found"), (f"labels:{broken}", "cannot read"),
                       (f"labels:{outside}", "1 segment inside the volume"), ("cubes:40", "1 segment inside")):
        with pytest.raises(InputError, match=says) as refused:
            make_segments(parse_segments(spec), model_input)
        assert "\n" not in str(refused.value)


def test_a_run_of_hours_is_refused_with_the_estimate_and_how_to_reduce_it():
    check_duration(1000, 0.5, "shap:1000", "fewer samples")  # 8 minutes: fine
    with pytest.raises(InputError, match=r"shap:4000 over 512 segments needs about 2,048,000 model passes, "
                                         r"about 56\.9 h .*to reduce it: use slic:128"):
        check_duration(4000 * 512, 0.1, "shap:4000 over 512 segments", "use slic:128")


def test_occlusion_over_segments_writes_them_beside_the_map(segmenter, tmp_path, capsys):
    geometry = oblique_geometry(size=(20, 16, 12), spacing=(1.0, 1.2, 2.0))
    volume = write_volume(volume_on(geometry, seed=3), tmp_path / "case.nrrd")
    model = save_spec_model(tmp_path / "model", UNET, task="segmentation", class_names=["background", "tumour"])
    out = tmp_path / "out"
    r, a, s = geometry.ijk_to_ras_points(np.array([[10.0, 8.0, 6.0]]))[0]
    code = cli.main(["explain", "--model", str(model), "--input", str(volume), "--methods", "occlusion,gxi",
                     "--segments", "cubes:6mm", "--target", f"channel:tumour@point:{r},{a},{s},6", "--out", str(out),
                     "--no-montage", "--progress", "none"])
    assert code == 0
    record = json.loads((out / "explanation.json").read_text())
    occlusion, gxi = record["methods"]
    assert "segments" not in gxi  # gradient × input has no segments
    segments_file = occlusion["file"].replace(".nrrd", "_segments.nrrd")
    assert occlusion["segments"]["spec"] == "cubes:6mm" and occlusion["segments"]["file"] == segments_file
    labels = read_volume(out / segments_file)
    heat = read_volume(out / occlusion["file"])
    assert labels.geometry.same_grid(heat.geometry)  # on the input's exact grid, like the map
    assert int(labels.array.max()) == occlusion["segments"]["count"] == occlusion["parameters"]["segment_count"]
    assert occlusion["extras"]["occluded_passes"] <= occlusion["segments"]["count"]
    assert sitk.ReadImage(str(out / segments_file)).GetPixelID() == sitk.sitkUInt16


def test_occlusion_over_segments_maps_each_segments_own_drop(segmenter):
    geometry = Geometry((16, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    volume = volume_on(geometry, seed=5)
    method, target_text = Occlusion(), "channel:tumour@point:-8,-8,8,4"
    explanation = explain(segmenter, [volume], [method], target_text, segments="cubes:4")
    result = explanation.results[0]
    ids = result.model_grid_segments.ids
    assert result.parameters["segment_count"] == 64 and result.segment_spec == "cubes:4"
    x, target = explanation.model_input.tensor, explanation.resolved_target
    with torch.no_grad():
        clean = float(target(segmenter.forward(x))[0])
        for segment in (0, int(ids[8, 8, 8]), int(ids.max())):
            drop = clean - float(target(segmenter.forward(torch.where(ids == segment, 0.0, x)))[0])
            values = result.model_grid_map[ids == segment]
            assert float(values.max() - values.min()) == 0.0
            assert float(values[0]) == pytest.approx(drop, abs=1e-4 * abs(clean))
    assert float(result.model_grid_map[ids == int(ids[8, 8, 8])][0]) != 0.0


def test_a_bad_segments_option_stops_the_cli_before_any_model_work(segmenter, tmp_path, capsys):
    geometry = Geometry((16, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    volume = write_volume(volume_on(geometry), tmp_path / "case.nrrd")
    model = save_spec_model(tmp_path / "model", UNET, task="segmentation", class_names=["background", "tumour"])
    code = cli.main(["explain", "--model", str(model), "--input", str(volume), "--methods", "occlusion",
                     "--segments", f"labels:{tmp_path / 'nowhere.nrrd'}", "--out", str(tmp_path / "out"),
                     "--progress", "none"])
    captured = capsys.readouterr()
    assert code == 1
    error_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(error_lines) == 1 and "nowhere.nrrd not found" in error_lines[0]
    assert not (tmp_path / "out" / "explanation.json").exists()
