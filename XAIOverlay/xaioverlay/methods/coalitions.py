"""Segment methods: Shapley values and LIME over segments, on the masked scorer.

Specs: ``shap[:N]`` (N permutations, antithetic pairs), ``kernelshap[:N]`` (N coalitions), ``lime[:N]``
(N coalitions), ``shap-guided[:N]`` (N permutations, the passes of ``shap:N``); each may add ``:FILL`` (``zero``,
``mean`` or ``blur``: what replaces a left-out segment) and, last, its own default segments
(``shap:4:cubes:32``). The engine makes the segments (``--segments``, see :mod:`xaioverlay.segments`; else
the method's default, else :data:`DEFAULT_SEGMENTS`) and passes them in the context
(:attr:`.base.Context.segments`).

The map: a segment's value spread evenly over its voxels (value / voxel count), so the map is additive —
its sum over a segment is the segment's Shapley value (or LIME coefficient) on every grid, and the sum
over the volume is ``f(x) − f(baseline)`` for the Shapley methods. The estimators are in
:mod:`.shapley`; standard errors (LIME: R²) go to ``explanation.json``.
"""

from __future__ import annotations

import math
import time
from typing import ClassVar

import torch

from ..errors import InputError
from ..models.base import LoadedModel
from ..progress import NO_PROGRESS, Progress
from ..targets import Target
from . import shapley
from .base import NO_CONTEXT, Attribution, Context, Method
from .gradients import gradient_times_input
from .precision import full_float32

#: Segments when neither the spec nor ``--segments`` gives them: cubes of 24 voxels (64 on a 96³ grid: a
#: default ``shap`` then needs 254 coalitions).
DEFAULT_SEGMENTS = "cubes:24"
FILLS = ("zero", "mean", "blur")
#: σ of the ``blur`` fill, in voxels of the model grid.
BLUR_SIGMA_VOXELS = 4.0
#: Fixed seed: the same input gives the same map (recorded in the parameters).
SEED = 0
#: Coalitions timed before a run to estimate its duration.
PROBE_ROWS = 4


def segment_sums(values: torch.Tensor, segments: torch.Tensor, count: int) -> torch.Tensor:
    """Sum of ``values`` (X, Y, Z) over each segment of ``segments`` (X, Y, Z) ids 0..S-1: (S,) float64."""
    return torch.zeros(count, dtype=torch.float64, device=values.device).index_add_(
        0, segments.reshape(-1), values.reshape(-1).double())


