"""One explanation run: input volumes + model + target + methods → maps on the input's exact grid."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from . import __version__, sliding
from .errors import InputError, ModelError
from .measure import measure
from .methods import Method, build_methods
from .methods.base import Attribution, Context, Segments
from .memory import out_of_memory_as_error
from .models.base import CLASSIFICATION, LoadedModel, ModelInput
from .prediction import Prediction, predict
from .progress import NO_PROGRESS, Progress
from .segments import make_segments, parse_segments, segments_on_input_grid
from .targets import Target, TargetSpec, resolve_target, target_channel, target_value
from .volumes import Volume, resample_additive, resample_array

log = logging.getLogger(__name__)


def count_non_finite(values: torch.Tensor) -> dict[str, int]:
    """How many values of ``values`` (any shape) are NaN, +inf and -inf."""
    return {
        "nan": int(torch.isnan(values).sum()),
        "posinf": int(torch.isposinf(values).sum()),
        "neginf": int(torch.isneginf(values).sum()),
    }


def non_finite_warning(label: str, counts: dict[str, int], total: int) -> str:
    """E.g. ``"LRP: 12 of 32768 map values were not finite (NaN 12, +inf 0, -inf 0); they are written as 0"``."""
    bad = sum(counts.values())
    return (f"{label}: {bad} of {total} map values were not finite (NaN {counts['nan']}, +inf {counts['posinf']}, "
            f"-inf {counts['neginf']}); they are written as 0")


@dataclass
class MethodResult:
    """One method's map and its record."""

    spec: str
    name: str
    label: str
    signed: bool
    volume: Volume  # on the first input volume's grid, float32
    model_grid_map: torch.Tensor  # (X, Y, Z) on the model grid, CPU
    parameters: dict
    seconds: float
    peak_memory_mb: float
    memory_kind: str
    passes: dict
    extras: dict = field(default_factory=dict)
    #: The segments a perturbation method kept or filled, on the same grid as ``volume``: labels 1..S
    #: (segment id + 1; 0 where the model grid does not reach), or None.
    segments: Volume | None = None
    #: The same segments on the model grid, as the method was given them, with their spec (None: no segments).
    model_grid_segments: Segments | None = None
    #: Values of the method's map on the model grid that were NaN, +inf or -inf; they are written as 0.
    non_finite: dict = field(default_factory=lambda: {"nan": 0, "posinf": 0, "neginf": 0})

    @property
    def segment_spec(self) -> str | None:
        """What made :attr:`segments` (e.g. ``"slic:256"``), or None."""
        return None if self.model_grid_segments is None else self.model_grid_segments.spec

    def warning(self) -> str | None:
        """One line for the user when the map had non-finite values or the method warned (e.g. LIME's low
        R²: ``extras["warning"]``), else None."""
        lines = [self.extras.get("warning")]
        if any(self.non_finite.values()):
            lines.append(non_finite_warning(self.label, self.non_finite, self.model_grid_map.numel()))
        return "; ".join(line for line in lines if line) or None

    def record(self) -> dict:
        values = self.volume.array
        return {
            "spec": self.spec,
            "method": self.name,
            "label": self.label,
            "signed": self.signed,
            "parameters": self.parameters,
            "runtime_s": round(self.seconds, 4),
            "peak_memory_mb": self.peak_memory_mb,
            "peak_memory_kind": self.memory_kind,
            "passes": self.passes,
            "value_range": [float(values.min()), float(values.max())],
            "non_finite": dict(self.non_finite),
            **({"extras": self.extras} if self.extras else {}),
            **({"segments": {"spec": self.segment_spec, "count": int(self.segments.array.max())}}
               if self.segments is not None else {}),
        }


