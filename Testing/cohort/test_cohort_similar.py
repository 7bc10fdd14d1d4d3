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


def test_nearest_cases_in_blocks_equal_all_at_once():
    features = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    features[7] = features[3] * 2.0  # a tie with another row's direction
    whole = nearest_cases(features, k=4, block=len(features))
    for block in (1, 7, 16):
        indices, similarities = nearest_cases(features, k=4, block=block)
        assert np.array_equal(indices, whole[0]) and np.allclose(similarities, whole[1], atol=1e-6)
    assert whole[0][3, 0] == 7 and whole[0][7, 0] == 3
