"""Explain and measure in one run: every metric for every method's map, on the model grid.

Maps are measured where the model made them: perturbations change the model input
(:attr:`ModelInput.tensor`), and masks are resampled (nearest neighbour) onto the model grid, whose
voxel → RAS affine gives the millimetres of the pointing game's tolerance.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError
from ..explain import Explanation, attribute, explain
from ..measure import measure
from ..methods import Method, build_methods
from ..methods.base import Segments
from ..models.base import CLASSIFICATION, LoadedModel, ModelInput
from ..progress import NO_PROGRESS, Progress
from ..targets import Target, TargetSpec, mask_on_model_grid
from ..volumes import Volume
from . import complexity, localisation
from .agreement import agreement_matrix
from .faithfulness import BASELINES, Curve, deletion_insertion
from .road import RoadCurve, road_curves
from .sanity import RANDOMISATION_THRESHOLD, RandomisationResult, RandomLogitResult, cascading_randomisation, random_logit

log = logging.getLogger(__name__)


@dataclass
class MetricOptions:
    """Settings of an evaluation (all recorded in ``metrics.json``).

    Attributes:
        step_fraction: share of voxels (or blocks) perturbed per deletion/insertion step.
        block: edge, in voxels, of the cubes perturbed together (None: single voxels).
        baselines: deletion/insertion baselines among ``zero``, ``mean``, ``blur``.
        blur_sigma_mm: Gaussian width of the ``blur`` baseline.
        tolerance_mm: pointing-game tolerance.
        randomisation_depth: blocks randomised top-down (None: all; 0: skip the check).
        min_blocks: split the network into at least this many blocks (see :mod:`.sanity`).
        randomisation_threshold: pass when the final Spearman correlation is below it.
        random_logit: run the random-logit check on classifiers.
        road: run 3D ROAD (MoRF and LeRF with noisy linear imputation, see :mod:`.road`).
        batch_size: perturbed inputs per forward pass.
        seed: tie order, block randomisation and random class.
    """

    step_fraction: float = 0.01
    block: int | None = None
    baselines: tuple[str, ...] = ("blur",)
    blur_sigma_mm: float = 10.0
    tolerance_mm: float = 5.0
    randomisation_depth: int | None = None
    min_blocks: int = 6
    randomisation_threshold: float = RANDOMISATION_THRESHOLD
    random_logit: bool = True
    road: bool = True
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.blur_sigma_mm > 0:
            raise InputError(f"the blur baseline's width must be positive (got {self.blur_sigma_mm} mm); e.g. --blur-sigma-mm 10")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown or not self.baselines:
            raise InputError(f"unknown baseline(s) {', '.join(unknown) or '(none)'}; use one or more of {', '.join(BASELINES)}")
        if not 0 < self.step_fraction <= 0.5:
            raise InputError(f"step fraction {self.step_fraction} must lie in (0, 0.5]; 0.01 means 1 % of the voxels per step")
        if self.block is not None and self.block < 1:
            raise InputError(f"block size {self.block} must be at least 1 voxel")
        if self.tolerance_mm < 0:
            raise InputError(f"pointing-game tolerance {self.tolerance_mm} mm must be ≥ 0")
        if self.batch_size < 1:
            raise InputError("batch size must be at least 1")


@dataclass
class MethodMetrics:
    """Every measurement of one method's map."""

    spec: str
    label: str
    signed: bool
    cost: dict
    curves: dict[str, dict[str, Curve]]  # baseline → kind → curve
    localisation: dict | None
    complexity: dict
    randomisation: RandomisationResult | None
    random_logit: RandomLogitResult | None
    metric_cost: dict = field(default_factory=dict)
    road: dict[str, RoadCurve] | None = None

    def row(self) -> dict:
        """One flat table row (see :data:`COLUMNS`)."""
        row: dict = {"method": self.spec}
        for baseline, curves in self.curves.items():
            for kind, curve in curves.items():
                row[f"{kind}_auc_{baseline}"] = curve.normalised_auc
        for order, curve in (self.road or {}).items():
            row[f"road_{order}"] = curve.mean_normalised
        for key, value in (self.localisation or {}).items():
            if key in LOCALISATION_KEYS:
                row[key] = value
        row.update(self.complexity)
        if self.randomisation is not None and self.randomisation.correlations:
            row["randomisation_spearman"] = self.randomisation.final
            row["randomisation_verdict"] = "pass" if self.randomisation.passed else "fail"
        if self.random_logit is not None:
            row["random_logit_spearman"] = self.random_logit.spearman
        row["runtime_s"] = self.cost["runtime_s"]
        row["forward_passes"] = self.cost["passes"]["forward"]
        row["backward_passes"] = self.cost["passes"]["backward"]
        row["peak_memory_mb"] = self.cost["peak_memory_mb"]
        return row

    def record(self) -> dict:
        return {
            "spec": self.spec, "label": self.label, "signed": self.signed, "cost": self.cost,
            "faithfulness": {b: {k: c.record() for k, c in curves.items()} for b, curves in self.curves.items()},
            "road": None if self.road is None else {order: c.record() for order, c in self.road.items()},
            "localisation": self.localisation,
            "complexity": self.complexity,
            "randomisation": None if self.randomisation is None else self.randomisation.record(),
            "random_logit": None if self.random_logit is None else self.random_logit.record(),
            "metric_cost": self.metric_cost,
        }


