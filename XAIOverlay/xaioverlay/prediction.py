"""What the engine keeps of a model's output: the decision, never a segmenter's whole multi-channel output.

A 105-class segmenter's float32 output on a CT-sized model grid (274 × 274 × 300) is 9.5 GB, and a
one-hot of its decision as large again. :func:`predict` reads the output block by block as the
model's inferer blends it (:meth:`~xaioverlay.models.base.LoadedModel.output_blocks`) and keeps a
small integer label map, the voxel count of every channel, and one channel's score and predicted
region: what the target, the output summary and the shown segmentation need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.base import CLASSIFICATION, LoadedModel
from .progress import NO_PROGRESS, Progress


@dataclass
class Prediction:
    """The model's decision for one input.

    Attributes:
        logits: (1, K) classifier output; None for segmenters.
        labels: (X, Y, Z) predicted label per model-grid voxel, uint8 (int16 past 255 labels): the
            arg-max channel (softmax / no activation: channel 0 is the background) or, for independent
            sigmoid channels, the highest channel on plus one (0: none on). None for classifiers.
        counts: (K,) voxels predicted for each channel (sigmoid channels overlap).
        channel: the channel kept below, or None.
        scores: (X, Y, Z) float32 score of ``channel`` per voxel (logit, or its probability).
        region: (X, Y, Z) bool, the voxels predicted as ``channel``.
    """

    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    channel: int | None = None
    scores: torch.Tensor | None = None
    region: torch.Tensor | None = None


def label_dtype(channels: int) -> torch.dtype:
    """The smallest integer type that holds labels 0..channels (sigmoid labels are channel + 1)."""
    return torch.uint8 if channels < 256 else torch.int16


def block_decisions(block: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, K, *S) output → ((*S) labels as :attr:`Prediction.labels` defines them,
    (K, *S) bool per-channel decisions).

    The decisions are one block's: a segmenter's whole output is never turned into them at once."""
    channels = block.shape[1]
    if activation == "sigmoid":
        on = torch.sigmoid(block[0]) > 0.5
        number = torch.arange(1, channels + 1, device=block.device, dtype=torch.int32)
        number = number.view(-1, *[1] * (block.ndim - 2))
        return (on * number).amax(0), on
    labels = block[0].argmax(0)
    return labels, labels[None] == torch.arange(channels, device=block.device).view(-1, *[1] * (block.ndim - 2))


def predict(model: LoadedModel, x: torch.Tensor, channel: int | None = None, score: str = "logit",
            progress: Progress = NO_PROGRESS) -> Prediction:
    """Run the model once on ``x`` (1, C, X, Y, Z) and keep its decision (see :class:`Prediction`).

    Args:
        channel: a segmenter's channel whose score and predicted region are kept (the target's).
        score: ``"logit"`` or ``"probability"`` (the model's activation applied first).
        progress: receives (windows done, total) for sliding-window models; may raise ``Cancelled``.
    """
    if model.task == CLASSIFICATION:
        return Prediction(logits=model.infer(x))
    shape = tuple(x.shape[2:])
    channels = len(model.class_names)
    labels = torch.zeros(shape, dtype=label_dtype(channels), device=x.device)
    counts = torch.zeros(channels, dtype=torch.long, device=x.device)
    scores = torch.zeros(shape, device=x.device) if channel is not None else None
    region = torch.zeros(shape, dtype=torch.bool, device=x.device) if channel is not None else None
    for part, block in model.output_blocks(x, lambda done, total: progress(done, total, unit="windows")):
        block_labels, decisions = block_decisions(block, model.activation)
        labels[part] = block_labels.to(labels.dtype)
        counts += decisions.flatten(1).sum(1)
        if channel is not None:
            scores[part] = (model.probabilities(block) if score == "probability" else block)[0, channel]
            region[part] = decisions[channel]
    return Prediction(labels=labels, counts=counts.cpu(), channel=channel, scores=scores, region=region)
