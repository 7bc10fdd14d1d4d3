"""Targets: RAS regions select the voxels Slicer would show there; bad targets say what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xaioverlay.errors import TargetError
from xaioverlay.models import load_model
from xaioverlay.prediction import Prediction, predict
from xaioverlay.targets import parse_target, resolve_target
from xaioverlay.volumes import Geometry, Volume, write_volume

# LPS-aligned grid (as ITK stores it): voxel (i, j, k) sits at LPS origin + (2i, 2j, 3k), i.e. RAS (-x, -y, z).
GRID = Geometry((20, 16, 12), (2.0, 2.0, 3.0), (-10.0, 4.0, -6.0))


@pytest.fixture
def segmenter(unet_spec):
    model = load_model(unet_spec, device="cpu")
    volume = Volume(np.random.default_rng(0).random(GRID.size, dtype=np.float32), GRID)
    model_input = model.preprocess([volume])
    return model, model_input, model.infer(model_input.tensor), predict(model, model_input.tensor, channel=1)


def ras_of(i, j, k):
    return GRID.ijk_to_ras_points([[i, j, k]])[0]


def test_point_with_zero_radius_selects_the_voxel_holding_the_ras_point(segmenter):
    model, model_input, logits, prediction = segmenter
    r, a, s = ras_of(7, 5, 3) + np.array([0.4, -0.3, 0.5])  # inside voxel (7, 5, 3)
    target = resolve_target(f"channel:1@point:{r},{a},{s}", model, model_input, prediction)
    assert torch.nonzero(target.weights).tolist() == [[7, 5, 3]]
    # the target is the logit of channel 1 at that voxel
    assert float(target(logits)[0]) == pytest.approx(float(logits[0, 1, 7, 5, 3]))


def test_point_radius_and_box_are_in_ras_millimetres(segmenter):
    model, model_input, logits, prediction = segmenter
    centre = ras_of(10, 8, 5)
    ball = resolve_target(f"channel:1@point:{centre[0]},{centre[1]},{centre[2]},4.5", model, model_input, prediction)
    every = np.argwhere(np.ones(GRID.size, bool))
    expected = every[np.linalg.norm(GRID.ijk_to_ras_points(every) - centre, axis=1) <= 4.5]
    assert sorted(torch.nonzero(ball.weights).tolist()) == sorted(expected.tolist())
    assert len(expected) == 21 + 2 * 9  # in-plane: di²+dj² ≤ 5 (21 voxels); slices ±1 (3 mm): di²+dj² ≤ 2 (9 each)
    low, high = ras_of(4, 3, 2), ras_of(6, 6, 4)  # corners in any order
    box_spec = "channel:tumour@box:" + ",".join(f"{v}" for v in (*low, *high))
    box = resolve_target(box_spec, model, model_input, prediction)
    selected = torch.nonzero(box.weights)
    assert selected.min(0).values.tolist() == [4, 3, 2] and selected.max(0).values.tolist() == [6, 6, 4]
    assert box.region["voxels"] == 3 * 4 * 3 and box.region["volume_ml"] == pytest.approx(36 * 12 / 1000)


def test_mask_on_another_grid_is_resampled_by_position(segmenter, tmp_path):
    model, model_input, logits, prediction = segmenter
    fine = Geometry((40, 32, 30), (1.0, 1.0, 1.0), (-10.5, 3.5, -7.0))
    array = np.zeros(fine.size, np.uint8)
    centre = np.round(fine.ras_to_ijk([ras_of(12, 9, 6)])[0]).astype(int)
    array[tuple(centre)] = 1
    array[centre[0] - 1:centre[0] + 2, centre[1] - 1:centre[1] + 2, centre[2] - 1:centre[2] + 2] = 1
    path = write_volume(Volume(array, fine), tmp_path / "mask.nii.gz")
    target = resolve_target(f"channel:1@mask:{path}", model, model_input, prediction)
    assert [12, 9, 6] in torch.nonzero(target.weights).tolist()


def test_predicted_region_is_the_models_own_segmentation(segmenter):
    model, model_input, logits, prediction = segmenter
    target = resolve_target("channel:1", model, model_input, prediction)
    assert torch.equal(target.weights.bool(), logits[0].argmax(0) == 1)


@pytest.mark.parametrize("text,message", [
    ("channel:1@box:1,2,3", "a box needs 6 numbers"),
    ("channel:1@point:a,b,c", "must be numbers"),
    ("tumour", "cannot read target"),
    ("channel:1@point:500,500,500", "lies outside the volume"),
    ("channel:1@box:500,500,500,600,600,600", "holds no voxel centre"),
    ("channel:tumor", "did you mean 'tumour'"),
    ("channel:7", "out of range; this model has 2: 0=background, 1=tumour"),
])
def test_bad_targets_say_what_is_wrong(segmenter, text, message):
    model, model_input, logits, prediction = segmenter
    with pytest.raises(TargetError, match=message):
        resolve_target(parse_target(text), model, model_input, prediction)


def test_empty_mask_and_empty_prediction_are_errors(segmenter, tmp_path):
    model, model_input, logits, prediction = segmenter
    path = write_volume(Volume(np.zeros(GRID.size, np.uint8), GRID), tmp_path / "empty.nrrd")
    with pytest.raises(TargetError, match="is empty"):
        resolve_target(f"channel:1@mask:{path}", model, model_input, prediction)
    background_only = Prediction(labels=torch.zeros(GRID.size, dtype=torch.uint8), channel=1,
                                 scores=torch.zeros(GRID.size), region=torch.zeros(GRID.size, dtype=torch.bool))
    with pytest.raises(TargetError, match="predicts no 'tumour' voxel"):
        resolve_target("channel:1", model, model_input, background_only)


def test_classifier_targets_logit_or_probability(densenet_spec):
    model = load_model(densenet_spec, device="cpu")
    volume = Volume(np.random.default_rng(1).random((32, 32, 32), dtype=np.float32), Geometry((32, 32, 32), (1, 1, 1), (0, 0, 0)))
    model_input = model.preprocess([volume])
    logits = model.infer(model_input.tensor)
    prediction = predict(model, model_input.tensor)
    logit = resolve_target("class:tumour", model, model_input, prediction)(logits)
    assert float(logit) == pytest.approx(float(logits[0, 1]))
    probability = resolve_target("class:1", model, model_input, prediction, score="probability")(logits)
    assert float(probability) == pytest.approx(float(torch.softmax(logits, 1)[0, 1]))
    with pytest.raises(TargetError, match="a classifier has no spatial output"):
        resolve_target("class:1@point:0,0,0", model, model_input, prediction)