@dataclass
class Explanation:
    """Everything one run produced, ready to write (see :mod:`xaioverlay.outputs`)."""

    model: dict
    inputs: list[Volume]
    model_grid: dict
    target: dict
    output: dict
    results: list[MethodResult]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    #: What the maps were computed from, kept for evaluating them (not written to explanation.json).
    model_input: ModelInput | None = field(default=None, repr=False)
    resolved_target: Target | None = field(default=None, repr=False)
    #: A segmenter's predicted label map on the model grid, (X, Y, Z) small integers (see
    #: :class:`~xaioverlay.prediction.Prediction`), from the same inference the target was resolved on.
    labels: torch.Tensor | None = field(default=None, repr=False)

    @property
    def anatomy(self) -> Volume:
        return self.inputs[0]

    def segmentation(self) -> Volume | None:
        """The model's predicted label map on the first input's exact grid (nearest neighbour), uint8;
        None for classifiers."""
        if self.labels is None or self.model_input is None:
            return None
        reference = self.model_input.reference
        array = resample_array(self.labels.cpu().numpy(), self.model_input.ijk_to_ras, reference.size,
                               reference.ijk_to_ras(), interpolation="nearest")
        return Volume(array.astype(np.uint8), reference, f"{self.anatomy.name} segmentation")

    def warnings(self) -> list[str]:
        """One line per method whose map had non-finite values or that warned (shown by the CLI and the Slicer
        module)."""
        return [line for line in (r.warning() for r in self.results) if line]

    def record(self) -> dict:
        """The content of ``explanation.json`` (file names are added by the writer)."""
        return {
            "xaioverlay_version": __version__,
            "created": self.created,
            "model": self.model,
            "inputs": [
                {
                    "name": v.name,
                    "size": list(v.geometry.size),
                    "spacing_mm": list(v.geometry.spacing),
                    "origin_lps_mm": list(v.geometry.origin),
                    "direction_lps": list(v.geometry.direction),
                }
                for v in self.inputs
            ],
            "model_grid": self.model_grid,
            "target": self.target,
            "output": self.output,
            "methods": [r.record() for r in self.results],
        }


def to_input_grid(values: torch.Tensor, model_input: ModelInput, *, additive: bool = False) -> tuple[Volume, dict]:
    """A map on the model grid → a float32 :class:`Volume` on the first input's exact grid, and how it got there.

    The model's preprocessing may have reoriented, resampled, cropped or padded the input; the model
    grid's affine records all of it, so resampling by physical position undoes it (zero outside the
    model's field of view). Intensities (CAMs, occlusion's mean drop) are interpolated trilinearly;
    additive maps (each voxel a share of the explained score) are split by overlap volume, so the sum
    over any region is the same on both grids (see :func:`~xaioverlay.volumes.resample_additive`).

    Returns:
        (volume, record): the record names the resampling and, for additive maps, the sums on both grids
        and what fell outside the input's grid.
    """
    array = values.detach().float().cpu().numpy()
    reference = model_input.reference
    if not additive:
        resampled = resample_array(
            array, model_input.ijk_to_ras, reference.size, reference.ijk_to_ras(), interpolation="linear"
        )
        return Volume(resampled.astype(np.float32, copy=False), reference, model_input.volumes[0].name), {
            "resampling": "trilinear"
        }
    resampled = resample_additive(array, model_input.ijk_to_ras, reference.size, reference.ijk_to_ras())
    model_sum, written_sum = float(array.sum(dtype=np.float64)), float(resampled.sum(dtype=np.float64))
    record = {
        "resampling": "overlap-volume (sum-preserving)",
        "sum_model_grid": model_sum,
        "sum_written": written_sum,
        "sum_outside_input_grid": model_sum - written_sum,
    }
    return Volume(resampled, reference, model_input.volumes[0].name), record


