"""Adaptive occlusion: a coarse grid everywhere, finer occluders only where the evidence is.

Levels run from coarse to fine; level ``l`` uses occluders ``2^l`` times the finest size and stride.
The coarsest level covers the volume (a quarter of the budget at most). Each finer level spends its
share of the remaining budget (shares 1 : 2 : 4 ... towards the finest) on the boxes whose mean
current estimate is highest. A voxel is *complete* at a level when every box of that level covering
it was evaluated.

The map (:func:`compose_levels`), in units of a drop of one finest-size box:

- where the finest level is complete, it *is* exact occlusion at the finest size;
- elsewhere it comes from the finest level complete there: a box's drop is spread evenly over its
  voxels as a drop density (to first order a box's drop is the sum of a density over its voxels),
  except for boxes that hold voxels resolved by finer boxes: they were refined because they hold the
  evidence, which the finer boxes now locate, and what their drop exceeds the finer drops by is the
  interaction of hiding a whole lesion at once (strong for a segmentation target: hiding the lesion
  whole removes it, hiding a part of it does not), not evidence in their other voxels. Spreading that
  remainder put half of the positive relevance outside the tumour on the demo segmenter; leaving it
  out matches exact occlusion (``tools/evaluate_adaptive_occlusion.py``).

Budget: forward passes of occluded inputs (occluders evaluated). Occluders that cannot reach a
segmentation target are known to drop nothing and cost nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...models.base import LoadedModel
from ...progress import NO_PROGRESS, Progress
from ...targets import Target
from ..base import NO_CONTEXT, Attribution, Context
from ..masking import BoxMasks, MaskedScorer, Speedups
from ..precision import full_float32
from .fill import fill_values
from .grid import OccluderGrid, mean_drop_map
from .method import Occlusion, run_record
from .options import Lengths, OccluderOptions, parse_adaptive

#: Most of the budget the coarsest level may take.
COARSE_SHARE = 0.25


def plan_levels(finest: OccluderGrid, budget: int) -> list[OccluderGrid]:
    """Grids from coarse to fine: sizes and strides doubled until the grid fits a quarter of the budget
    (just the finest grid when the budget affords it: exact occlusion)."""
    grids = [finest]
    if len(finest) <= budget:
        return grids
    factor = 1
    while len(grids[0]) > max(1, COARSE_SHARE * budget) and any(s < n for s, n in zip(grids[0].size, finest.shape)):
        factor *= 2
        size = tuple(s * factor for s in finest.size)
        stride = tuple(s * factor for s in finest.stride)
        grids.insert(0, OccluderGrid(finest.shape, size, stride))
    return grids


def level_share(remaining: int, levels_left: int) -> int:
    """Passes for the next level: the remaining budget split 1 : 2 : 4 ... towards the finest level."""
    return remaining // (2**levels_left - 1)


def summed_volume(volume: torch.Tensor) -> torch.Tensor:
    """(X+1, Y+1, Z+1) table of sums of ``volume`` over [0, i) × [0, j) × [0, k), float64."""
    return torch.nn.functional.pad(volume.double().cumsum(0).cumsum(1).cumsum(2), (1, 0, 1, 0, 1, 0))


def box_sums(table: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Sums over boxes (N, 2, 3) [low, high) from a :func:`summed_volume` table: (N,) float64."""
    low, high = boxes[:, 0], boxes[:, 1]
    total = torch.zeros(len(boxes), dtype=torch.float64, device=table.device)
    for corner in range(8):
        pick = [(corner >> axis) & 1 for axis in range(3)]
        index = [high[:, a] if pick[a] else low[:, a] for a in range(3)]
        total += (-1) ** (3 - sum(pick)) * table[index[0], index[1], index[2]]
    return total


