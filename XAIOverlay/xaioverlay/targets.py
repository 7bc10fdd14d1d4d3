"""What is explained: a scalar per input, computed from the network's output.

Syntax (CLI ``--target``, Slicer target panel)::

    class:C                                  classifier class C (index or name)
    channel:C                                segmentation channel C over the model's own predicted region
    channel:C@mask:FILE                      ... over a label/mask volume (any grid; voxels > 0)
    channel:C@box:R1,A1,S1,R2,A2,S2          ... over a box given by two corners in RAS mm
    channel:C@point:R,A,S[,RADIUS_MM]        ... over a ball (radius 0 → the voxel holding the point)

The score is the logit by default; ``score="probability"`` applies the model's output activation first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, TargetError, XAIOverlayError
from .models.base import CLASSIFICATION, LoadedModel, ModelInput
from .prediction import Prediction
from .volumes import Volume, read_volume, resample_array

SCORES = ("logit", "probability")


@dataclass(frozen=True)
class TargetSpec:
    """A parsed, not yet resolved, target: ``kind`` is "class" or "channel"; ``region`` as written."""

    kind: str
    key: str
    region: str = ""  # "", "mask", "box" or "point"
    mask_path: str = ""
    numbers: tuple[float, ...] = ()
    text: str = ""


_TARGET = re.compile(r"^(class|channel):([^@]+?)(?:@(mask|box|point):(.+))?$")


def parse_target(text: str) -> TargetSpec:
    """Parse the target syntax above; raises :class:`TargetError` naming the expected form."""
    match = _TARGET.match(text.strip())
    if not match:
        raise TargetError(
            f"cannot read target {text!r}; use class:C, channel:C, channel:C@mask:FILE, "
            "channel:C@box:R1,A1,S1,R2,A2,S2 or channel:C@point:R,A,S[,RADIUS_MM]"
        )
    kind, key, region, argument = match.groups()
    if region is None:
        return TargetSpec(kind, key.strip(), text=text)
    if region == "mask":
        return TargetSpec(kind, key.strip(), "mask", mask_path=argument.strip(), text=text)
    try:
        numbers = tuple(float(v) for v in argument.split(","))
    except ValueError:
        raise TargetError(f"target {text!r}: {region} coordinates must be numbers (RAS mm) separated by commas") from None
    if region == "box" and len(numbers) != 6:
        raise TargetError(f"target {text!r}: a box needs 6 numbers R1,A1,S1,R2,A2,S2 (two opposite corners, RAS mm)")
    if region == "point" and len(numbers) not in (3, 4):
        raise TargetError(f"target {text!r}: a point needs R,A,S and optionally a radius in mm")
    if region == "point" and len(numbers) == 4 and numbers[3] < 0:
        raise TargetError(f"target {text!r}: the radius must be ≥ 0 mm")
    return TargetSpec(kind, key.strip(), region, numbers=numbers, text=text)


@dataclass
class Target:
    """A scalar to explain, as a callable on the network's output.

    Attributes:
        index: output channel (class) explained.
        name: its class name.
        score: ``"logit"`` or ``"probability"``.
        weights: None for classifiers; for segmenters a (X, Y, Z) tensor on the model grid: the score is
            Σ weights · output[:, index] (a 0/1 region mask, or blending weights for one window).
    """

    index: int
    name: str
    score: str = "logit"
    activation: str = "none"
    weights: torch.Tensor | None = None
    region: dict = field(default_factory=dict)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """(B, K) or (B, K, X, Y, Z) network output → (B,) scores."""
        if self.score == "probability":
            output = _activate(output, self.activation)
        channel = output[:, self.index]
        if self.weights is None:
            if channel.ndim != 1:
                raise TargetError("this target needs a region: the model's output is spatial (segmentation)")
            return channel
        return (channel * self.weights).flatten(1).sum(1)

    @property
    def splits_over_windows(self) -> bool:
        """True when the score is a sum of per-window shares of sliding-window inference: a region
        target that is linear in the blended output. A probability is an activation of the blended
        logits, not a blend of per-window probabilities, so it does not split."""
        return self.weights is not None and (self.score == "logit" or self.activation == "none")

    def restricted(self, weights: torch.Tensor) -> "Target":
        """The same target with other region weights (one sliding window's share)."""
        return Target(self.index, self.name, self.score, self.activation, weights, self.region)

    def describe(self) -> dict:
        info = {"index": self.index, "name": self.name, "score": self.score}
        info.update(self.region)
        return info


def _activate(output: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(output, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(output)
    return output


def default_target(model: LoadedModel, prediction: Prediction | None = None) -> TargetSpec:
    """Classifier: the predicted class. Segmenter: the first foreground channel over its predicted region."""
    if model.task == CLASSIFICATION:
        index = int(prediction.logits[0].argmax())
        return TargetSpec("class", str(index), text=f"class:{index}")
    first = 1 if len(model.class_names) > 1 and model.activation != "sigmoid" else 0
    return TargetSpec("channel", str(first), text=f"channel:{first}")


def target_channel(spec: TargetSpec | str | None, model: LoadedModel) -> int | None:
    """The output channel a segmenter's target explains, known before the model runs (None for classifiers),
    so that :func:`xaioverlay.prediction.predict` keeps that channel and no other."""
    if model.task == CLASSIFICATION:
        return None
    spec = default_target(model) if spec is None else parse_target(spec) if isinstance(spec, str) else spec
    return model.class_index(spec.key)


def target_value(target: "Target", prediction: Prediction) -> float:
    """The explained score of the model's own output: Σ weights · score of the target channel, or the class score."""
    if prediction.logits is not None:
        return float(target(prediction.logits)[0])
    if prediction.channel != target.index:
        raise ValueError(f"the prediction kept channel {prediction.channel}, the target explains {target.index}")
    return float((prediction.scores * target.weights).sum())


def voxel_ras(ijk_to_ras: np.ndarray, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """RAS mm of every voxel centre of a grid: (X, Y, Z, 3) float32 on ``device``."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in shape]
    ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    affine = torch.as_tensor(ijk_to_ras, dtype=torch.float32, device=device)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _extent_text(ijk_to_ras: np.ndarray, shape: tuple[int, int, int]) -> str:
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float)
    ras = (ijk_to_ras @ np.c_[corners, np.ones(8)].T).T[:, :3]
    low, high = ras.min(0), ras.max(0)
    return ", ".join(f"{axis} {a:.0f}..{b:.0f}" for axis, a, b in zip("RAS", low, high))


def mask_on_model_grid(volume: Volume, model_input: ModelInput, what: str, error: type[XAIOverlayError] = TargetError) -> torch.Tensor:
    """A mask volume (voxels > 0, any grid) → (X, Y, Z) bool on the model grid (nearest neighbour);
    an empty one, or one outside the model's field of view, raises ``error`` naming ``what``."""
    resampled = resample_array((np.asarray(volume.array) > 0).astype(np.uint8), volume.geometry.ijk_to_ras(),
                               model_input.spatial_shape, model_input.ijk_to_ras, interpolation="nearest")
    mask = torch.as_tensor(resampled > 0)
    if not mask.any():
        empty = not (np.asarray(volume.array) > 0).any()
        raise error(
            f"{what} is empty; give a mask with voxels > 0" if empty else
            f"{what} lies outside the model's field of view; give a mask co-registered with the input"
        )
    return mask


def region_mask(spec: TargetSpec, model: LoadedModel, model_input: ModelInput, prediction: Prediction,
                index: int) -> tuple[torch.Tensor, dict]:
    """The target region on the model grid: (X, Y, Z) bool tensor, plus a description."""
    shape = model_input.spatial_shape
    affine = model_input.ijk_to_ras
    device = model_input.tensor.device
    if spec.region == "":
        if prediction.channel != index:
            raise ValueError(f"the prediction kept channel {prediction.channel}, "
                             f"the target's region is channel {index}'s")
        mask = prediction.region
        if not mask.any():
            raise TargetError(
                f"the model predicts no '{model.class_names[index]}' voxel in this volume, so its predicted region is "
                "empty; pick a region with @mask:FILE, @box:... or @point:..."
            )
        return mask, {"region": "predicted"}
    if spec.region == "mask":
        path = Path(spec.mask_path)
        mask = mask_on_model_grid(read_volume(path), model_input, f"target mask {path}").to(device)
        return mask, {"region": "mask", "mask": str(path)}
    ras = voxel_ras(affine, shape, device)
    if spec.region == "box":
        corners = torch.tensor(spec.numbers, dtype=torch.float32, device=device).view(2, 3)
        low, high = corners.min(0).values, corners.max(0).values
        mask = ((ras >= low) & (ras <= high)).all(-1)
        if not mask.any():
            raise TargetError(
                f"box {spec.numbers} (RAS mm) holds no voxel centre of the volume ({_extent_text(affine, shape)}); "
                "check the corners (RAS, as Slicer shows them)"
            )
        return mask, {"region": "box", "box_ras_mm": list(spec.numbers)}
    point = torch.tensor(spec.numbers[:3], dtype=torch.float32, device=device)
    radius = spec.numbers[3] if len(spec.numbers) == 4 else 0.0
    distance = (ras - point).norm(dim=-1)
    mask = distance <= radius
    if not mask.any():
        index_of_point = np.linalg.inv(affine) @ np.r_[spec.numbers[:3], 1.0]
        if np.any(index_of_point[:3] < -0.5) or np.any(index_of_point[:3] > np.array(shape) - 0.5):
            raise TargetError(
                f"point {spec.numbers[:3]} (RAS mm) lies outside the volume ({_extent_text(affine, shape)}); "
                "give a point inside it"
            )
        mask = distance == distance.min()
    return mask, {"region": "point", "point_ras_mm": list(spec.numbers[:3]), "radius_mm": radius}


def resolve_target(
    spec: TargetSpec | str | None,
    model: LoadedModel,
    model_input: ModelInput,
    prediction: Prediction,
    score: str = "logit",
) -> Target:
    """Turn a target spec into a :class:`Target` for this model and input.

    Args:
        spec: parsed or textual target; None for the default (see :func:`default_target`).
        prediction: the model's decision for ``model_input`` (:func:`xaioverlay.prediction.predict`,
            keeping the channel :func:`target_channel` names).
        score: ``"logit"`` or ``"probability"``.
    """
    if score not in SCORES:
        raise TargetError(f"unknown score {score!r}; use logit or probability")
    if spec is None:
        spec = default_target(model, prediction)
    elif isinstance(spec, str):
        spec = parse_target(spec)
    index = model.class_index(spec.key)
    name = model.class_names[index]
    if model.task == CLASSIFICATION:
        if spec.region:
            raise TargetError(f"target {spec.text!r}: a classifier has no spatial output to restrict; use class:{spec.key}")
        return Target(index, name, score, model.activation, None, {"kind": "class", "spec": spec.text})
    mask, description = region_mask(spec, model, model_input, prediction, index)
    voxels = int(mask.sum())
    voxel_ml = abs(np.linalg.det(model_input.ijk_to_ras[:3, :3])) / 1000.0
    description.update({"kind": "channel", "spec": spec.text, "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 3)})
    return Target(index, name, score, model.activation, mask.float(), description)


def check_score(text: str) -> str:
    if text not in SCORES:
        raise InputError(f"unknown --score {text!r}; use logit or probability")
    return text