def summarise_output(model: LoadedModel, prediction: Prediction, model_input: ModelInput) -> dict:
    """The model's output and decision, as recorded with every explanation."""
    if model.task == CLASSIFICATION:
        logits = prediction.logits
        probabilities = model.probabilities(logits)[0]
        index = int(logits[0].argmax())
        return {
            "logits": [round(float(v), 6) for v in logits[0]],
            "probabilities": [round(float(v), 6) for v in probabilities] if model.activation != "none" else None,
            "predicted_index": index,
            "predicted": model.class_names[index],
        }
    voxel_ml = abs(np.linalg.det(model_input.ijk_to_ras[:3, :3])) / 1000.0
    counts = prediction.counts.tolist()
    return {
        "predicted_voxels": {name: int(n) for name, n in zip(model.class_names, counts)},
        "predicted_volume_ml": {name: round(n * voxel_ml, 3) for name, n in zip(model.class_names, counts)},
    }


def attribute_by_window(
    method: Method, model: LoadedModel, x: torch.Tensor, target: Target, progress: Progress, context: Context
) -> Attribution:
    """Run ``method`` window by window (see :mod:`xaioverlay.sliding`) and sum the window maps.

    Windows whose share of the target region is zero are skipped.
    """
    window = model.sliding_window
    shares = sliding.region_shares(window, target.weights)
    padded = sliding.pad(x, shares.pads)
    result = torch.zeros(padded.shape[2:], device=x.device)
    parameters: dict = {}
    extras: list[dict] = []
    whole_volume = method.begin_windows(x, shares.pads)
    for done, part in enumerate(shares.active, start=1):
        window_context = replace(context, window=part, whole_volume=whole_volume)
        window_target = target.restricted(shares.weights(part))
        attribution = method.attribute(model, padded[(slice(None), slice(None), *part)], window_target, NO_PROGRESS,
                                       window_context)
        result[part] += attribution.map
        parameters = attribution.parameters
        extras.append(attribution.extras)
        progress(done, len(shares.active), unit="windows")
    parameters = {**parameters, "windows": {"used": len(shares.active), "total": len(shares.windows),
                                            "roi_size": list(window.roi_size)}}
    return Attribution(sliding.unpad(result, shares.pads), method.signed, parameters, method.combine_extras(extras))


def attribute(method: Method, model: LoadedModel, model_input: ModelInput, target: Target,
              progress: Progress = NO_PROGRESS, segments: Segments | None = None) -> Attribution:
    """``method``'s map on the model grid, window by window when the model's inferer asks for it; ``segments``:
    those :func:`choose_segments` gave the method."""
    reason = method.unavailable(model)
    if reason:
        raise ModelError(reason)
    x = model_input.tensor
    windowed = model.sliding_window is not None and model.sliding_window.needed(x.shape[2:])
    context = Context(spacing_mm=tuple(float(s) for s in model_input.model_geometry.spacing), segments=segments)
    # automatic choices are made on what the network will see: the whole input, or one window
    method.prepare(model, x.new_zeros((*x.shape[:2], *model.sliding_window.roi_size)) if windowed else x)
    if windowed and method.by_window and target.weights is not None:
        if not target.splits_over_windows:
            raise InputError(
                f"{method.label} explains a sliding-window model window by window, which needs a score that adds up "
                "over windows; a probability of the blended output does not: use --score logit (occlusion takes either)"
            )
        return attribute_by_window(method, model, x, target, progress, context)
    return method.attribute(model, x, target, progress, context)


def explain(
    model: LoadedModel,
    volumes: Sequence[Volume],
    methods: str | Sequence[str] | Sequence[Method],
    target: str | TargetSpec | None = None,
    *,
    score: str = "logit",
    layer: str | None = None,
    segments: str | None = None,
    progress: Progress = NO_PROGRESS,
) -> Explanation:
    """Explain ``model``'s output for ``volumes`` with each of ``methods``.

    Args:
        volumes: co-registered input volumes, one per model input channel, in channel order.
        methods: method specs (``"gradcam,hirescam"`` or a list) or built methods.
        target: target spec (see :mod:`xaioverlay.targets`); None → the default target.
        score: ``"logit"`` or ``"probability"``.
        layer: default layer for CAM methods (None → automatic).
        segments: segment spec for perturbation methods (see :mod:`xaioverlay.segments`); None → each
            method's default (occlusion: its boxes).
        progress: receives progress events; may raise ``Cancelled``.

    Returns:
        An :class:`Explanation`; every map lies on ``volumes[0]``'s exact grid.
    """
    if isinstance(methods, str) or (methods and isinstance(methods[0], str)):
        methods = build_methods(methods, layer=layer)
    with out_of_memory_as_error(model.device, "explaining this volume"):
        return _explain(model, volumes, methods, target, score, segments, progress)


