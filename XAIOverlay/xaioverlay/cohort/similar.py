"""Similar cases: the cohort cases nearest to each case in the model's own feature space.

Each case's feature vector is one layer's activations averaged over space (global average pooling;
over every window for a sliding-window model). The default layer is the last feature map before a
classifier's head, or a segmenter's bottleneck (its candidate layer with the fewest voxels). Cases
are compared by the cosine similarity of these vectors.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models import LoadedModel
from ..models.base import CLASSIFICATION

FEATURES_FILE = "features.npy"


def feature_layer(model: LoadedModel, x: torch.Tensor) -> str:
    """The default layer: a classifier's CAM layer (last before the head), a segmenter's bottleneck."""
    from ..layers import candidate_layers, default_layer

    if model.task == CLASSIFICATION:
        return default_layer(model, x)
    layers = candidate_layers(model, x)
    if not layers:
        return default_layer(model, x)  # raises the no-feature-map error
    fewest = min(int(np.prod(layer.spatial_shape)) for layer in layers)
    return [layer.name for layer in layers if int(np.prod(layer.spatial_shape)) == fewest][-1]


def pooled_features(model: LoadedModel, x: torch.Tensor, layer: str) -> np.ndarray:
    """Activations of ``layer`` for input ``x`` (1, C_in, X, Y, Z), averaged over space (and windows) → (C,)."""
    from ..layers import find_module

    sums: list[torch.Tensor] = []

    def keep(module, inputs, output) -> None:
        output = output[0] if isinstance(output, (tuple, list)) else output
        sums.append(output.detach().float().flatten(2).mean(2)[0].cpu())  # (C,)

    handle = find_module(model.network, layer).register_forward_hook(keep)
    try:
        for _ in model.output_blocks(x):  # the hook sees every window; the output itself is not kept
            pass
    finally:
        handle.remove()
    return torch.stack(sums).mean(0).numpy().astype(np.float32)


def nearest_cases(features: np.ndarray, k: int, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``features`` (N, C), the ``k`` other rows of highest cosine similarity.

    Rows are compared ``block`` at a time, so memory grows as block × N, not N × N (10,000 cases).

    Returns:
        (indices, similarities), each (N, min(k, N - 1)); ties keep the lower index first.
    """
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = features / np.where(norms > 0, norms, 1.0)
    k = min(k, len(features) - 1)
    indices, similarities = [], []
    for start in range(0, len(unit), block):
        similarity = unit[start:start + block] @ unit.T  # (block, N)
        rows = np.arange(similarity.shape[0])
        similarity[rows, rows + start] = -np.inf  # never the case itself
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        indices.append(order)
        similarities.append(np.take_along_axis(similarity, order, axis=1))
    return np.concatenate(indices), np.concatenate(similarities)