def box_means(volume: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mean of ``volume`` (X, Y, Z) over each box (N, 2, 3) [low, high): (N,)."""
    return (box_sums(summed_volume(volume), boxes) / (boxes[:, 1] - boxes[:, 0]).prod(1)).float()


@dataclass
class Level:
    """One level's grid, its drops (N,) and which boxes count as evaluated (N,) bool."""

    grid: OccluderGrid
    drops: torch.Tensor
    evaluated: torch.Tensor

    def complete(self) -> torch.Tensor:
        """(X, Y, Z) bool: voxels whose covering boxes were all evaluated."""
        masks = self.grid.axis_masks(self.drops.device)
        _, counted = mean_drop_map(self.drops.view(self.grid.counts), masks, self.evaluated.view(self.grid.counts))
        _, every = mean_drop_map(self.drops.view(self.grid.counts), masks)
        return counted == every

    def mean_map(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of per-box ``values`` (N,) over the evaluated boxes covering each voxel."""
        masks = self.grid.axis_masks(self.drops.device)
        return mean_drop_map(values.view(self.grid.counts), masks, self.evaluated.view(self.grid.counts))[0]


def compose_levels(levels: list[Level], finest_volume: int) -> torch.Tensor:
    """The adaptive map (see the module docstring), (X, Y, Z) in finest-box drop units.

    Each voxel takes its value from the finest level complete there (the coarsest is complete
    everywhere). A coarser level's box B with drop D gives its voxels D / |B| × finest_volume when no
    voxel of B is resolved by a finer level, else 0; a voxel averages this over the boxes covering it.
    Unevaluated finest boxes then get the drop this estimate predicts (its sum over the box).
    """
    depth = torch.full(levels[0].grid.shape, -1, dtype=torch.long, device=levels[0].drops.device)
    for number, level in enumerate(levels):
        depth[level.complete()] = number
    estimate = torch.zeros(depth.shape, device=depth.device)
    finest = len(levels) - 1
    if bool((depth == finest).any()):
        estimate = torch.where(depth == finest, levels[finest].mean_map(levels[finest].drops), estimate)
    for number in range(finest - 1, -1, -1):
        here = depth == number
        if not bool(here.any()):
            continue
        level = levels[number]
        resolved = depth > number
        boxes = level.grid.boxes(depth.device)
        refined = box_sums(summed_volume(resolved.double()), boxes) > 0
        volume = box_sums(summed_volume(torch.ones_like(resolved, dtype=torch.float64)), boxes)
        density = torch.where(refined, torch.zeros_like(volume), level.drops.double() / volume.clamp_min(1))
        estimate = torch.where(here, level.mean_map((density * finest_volume).float()), estimate)
    if finest == 0:
        return estimate
    # every finest box not evaluated gets the drop the estimate predicts (its sum of density), and
    # the map is exact occlusion's mean over covering boxes of those drops
    last = levels[finest]
    boxes = last.grid.boxes(depth.device)
    predicted = box_sums(summed_volume(estimate), boxes) / finest_volume
    drops = torch.where(last.evaluated, last.drops.double(), predicted)
    return mean_drop_map(drops.float().view(last.grid.counts), last.grid.axis_masks(depth.device))[0]


def budget_reporter(progress: Progress, used: int, count: int, budget: int):
    """``report(done, total)`` for one level's :meth:`MaskedScorer.drops` (in window passes, several
    per occluder on a sliding-window model), shown as occluders of the budget: ``used`` before this
    level, ``count`` in it."""
    return lambda done, total: progress(used + (count * done // total if total else count), budget, unit="occluders")


class AdaptiveOcclusion(Occlusion):
    """Coarse-to-fine occlusion under a budget of forward passes (see the module docstring)."""

    name = "occlusion-adaptive"
    label = "Adaptive occlusion"
    summary = "Adaptive occlusion: coarse to fine under a budget of passes (option: BUDGET[:SIZE[/STRIDE]][:FILL], e.g. 400:8/4)"
    demo_spec: ClassVar[str] = "occlusion-adaptive:200:8/4"
    DEFAULT_SIZE: ClassVar[Lengths] = Lengths((8.0, 8.0, 8.0))
    uses_segments: ClassVar[bool] = False  # its levels are box grids

    def __init__(self, budget: int | None = None, options: OccluderOptions | None = None, speedups: Speedups = Speedups(),
                 batch_size: int | None = None) -> None:
        super().__init__(options, speedups, batch_size)
        self.budget = budget

    @classmethod
    def from_option(cls, option: str | None, *, layer: str | None = None) -> "AdaptiveOcclusion":
        budget, options = parse_adaptive(option, cls.DEFAULT_SIZE, cls.name)
        return cls(budget, options)

    @property
    def spec(self) -> str:
        if self.budget:
            return f"{self.name}:{self.budget}:{self.options.text()}"
        # without a budget, a bare leading number would read back as one: the stride is written out
        explicit = OccluderOptions(self.options.size, self.options.effective_stride, self.options.fill)
        return f"{self.name}:{explicit.text()}"

    def attribute(self, model: LoadedModel, x: torch.Tensor, target: Target, progress: Progress = NO_PROGRESS,
                  context: Context = NO_CONTEXT) -> Attribution:
        finest = self.grid(x.shape[2:], context.spacing_mm)
        budget = self.budget or max(64, len(finest) // 10)
        levels = plan_levels(finest, budget)
        finest_volume = math.prod(finest.box_size)
        used, results, scorers = 0, [], {}
        estimate = torch.zeros(x.shape[2:], device=x.device)
        with torch.inference_mode(), full_float32():
            for number, grid in enumerate(levels):
                key = self.options.fill if self.options.fill != "blur" else grid.box_size
                if key not in scorers:
                    fill = fill_values(x, self.options.fill, grid.box_size)
                    scorers[key] = MaskedScorer(model, x, fill, target, self.speedups, self.batch_size)
                scorer = scorers[key]
                boxes = grid.boxes(x.device)
                reachable = scorer.reachable(BoxMasks(boxes[:, 0], boxes[:, 1]))
                if number == 0:
                    chosen = reachable.nonzero().flatten()
                else:
                    share = level_share(budget - used, len(levels) - number)
                    priority = box_means(estimate, boxes).masked_fill(~reachable, -math.inf)
                    chosen = priority.topk(min(share, int(reachable.sum()))).indices
                evaluated = ~reachable  # unreachable boxes drop nothing, known without a pass
                evaluated[chosen] = True
                drops = torch.zeros(len(grid), device=x.device)
                drops[chosen] = scorer.drops(BoxMasks(boxes[chosen, 0], boxes[chosen, 1]),
                                             budget_reporter(progress, used, len(chosen), budget)).float()
                used += len(chosen)
                results.append(Level(grid, drops, evaluated))
                estimate = compose_levels(results, finest_volume)
                results[-1].chosen = len(chosen)
        progress(budget, budget, unit="occluders")
        parameters = {**self.parameters(finest, target), "budget": budget,
                      "levels": [{"size_voxels": list(g.box_size), "stride_voxels": list(g.stride), "occluders": len(g),
                                  "evaluated": level.chosen} for g, level in zip(levels, results)]}
        parameters["map"] = ("exact mean drop at the finest size where refined; elsewhere coarser drops not explained "
                             "by refined voxels, spread evenly (finest-box units)")
        extras = run_record(next(iter(scorers.values())))
        extras.update({"occluded_passes": sum(s.evaluated for s in scorers.values()), "occluders_evaluated": used,
                       "exact_occluders_at_finest_size": len(finest),
                       "fewer_passes_than_exact": round(len(finest) / max(used, 1), 2)})
        return Attribution(estimate.float(), True, parameters, extras)