def paint_segments(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Each voxel's share of its segment's value (S,): value / segment voxel count, (X, Y, Z) float32.
    The map's sum over a segment is the segment's value (an additive map)."""
    ids = segments.reshape(-1)
    sizes = torch.bincount(ids, minlength=len(values)).clamp_min(1)
    density = values.to(segments.device, torch.float64) / sizes
    return density[ids].view(segments.shape).float()


def parse_coalition_option(option: str | None, name: str, example: int) -> tuple[int | None, str, str | None]:
    """``[N][:FILL][:SEGMENTS]`` → (sample count or None, fill, segment spec or None).

    N and FILL in either order; SEGMENTS (``cubes:32``, ``slic:64``, ``labels:PATH``; see
    :mod:`xaioverlay.segments`) comes last: this method's segments unless ``--segments`` is given.
    """
    from ..segments import KINDS, parse_segments

    usage = (f"use {name}:N[:FILL][:SEGMENTS], e.g. {name}:{example} or {name}:{example}:cubes:32 "
             f"(FILL: {', '.join(FILLS)})")
    samples, fill, segments = None, None, None
    fields = [f.strip() for f in option.split(":")] if option else []
    for number, field in enumerate(fields):
        if field.lower() in KINDS:
            segments = ":".join(fields[number:])
            parse_segments(segments)  # a bad spec is refused now, before any work
            break
        if field.isdigit() and samples is None:
            samples = int(field)
        elif field.lower() in FILLS and fill is None:
            fill = field.lower()
        else:
            raise InputError(f"{name}:{option}: cannot read {field!r}; {usage}")
    return samples, fill or "zero", segments


class CoalitionMethod(Method):
    """What the segment methods share: options, segments, scorer, duration check, map and record."""

    signed = True
    additive = True
    by_window = False  # the masked scorer handles sliding windows
    default_samples: ClassVar[int] = 0
    #: The option's unit, for messages and the record.
    unit: ClassVar[str] = "coalitions"

    uses_segments = True
    default_segments = DEFAULT_SEGMENTS

    def __init__(self, samples: int | None = None, fill: str = "zero", segments: str | None = None) -> None:
        self.samples = samples if samples is not None else self.default_samples
        self.fill = fill
        if segments:  # this method's own default (the engine's --segments still wins)
            self.default_segments = segments

    @classmethod
    def from_option(cls, option: str | None, *, layer: str | None = None) -> "CoalitionMethod":
        samples, fill, segments = parse_coalition_option(option, cls.name, cls.default_samples)
        return cls(samples, fill, segments)

    @property
    def spec(self) -> str:
        parts = ([str(self.samples)] if self.samples != self.default_samples else []) + (
            [self.fill] if self.fill != "zero" else []) + (
            [self.default_segments] if self.default_segments != DEFAULT_SEGMENTS else [])
        return f"{self.name}:{':'.join(parts)}" if parts else self.name

    # -- what each method says ------------------------------------------------------------------------
    def minimum_samples(self, segments: int) -> int:
        """The fewest samples the estimator needs for ``segments`` segments."""
        return 1

    def planned_passes(self, segments: int) -> int:
        """Coalitions the run will evaluate."""
        raise NotImplementedError

    def estimate(self, value, segments: int, generator: torch.Generator, model: LoadedModel, x: torch.Tensor,
                 target: Target, ids: torch.Tensor, players: torch.Tensor) -> shapley.Estimate:
        """Run the estimator on ``value`` over ``segments`` players: the segments ``players`` (S',) of ``ids``."""
        raise NotImplementedError

    def warning(self, estimate: shapley.Estimate) -> str | None:
        """One line the user must see about this run (shown with the map), or None."""
        return None

    # -- shared -----------------------------------------------------------------------------------------
    def make_ids(self, x: torch.Tensor, context: Context) -> tuple[torch.Tensor, str]:
        """(segment ids (X, Y, Z) on ``x``'s grid, the spec they came from): those the engine gave, else (a direct
        call) cubes on ``x``'s grid."""
        from ..segments import cube_ids, parse_segments

        if context.segments is not None:
            return context.segments.ids.to(x.device), context.segments.spec
        spec = parse_segments(self.default_segments)
        if spec.kind != "cubes":
            raise InputError(f"{self.label}: {spec.text()} segments need the input volume; run it through explain()")
        ids = cube_ids(tuple(x.shape[2:]), spec.size.voxels(context.spacing_mm or (1.0, 1.0, 1.0)))
        return ids.to(x.device), spec.text()

    def fill_values(self, x: torch.Tensor) -> torch.Tensor:
        from ..baselines import baseline

        return baseline(x, self.fill, BLUR_SIGMA_VOXELS)

    def check_samples(self, segments: int) -> None:
        least = self.minimum_samples(segments)
        if self.samples < least:
            raise InputError(f"{self.spec} over {segments} segments needs at least {least} {self.unit}; "
                             f"use {self.name}:{least} or more, or fewer segments (--segments)")

    def attribute(self, model: LoadedModel, x: torch.Tensor, target: Target,
                  progress: Progress = NO_PROGRESS, context: Context = NO_CONTEXT) -> Attribution:
        from ..segments import check_duration
        from .masking import SegmentScorer

        ids, segments_text = self.make_ids(x, context)
        count = int(ids.max()) + 1
        with torch.inference_mode(), full_float32():
            scorer = SegmentScorer(model, x, self.fill_values(x), target, ids)
            players = scorer.reachable_segments().cpu().nonzero().flatten()
        active = len(players)
        if active < 2:  # no sampling: a lone segment that reaches the target gets the whole difference
            full, empty = scorer.full_score, scorer.empty_score
            values = torch.zeros(count, dtype=torch.float64)
            values[players] = full - empty
            extras = {"passes": scorer.passes, "full_score": full, "empty_score": empty,
                      "sum_values": float(values.sum()), "score_difference": full - empty,
                      "segments_reaching_target": active}
            return Attribution(paint_segments(values, ids), True, {"segments": segments_text, "segment_count": count},
                               extras)
        self.check_samples(active)
        planned = self.planned_passes(active)
        done = [0]

        def value(keep: torch.Tensor) -> torch.Tensor:
            """The game of the segments that can reach the target: (B, S') → (B,); the others stay kept."""
            whole = torch.ones((len(keep), count), dtype=torch.bool)
            whole[:, players] = keep.cpu()
            with torch.inference_mode(), full_float32():
                scores = scorer.score(whole)
            done[0] += len(keep)
            progress(min(done[0], planned), planned, unit="coalitions")
            return scores

        probe = torch.rand(PROBE_ROWS, active, generator=torch.Generator().manual_seed(SEED)) < 0.5
        started = time.perf_counter()
        value(probe)
        per_pass = (time.perf_counter() - started) / PROBE_ROWS
        check_duration(planned, per_pass, f"{self.spec} over {active} segments",
                       f"fewer segments (e.g. --segments cubes:24 or slic:64) or fewer samples "
                       f"({self.name}:{max(self.minimum_samples(active), self.samples // 4)})")
        estimate = self.estimate(value, active, torch.Generator().manual_seed(SEED), model, x, target,
                                 ids, players)
        values = torch.zeros(count, dtype=torch.float64).index_copy_(0, players, estimate.values)
        record = estimate.record()
        if estimate.standard_errors is not None:
            errors = torch.zeros(count, dtype=torch.float64).index_copy_(0, players, estimate.standard_errors)
            record["standard_errors"] = [round(float(e), 8) for e in errors]
        parameters = {self.unit: self.samples, "segments": segments_text, "segment_count": count, "fill": self.fill,
                      "seed": SEED, "map": "each segment's value spread evenly over its voxels (sums per segment)"}
        extras = {**record, "segments_reaching_target": active, "masked_passes": scorer.passes,
                  "seconds_per_pass_probe": round(per_pass, 6)}
        warning = self.warning(estimate)
        if warning:
            extras["warning"] = warning
        return Attribution(paint_segments(values, ids), True, parameters, extras)


class Shap(CoalitionMethod):
    name = "shap"
    label = "SHAP"
    unit = "permutations"
    default_samples = 4
    demo_spec: ClassVar[str] = "shap:4:cubes:32"
    summary = ("SHAP: Shapley values of segments by antithetic permutation sampling (option: N permutations[:FILL], "
               "e.g. shap:16; segments: --segments)")

    def minimum_samples(self, segments: int) -> int:
        return 4  # two antithetic pairs: the least that gives a standard error

    def planned_passes(self, segments: int) -> int:
        return 2 + 2 * math.ceil(self.samples / 2) * (segments - 1)

    def estimate(self, value, segments, generator, model, x, target, ids, players):
        return shapley.permutation_shapley(value, segments, self.samples, generator)


class KernelShap(CoalitionMethod):
    name = "kernelshap"
    label = "KernelSHAP"
    in_demo: ClassVar[bool] = False  # the demo shows shap; a regression needs ≥ 2 S coalitions
    default_samples = 1000
    summary = ("KernelSHAP: Shapley values of segments by weighted regression (option: N coalitions[:FILL], "
               "e.g. kernelshap:1000)")

    def minimum_samples(self, segments: int) -> int:
        return 2 * segments  # enough pairs for the regression and its standard errors

    def planned_passes(self, segments: int) -> int:
        return 2 + 2 * math.ceil(self.samples / 2)

    def estimate(self, value, segments, generator, model, x, target, ids, players):
        return shapley.kernel_shapley(value, segments, self.samples, generator)


class LimeMethod(CoalitionMethod):
    name = "lime"
    label = "LIME"
    signed = True
    default_samples = 500
    demo_spec: ClassVar[str] = "lime:40:cubes:32"
    summary = (f"LIME: sparse linear surrogate over segments (option: N coalitions[:FILL], e.g. lime:500); "
               f"R² < {shapley.LIME_MIN_R2} is warned")

    def minimum_samples(self, segments: int) -> int:
        return segments + 1

    def planned_passes(self, segments: int) -> int:
        return self.samples + 2

    def estimate(self, value, segments, generator, model, x, target, ids, players):
        return shapley.lime_surrogate(value, segments, self.samples, generator)

    def warning(self, estimate: shapley.Estimate) -> str | None:
        return shapley.lime_warning(self.label, estimate.extras["r2"])


class GuidedShap(Shap):
    name = "shap-guided"
    label = "SHAP (gradient-guided)"
    in_demo: ClassVar[bool] = False  # the demo shows shap
    demo_spec: ClassVar[str] = "shap-guided"
    default_samples = 8
    summary = ("SHAP with a gradient × input surrogate as control variate: the passes of shap:N, less variance, "
               "unbiased (option: N permutations[:FILL], e.g. shap-guided:16)")

    def minimum_samples(self, segments: int) -> int:
        return 8  # four antithetic pairs: two per half for the cross-fitted control scale

    def estimate(self, value, segments, generator, model, x, target, ids, players):
        guide = segment_sums(gradient_times_input(model, x, target)[0].sum(0), ids, int(ids.max()) + 1)[players]
        return shapley.guided_shapley(value, segments, self.samples, generator, guide)


METHODS = (Shap, KernelShap, LimeMethod, GuidedShap)
