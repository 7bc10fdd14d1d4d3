"""The cohort's numbers: a classifier's performance against the labels, and bootstrap intervals of means.

Pure functions on plain arrays; :mod:`.report` turns them into the cohort report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..metrics.agreement import centred_ranks

#: Resamples of a bootstrap interval, and the seed that makes every report's intervals reproducible.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a positive case scores above a negative one (ties count half).

    Args:
        positive: (N,) bool, the reference (label is the class).
        score: (N,) float, higher = more the class.
    Returns:
        The AUC, NaN when either group is empty (the curve is undefined).
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values = torch.as_tensor(np.asarray(score, dtype=np.float64))[None]
    ranks = centred_ranks(values)[0].double().numpy() + (len(positive) + 1) / 2.0  # 1..N, ties averaged
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def sensitivity_specificity(positive: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """(true positive rate, true negative rate) of the decisions ``predicted`` (N,) bool against ``positive``
    (N,) bool; NaN where there is no positive (no negative) case."""
    positive, predicted = np.asarray(positive, dtype=bool), np.asarray(predicted, dtype=bool)
    sensitivity = (predicted & positive).sum() / positive.sum() if positive.any() else float("nan")
    specificity = (~predicted & ~positive).sum() / (~positive).sum() if (~positive).any() else float("nan")
    return float(sensitivity), float(specificity)


def confusion_matrix(truth: Sequence[int], predicted: Sequence[int], classes: int) -> np.ndarray:
    """(classes, classes) counts: row = the label's class, column = the model's predicted class."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


@dataclass(frozen=True)
class ClassPerformance:
    """One class against the rest, at the model's decision rule (the class of the highest output)."""

    name: str
    positives: int
    negatives: int
    auc: float
    sensitivity: float
    specificity: float


def class_performance(truth: np.ndarray, predicted: np.ndarray, scores: np.ndarray,
                      names: Sequence[str]) -> list[ClassPerformance]:
    """Each class against the rest (only the second class of a two-class model: the positive one).

    Args:
        truth: (N,) class index of each case's label.
        predicted: (N,) class index the model chose (its decision rule: the highest output).
        scores: (N, C) the model's probabilities (or logits when it has no output activation).
        names: C class names.
    """
    truth, predicted, scores = np.asarray(truth), np.asarray(predicted), np.asarray(scores, dtype=np.float64)
    classes = [1] if len(names) == 2 else range(len(names))
    rows = []
    for index in classes:
        positive = truth == index
        sensitivity, specificity = sensitivity_specificity(positive, predicted == index)
        rows.append(ClassPerformance(names[index], int(positive.sum()), int((~positive).sum()),
                                     roc_auc(positive, scores[:, index]), sensitivity, specificity))
    return rows


def label_index(label: str | None, names: Sequence[str]) -> int | None:
    """A manifest label as a class index: a class name (any case) or the class number; None if neither."""
    if label is None:
        return None
    text = str(label).strip()
    lowered = [name.lower() for name in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() and 0 <= number < len(names) else None


def bootstrap_mean(values: Sequence[float], *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` (N,) and its percentile bootstrap interval.

    ``resamples`` means of N values drawn with replacement (seeded: the same values give the same
    interval); the interval spans their central ``level`` share. NaN values are left out; all three are
    NaN when nothing is left.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // values.size)  # bounded memory for large cohorts
    means = np.concatenate([values[rng.integers(0, values.size, (min(chunk, resamples - done), values.size))].mean(1)
                            for done in range(0, resamples, chunk)])
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(values.mean()), float(low), float(high)


def dice(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Dice overlap 2|P ∩ R| / (|P| + |R|) of two boolean masks of one shape; NaN when both are empty."""
    predicted, reference = np.asarray(predicted, dtype=bool), np.asarray(reference, dtype=bool)
    total = int(predicted.sum()) + int(reference.sum())
    return float("nan") if total == 0 else 2.0 * int((predicted & reference).sum()) / total