def choose_segments(methods: Sequence[Method], spec: str | None, model_input: ModelInput) -> list[Segments | None]:
    """Each method's segments (from ``spec`` or the method's default; None for methods without segments; one
    segmentation per distinct spec); bad specs and files are refused here, before any model work."""
    made: dict[str, Segments] = {}
    given = parse_segments(spec).text() if spec else None
    chosen = []
    for method in methods:
        text = (given or method.default_segments) if method.uses_segments else None
        if text and text not in made:
            made[text] = Segments(make_segments(parse_segments(text), model_input), text)
        chosen.append(made[text] if text else None)
    return chosen


def _explain(model: LoadedModel, volumes: Sequence[Volume], methods: Sequence[Method], target: str | TargetSpec | None,
             score: str, segments: str | None, progress: Progress) -> Explanation:
    progress.message("preprocessing", stage="preprocess")
    model_input = model.preprocess(volumes)
    chosen_segments = choose_segments(methods, segments, model_input)
    progress.message("inference", stage="inference")
    channel = target_channel(target, model)
    prediction = predict(model, model_input.tensor, channel, score, progress.child(stage="inference"))
    resolved = resolve_target(target, model, model_input, prediction, score)
    value = target_value(resolved, prediction)
    output = summarise_output(model, prediction, model_input)
    labels = prediction.labels
    del prediction  # the channel's scores and region are not needed beyond here
    results = []
    for number, (method, method_segments) in enumerate(zip(methods, chosen_segments), start=1):
        progress.message(f"{method.label} ({number}/{len(methods)})", stage="method", method=method.spec)
        model.passes.reset()
        with measure(model.device) as cost:
            attribution = attribute(method, model, model_input, resolved, progress.child(method=method.spec),
                                    method_segments)
        values = attribution.map.detach()
        non_finite = count_non_finite(values)
        if any(non_finite.values()):
            log.info("%s", non_finite_warning(method.label, non_finite, values.numel()))
            values = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        volume, grid_record = to_input_grid(values, model_input, additive=method.additive)
        results.append(
            MethodResult(
                spec=method.spec, name=method.name, label=method.label, signed=attribution.signed,
                volume=volume, model_grid_map=values.cpu(),
                parameters=attribution.parameters, seconds=cost.seconds, peak_memory_mb=cost.peak_memory_mb,
                memory_kind=cost.memory_kind, passes=model.passes.as_dict(),
                extras={**attribution.extras, "input_grid": grid_record}, non_finite=non_finite,
                segments=None if method_segments is None else Volume(
                    segments_on_input_grid(method_segments.ids, model_input), model_input.reference,
                    f"{volumes[0].name} segments"),
                model_grid_segments=method_segments,
            )
        )
        log.info("%s: %.2f s, %s", method.label, cost.seconds, model.passes.as_dict())
    model_geometry = model_input.model_geometry
    return Explanation(
        model=model.describe(),
        inputs=list(volumes),
        model_grid={
            "size": list(model_input.spatial_shape),
            "spacing_mm": [round(s, 6) for s in model_geometry.spacing],
            "ijk_to_ras": np.round(model_input.ijk_to_ras, 6).tolist(),
        },
        target={**resolved.describe(), "value": value},
        output=output,
        results=results,
        model_input=model_input,
        resolved_target=resolved,
        labels=labels,
    )