LOCALISATION_KEYS = ("pointing_game", "pointing_game_size_weighted", "relevance_mass", "relevance_rank")


@dataclass(frozen=True)
class Column:
    """A table column: ``direction`` +1 higher is better, −1 lower is better, 0 not ranked."""

    key: str
    title: str
    direction: int
    digits: int = 3


def columns(rows: Sequence[dict]) -> list[Column]:
    """The table's columns, in order, for the keys present in ``rows``."""
    keys = {key for row in rows for key in row}
    listed: list[Column] = [Column("method", "method", 0)]
    for baseline in BASELINES:
        listed += [Column(f"deletion_auc_{baseline}", f"deletion AUC ({baseline})", -1),
                   Column(f"insertion_auc_{baseline}", f"insertion AUC ({baseline})", +1)]
    listed += [
        Column("road_morf", "ROAD MoRF", -1),
        Column("road_lerf", "ROAD LeRF", +1),
        Column("pointing_game", "pointing game", +1, 2),
        Column("pointing_game_size_weighted", "pointing game, size-weighted", +1),
        Column("relevance_mass", "relevance mass", +1),
        Column("relevance_rank", "relevance rank", +1),
        Column("sparseness", "Gini sparseness", +1),
        Column("entropy", "normalised entropy", -1),
        Column("randomisation_spearman", "randomisation Spearman", -1),
        Column("randomisation_verdict", "randomisation verdict", 0),
        Column("random_logit_spearman", "random-logit Spearman", -1),
        Column("runtime_s", "runtime (s)", -1, 2),
        Column("forward_passes", "forward passes", -1, 0),
        Column("backward_passes", "backward passes", -1, 0),
        Column("peak_memory_mb", "peak memory (MB)", -1, 1),
    ]
    return [column for column in listed if column.key in keys]


def best_rows(rows: Sequence[dict], column: Column) -> set[int]:
    """Indices of the rows holding the best value of ``column`` (ties all marked; none when all are equal; NaN never)."""
    if column.direction == 0:
        return set()
    values = [row.get(column.key) for row in rows]
    finite = [(i, v) for i, v in enumerate(values) if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(finite) < 2:
        return set()
    best = max(v * column.direction for _, v in finite)
    if all(v * column.direction == best for _, v in finite):
        return set()
    return {i for i, v in finite if v * column.direction == best}


@dataclass
class Evaluation:
    """An explanation with its metrics."""

    explanation: Explanation
    methods: list[MethodMetrics]
    agreement: dict
    options: MetricOptions
    reference: dict | None
    region: dict | None

    def rows(self) -> list[dict]:
        return [m.row() for m in self.methods]

    def record(self) -> dict:
        explanation = self.explanation.record()
        return {
            "xaioverlay_version": explanation["xaioverlay_version"],
            "created": explanation["created"],
            "model": explanation["model"],
            "target": explanation["target"],
            "output": explanation["output"],
            "model_grid": explanation["model_grid"],
            "options": dataclasses.asdict(self.options),
            "reference_mask": self.reference,
            "comparison_region": self.region,
            "methods": [m.record() for m in self.methods],
            "agreement": self.agreement,
        }


def method_explainer(method: Method, model_input: ModelInput, segments: Segments | None = None):
    """(model, target) → the method's (X, Y, Z) map for ``model_input`` (with the ``segments`` it was given), as
    :func:`explain` makes it."""

    def run(model: LoadedModel, target: Target) -> torch.Tensor:
        values = attribute(method, model, model_input, target, segments=segments).map.detach()
        return torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0).float()

    return run


