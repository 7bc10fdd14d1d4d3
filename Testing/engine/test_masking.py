"""The generic masked scorer: coalitions of segments scored exactly, equal to masked forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_occlusion_exact import grid_volume, segmenter, windowed_segmenter  # noqa: F401 (fixtures)
from xaioverlay.baselines import baseline
from xaioverlay.methods import boxes as box_ops
from xaioverlay.methods.masking import BRUTE_FORCE, SegmentScorer, Speedups, kept_voxels, removed_boxes, segment_boxes
from xaioverlay.prediction import predict
from xaioverlay.segments import make_segments, parse_segments
from xaioverlay.targets import resolve_target
from xaioverlay.volumes import Geometry, Volume, write_volume


def label_file(folder, reference: Geometry) -> str:
    """Three organs on a coarser, shifted grid than the input (resampled nearest-neighbour)."""
    geometry = Geometry(tuple(-(-n // 2) + 1 for n in reference.size), (2.0, 2.0, 2.0), (-1.0, -1.0, 0.5))
    labels = np.zeros(geometry.size, np.uint8)
    labels[: geometry.size[0] // 2, :, :] = 3
    labels[geometry.size[0] // 2:, : geometry.size[1] // 3, :] = 7
    labels[2:5, 4:8, 2:6] = 12
    path = folder / "organs.nrrd"
    write_volume(Volume(labels, geometry), path)
    return f"labels:{path}"


def masked_scores(model, x, fill, target, segments, keep) -> torch.Tensor:
    """Reference: each coalition's masked input through the model's own inference, one at a time."""
    scores = []
    for row in keep:
        kept = row[segments][None, None]
        with torch.no_grad():
            scores.append(float(target(model.infer(torch.where(kept, x, fill)))[0]))
    return torch.tensor(scores, dtype=torch.float64)


def coalitions(count: int, samples: int, seed: int) -> torch.Tensor:
    """All kept, none kept, one removed, and random halves: (samples + 3, count) bool."""
    generator = torch.Generator().manual_seed(seed)
    random = torch.rand((samples, count), generator=generator) < 0.5
    one_removed = torch.ones(count, dtype=torch.bool)
    one_removed[count // 2] = False
    return torch.cat([torch.ones((1, count), dtype=torch.bool), torch.zeros((1, count), dtype=torch.bool),
                      one_removed[None], random])


CASES = [("whole volume", "cubes:6", "zero"), ("whole volume", "slic:12", "mean"), ("whole volume", "labels", "blur"),
         ("sliding window", "cubes:5", "zero"), ("sliding window", "slic:16", "blur"),
         ("sliding window", "labels", "mean")]


@pytest.mark.parametrize("grid, segments_text, fill_kind", CASES)
def test_segment_scores_equal_masked_forward_passes(segmenter, windowed_segmenter, tmp_path, grid, segments_text,
                                                    fill_kind, monkeypatch):
    if fill_kind == "blur":  # the batched reads CUDA uses (one gather per batch), checked here on the CPU
        monkeypatch.setattr(box_ops, "VECTORISED_ON_CPU", True)
    model = segmenter if grid == "whole volume" else windowed_segmenter
    volume = grid_volume((12, 20, 12), seed=4, centre=(0, 2, 0))
    target_text = "channel:1@box:-4,-8,4,-7,-12,7"  # a region spanning both sliding windows
    model_input = model.preprocess([volume])
    x = model_input.tensor
    target = resolve_target(target_text, model, model_input, predict(model, x))
    if segments_text == "labels":
        segments_text = label_file(tmp_path, volume.geometry)
    segments = make_segments(parse_segments(segments_text), model_input)
    fill = baseline(x, fill_kind, 2.0)
    scorer = SegmentScorer(model, x, fill, target, segments)
    keep = coalitions(scorer.num_segments, 8, seed=len(segments_text))
    ours = scorer.score(keep)
    reference = masked_scores(model, x, fill, target, segments, keep)
    scale = float(reference.abs().max())
    assert float((ours - reference).abs().max()) <= 1e-4 * scale, (ours, reference)
    assert scorer.full_score == pytest.approx(float(reference[0]), rel=1e-4)
    assert scorer.empty_score == pytest.approx(float(reference[1]), rel=1e-4, abs=1e-4 * scale)
    assert scorer.masked.engine == "incremental"
    assert 0 < scorer.passes
    if grid == "sliding window":
        assert scorer.masked.windows["used"] == 2


@pytest.mark.parametrize("speedups", ["brute force", "a probability of blended windows"])
def test_coalitions_through_whole_forward_passes_equal_masked_forward_passes(windowed_segmenter, speedups):
    """The model's own sliding-window inference for every coalition: with every speed-up off, and for a
    score that does not split over windows (the engine falls back to whole volumes)."""
    model = windowed_segmenter
    volume = grid_volume((12, 20, 12), seed=7, centre=(0, 2, 0))
    model_input = model.preprocess([volume])
    x = model_input.tensor
    score = "probability" if speedups != "brute force" else "logit"
    target = resolve_target("channel:1@box:-4,-8,4,-7,-12,7", model, model_input, predict(model, x, 1, score), score)
    segments = make_segments(parse_segments("cubes:6"), model_input)
    fill = baseline(x, "mean")
    scorer = SegmentScorer(model, x, fill, target, segments, BRUTE_FORCE if speedups == "brute force" else Speedups())
    keep = coalitions(scorer.num_segments, 6, seed=3)
    ours, reference = scorer.score(keep), masked_scores(model, x, fill, target, segments, keep)
    assert scorer.masked.engine == "forward"
    assert float((ours - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    assert len(set(reference.tolist())) > 3


def test_segments_out_of_the_receptive_field_cost_no_pass(segmenter):
    """A point target reads a small region: coalitions that only remove far cubes are not evaluated."""
    volume = grid_volume((24, 24, 24), seed=6)
    model_input = segmenter.preprocess([volume])
    x = model_input.tensor
    target = resolve_target("channel:1@point:-3,-3,3,1", segmenter, model_input, predict(segmenter, x))
    segments = make_segments(parse_segments("cubes:6"), model_input)  # 64 cubes
    scorer = SegmentScorer(segmenter, x, torch.zeros_like(x), target, segments)
    keep = torch.ones((64, 64), dtype=torch.bool)
    keep[torch.arange(64), torch.arange(64)] = False  # each coalition removes one cube
    scores = scorer.score(keep)
    assert scorer.masked.skipped > 0
    assert scorer.passes == 64 - scorer.masked.skipped
    unchanged = scores == scorer.full_score
    assert int(unchanged.sum()) >= scorer.masked.skipped


def test_removed_boxes_bound_the_removed_segments_only():
    segments = torch.zeros((6, 6, 6), dtype=torch.long)
    segments[3:, :, :] = 1
    segments[3:, 4:, 1:3] = 2
    boxes = segment_boxes(segments, 3)
    assert boxes[0].tolist() == [[0, 0, 0], [3, 0, 0], [3, 4, 1]]
    assert boxes[1].tolist() == [[3, 6, 6], [6, 6, 6], [6, 6, 3]]
    removed = torch.tensor([[False, False, True], [True, False, True], [False, False, False]])
    low, high = removed_boxes(removed, boxes)
    assert low.tolist() == [[3, 4, 1], [0, 0, 0], [0, 0, 0]]
    assert high.tolist() == [[6, 6, 3], [6, 6, 6], [0, 0, 0]]


def test_voxels_outside_every_segment_are_kept():
    keep = torch.tensor([[True, False], [False, True]])
    ids = torch.tensor([[0, 1, -1], [0, 1, -1]])
    assert kept_voxels(keep, ids[:, None, None]).flatten(1).tolist() == [[True, False, True], [False, True, True]]
    assert kept_voxels(keep, ids[0][None, None]).flatten(1).tolist() == [[True, False, True], [False, True, True]]


def test_scorer_refuses_segments_on_another_grid(segmenter):
    volume = grid_volume((12, 12, 12))
    model_input = segmenter.preprocess([volume])
    x = model_input.tensor
    target = resolve_target("channel:1@point:0,0,6,2", segmenter, model_input, predict(segmenter, x))
    with pytest.raises(ValueError, match="not on the model grid"):
        SegmentScorer(segmenter, x, x, target, torch.zeros((6, 6, 6), dtype=torch.long))

