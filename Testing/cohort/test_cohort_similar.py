"""Nearest cases by cosine similarity of feature vectors."""

from __future__ import annotations

import numpy as np
import pytest

from xaioverlay.cohort.similar import nearest_cases


def test_nearest_cases_rank_by_cosine_not_by_length_and_never_return_the_case_itself():
    features = np.array([[1.0, 0.0, 0.0],   # 0
                         [10.0, 1.0, 0.0],  # 1: nearly parallel to 0, ten times longer
                         [0.0, 1.0, 0.0],   # 2
                         [1.0, 1.0, 0.0]])  # 3: 45° from 0 and from 2, nearer to 1
    indices, similarities = nearest_cases(features, k=2)
    assert indices.tolist() == [[1, 3], [0, 3], [3, 1], [1, 0]]
    assert similarities[0, 0] == pytest.approx(10 / np.sqrt(101))
    assert np.allclose(similarities[3], [11 / np.sqrt(2 * 101), np.sqrt(0.5)])


def test_nearest_cases_k_larger_than_the_cohort_gives_every_other_case():
    indices, _ = nearest_cases(np.eye(3), k=10)
    assert indices.shape == (3, 2) and all(i not in row for i, row in enumerate(indices.tolist()))


def test_pooled_features_run_the_windows_without_building_the_whole_output(tmp_path, monkeypatch):
    import torch

    from support import SMALL_UNET, save_spec_model
    from xaioverlay.cohort.similar import pooled_features
    from xaioverlay.models import load_model
    from xaioverlay.sliding import window_slices

    spec = save_spec_model(tmp_path / "unet", SMALL_UNET, task="segmentation", class_names=["background", "tumour"],
                           sliding_window={"roi_size": [16, 16, 16], "overlap": 0.25})
    model = load_model(spec, device="cpu")
    x = torch.randn((1, 1, 32, 28, 16), generator=torch.Generator().manual_seed(0))
    layer = "model.1.submodule.0"  # a down-sampling stage: every window passes through it
    expected = []
    handle = model.network.get_submodule(layer).register_forward_hook(
        lambda module, inputs, output: expected.append(output.flatten(2).mean(2)[0]))
    with torch.no_grad():  # the 3 × 2 windows as the model's inferer places them, one at a time
        for part in window_slices(x.shape[2:], (16, 16, 16), 0.25):
            model.network(x[(slice(None), slice(None), *part)])
    handle.remove()

    def refuse(*args, **kwargs):
        raise AssertionError("the whole multi-channel output was built")

    monkeypatch.setattr(model, "infer", refuse)
    features = pooled_features(model, x, layer)
    np.testing.assert_allclose(features, torch.stack(expected).mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_nearest_cases_in_blocks_equal_all_at_once():
    features = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    features[7] = features[3] * 2.0  # a tie with another row's direction
    whole = nearest_cases(features, k=4, block=len(features))
    for block in (1, 7, 16):
        indices, similarities = nearest_cases(features, k=4, block=block)
        assert np.array_equal(indices, whole[0]) and np.allclose(similarities, whole[1], atol=1e-6)
    assert whole[0][3, 0] == 7 and whole[0][7, 0] == 3