def localisation_scores(relevance: torch.Tensor, mask: torch.Tensor, region: torch.Tensor) -> dict:
    """The four localisation scores of one (X, Y, Z) map against a mask and its tolerance region."""
    batch = relevance[None]
    return {
        "pointing_game": float(localisation.pointing_game(batch, region)[0]),
        "pointing_game_size_weighted": float(localisation.size_weighted_pointing_game(batch, region)[0]),
        "relevance_mass": float(localisation.relevance_mass_accuracy(batch, mask)[0]),
        "relevance_rank": float(localisation.relevance_rank_accuracy(batch, mask)[0]),
    }


def _passes_since(model: LoadedModel, before: dict) -> dict:
    now = model.passes.as_dict()
    return {key: now[key] - before[key] for key in now}


def evaluate(
    model: LoadedModel,
    volumes: Sequence[Volume],
    methods: str | Sequence[str],
    target: str | TargetSpec | None = None,
    *,
    score: str = "logit",
    layer: str | None = None,
    segments: str | None = None,
    reference_mask: Volume | None = None,
    reference_from_model: bool = False,
    body_mask: Volume | None = None,
    options: MetricOptions | None = None,
    progress: Progress = NO_PROGRESS,
) -> Evaluation:
    """Explain ``volumes`` with each of ``methods`` (see :func:`~xaioverlay.explain.explain`) and measure every map.

    Args:
        segments: segment spec for perturbation methods (see :mod:`xaioverlay.segments`).
        reference_mask: ground truth (or the model's own segmentation) for the localisation metrics;
            None skips them.
        reference_from_model: without ``reference_mask``, measure localisation against a segmenter's own
            predicted segmentation (from the explanation's inference; skipped when it is empty).
        body_mask: region (body, brain) inside which maps are compared (agreement, randomisation);
            None compares whole volumes.
        options: metric settings (:class:`MetricOptions`).
    """
    options = options or MetricOptions()
    built = build_methods(methods, layer=layer) if isinstance(methods, str) or (methods and isinstance(methods[0], str)) else list(methods)
    for given, what in ((reference_mask, "reference mask"), (body_mask, "body mask")):  # before minutes of explaining
        if given is not None and not (np.asarray(given.array) > 0).any():
            raise InputError(f"{what} {given.name or ''} is empty; give a mask with voxels > 0")
    explanation = explain(model, volumes, built, target, score=score, layer=layer, segments=segments,
                          progress=progress)
    own = explanation.segmentation() if reference_from_model and reference_mask is None else None
    if own is not None and (own.array > 0).any():
        reference_mask = Volume((own.array > 0).astype(np.uint8), own.geometry, "model segmentation")
    model_input, resolved = explanation.model_input, explanation.resolved_target
    x = model_input.tensor
    device = x.device
    spacing = model_input.model_geometry.spacing
    sigma = tuple(options.blur_sigma_mm / s for s in spacing)

    reference = mask = region = None
    if reference_mask is not None:
        mask = mask_on_model_grid(reference_mask, model_input, f"reference mask {reference_mask.name or ''}".strip(), InputError)
        distance = localisation.distance_to_mask_mm(mask.numpy(), spacing)
        region = torch.as_tensor(distance <= options.tolerance_mm + 1e-4)
        reference = {
            "name": reference_mask.name, "voxels": int(mask.sum()), "grid_voxels": int(mask.numel()),
            "tolerance_mm": options.tolerance_mm, "chance": localisation.chance_levels(mask, region),
        }
        mask, region = mask.to(device), region.to(device)
    body = None
    region_record = None
    if body_mask is not None:
        body = mask_on_model_grid(body_mask, model_input, f"body mask {body_mask.name or ''}".strip(), InputError).to(device)
        region_record = {"name": body_mask.name, "voxels": int(body.sum())}

    measured: list[MethodMetrics] = []
    for number, (method, result) in enumerate(zip(built, explanation.results), start=1):
        stage = progress.child(method=method.spec)
        progress.message(f"measuring {result.label} ({number}/{len(built)})", stage="metrics", method=method.spec)
        relevance = result.model_grid_map.to(device).float()
        metric_cost: dict = {}

        curves: dict[str, dict[str, Curve]] = {}
        before = model.passes.as_dict()
        with measure(device) as cost:
            for baseline in options.baselines:
                curves[baseline] = deletion_insertion(
                    model, x, relevance, resolved, baseline=baseline, step_fraction=options.step_fraction,
                    block=None if options.block is None else (options.block,) * 3, blur_sigma_voxels=sigma,
                    batch_size=options.batch_size, seed=options.seed, progress=stage.child(stage="faithfulness"),
                )
        metric_cost["faithfulness"] = {"runtime_s": round(cost.seconds, 4), "passes": _passes_since(model, before)}
        road = None
        if options.road:
            before = model.passes.as_dict()
            with measure(device) as cost:
                road = road_curves(model, x, relevance, resolved, blur_sigma_voxels=sigma, batch_size=options.batch_size,
                                   seed=options.seed, progress=stage.child(stage="road"))
            metric_cost["road"] = {"runtime_s": round(cost.seconds, 4), "passes": _passes_since(model, before)}

        located = None
        if mask is not None:
            located = localisation_scores(relevance, mask, region)
            located["chance"] = reference["chance"]
            located["tolerance_mm"] = options.tolerance_mm

        batch = relevance[None]
        sparse = {
            "sparseness": float(complexity.gini_sparseness(batch)[0]),
            "entropy": float(complexity.normalised_entropy(batch)[0]),
        }

        explainer = method_explainer(method, model_input, result.model_grid_segments)
        randomised = None
        if options.randomisation_depth != 0:
            randomised = cascading_randomisation(
                model, x, resolved, relevance, explainer, depth=options.randomisation_depth,
                min_blocks=options.min_blocks, threshold=options.randomisation_threshold, mask=body,
                seed=options.seed, progress=stage.child(stage="randomisation"),
            )
            metric_cost["randomisation"] = {"runtime_s": round(randomised.seconds, 4), "passes": randomised.passes}
        logit = None
        if options.random_logit and model.task == CLASSIFICATION and len(model.class_names) > 1:
            before = model.passes.as_dict()
            with measure(device) as cost:
                logit = random_logit(model, resolved, relevance, explainer, mask=body, seed=options.seed)
            metric_cost["random_logit"] = {"runtime_s": round(cost.seconds, 4), "passes": _passes_since(model, before)}

        record = result.record()
        measured.append(MethodMetrics(
            spec=result.spec, label=result.label, signed=result.signed,
            cost={key: record[key] for key in ("runtime_s", "passes", "peak_memory_mb", "peak_memory_kind")},
            curves=curves, localisation=located, complexity=sparse, randomisation=randomised, random_logit=logit,
            metric_cost=metric_cost, road=road,
        ))
        log.info("%s measured: %s", result.label, metric_cost)

    names, matrix = agreement_matrix({r.spec: r.model_grid_map.to(device) for r in explanation.results}, body)
    agreement = {"methods": names, "spearman": np.round(matrix.cpu().numpy(), 6).tolist(),
                 "region": "body mask" if body is not None else "whole volume"}
    return Evaluation(explanation, measured, agreement, options, reference, region_record)
