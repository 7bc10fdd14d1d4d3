"""Adaptive occlusion: a coarse grid everywhere, finer occluders only where the coarse map is high.

Levels run from coarse to fine; level ``l`` uses occluders ``2^l`` times the finest size and stride.
The coarsest level covers the volume (a quarter of the budget at most). Each finer level spends its
share of the remaining budget on the boxes whose mean current estimate is highest, and replaces the
estimate wherever every box of that level covering a voxel was evaluated. So where the finest level
was completed, the map *is* exact occlusion at the finest size; elsewhere it is the coarser estimate,
scaled by the ratio of box volumes (a drop shared among the finer boxes a coarse box holds, the
first-order guess).

Budget: forward passes of occluded inputs (occluders evaluated). Occluders that cannot reach a
segmentation target are known to drop nothing and cost nothing.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ...models.base import LoadedModel
from ...progress import NO_PROGRESS, Progress
from ...targets import Target
from ..base import Attribution
from .fill import fill_values
from .grid import OccluderGrid, mean_drop_map
from .method import Occlusion, progress_reporter, run_record
from .options import Lengths, OccluderOptions, parse_adaptive
from .scoring import OcclusionScorer, Speedups

#: Most of the budget the coarsest level may take.
COARSE_SHARE = 0.25


def plan_levels(finest: OccluderGrid, budget: int) -> list[OccluderGrid]:
    """Grids from coarse to fine: sizes and strides doubled until the grid fits a quarter of the budget."""
    grids = [finest]
    factor = 1
    while len(grids[0]) > max(1, COARSE_SHARE * budget) and any(s < n for s, n in zip(grids[0].size, finest.shape)):
        factor *= 2
        size = tuple(s * factor for s in finest.size)
        stride = tuple(s * factor for s in finest.stride)
        grids.insert(0, OccluderGrid(finest.shape, size, stride))
    return grids


def box_means(volume: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mean of ``volume`` (X, Y, Z) over each box (N, 2, 3) [low, high), by a summed-volume table."""
    table = torch.nn.functional.pad(volume.double().cumsum(0).cumsum(1).cumsum(2), (1, 0, 1, 0, 1, 0))
    low, high = boxes[:, 0], boxes[:, 1]
    total = torch.zeros(len(boxes), dtype=torch.float64, device=volume.device)
    for corner in range(8):
        pick = [(corner >> axis) & 1 for axis in range(3)]
        index = [high[:, a] if pick[a] else low[:, a] for a in range(3)]
        sign = (-1) ** (3 - sum(pick))
        total += sign * table[index[0], index[1], index[2]]
    return (total / (high - low).prod(1)).float()


class AdaptiveOcclusion(Occlusion):
    """Coarse-to-fine occlusion under a budget of forward passes (see the module docstring)."""

    name = "occlusion-adaptive"
    label = "Adaptive occlusion"
    summary = ("coarse-to-fine occlusion under a pass budget (option: BUDGET[:SIZE[/STRIDE]][:FILL], SIZE = finest "
               "occluder; default budget: a tenth of exact occlusion's passes)")
    demo_spec: ClassVar[str] = "occlusion-adaptive:200:8/4"
    DEFAULT_SIZE: ClassVar[Lengths] = Lengths((8.0, 8.0, 8.0))

    def __init__(self, budget: int | None = None, options: OccluderOptions | None = None, speedups: Speedups = Speedups(),
                 batch_size: int | None = None) -> None:
        super().__init__(options, speedups, batch_size)
        self.budget = budget

    @classmethod
    def from_option(cls, option: str | None, *, layer: str | None = None) -> "AdaptiveOcclusion":
        budget, options = parse_adaptive(option, None, cls.DEFAULT_SIZE, cls.name)
        return cls(budget, options)

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.budget}:{self.options.text()}" if self.budget else f"{self.name}:{self.options.text()}"

    def attribute(self, model: LoadedModel, x: torch.Tensor, target: Target, progress: Progress = NO_PROGRESS) -> Attribution:
        finest = self.grid(x.shape[2:])
        budget = self.budget or max(64, len(finest) // 10)
        levels = plan_levels(finest, budget)
        finest_volume = math.prod(finest.box_size)
        used, chosen_per_level, scorers = 0, [], {}
        estimate = torch.zeros(x.shape[2:], device=x.device)
        with torch.inference_mode():
            for number, grid in enumerate(levels):
                fill = fill_values(x, self.options.fill, grid.box_size)
                key = self.options.fill if self.options.fill != "blur" else grid.box_size
                if key not in scorers:
                    scorers[key] = OcclusionScorer(model, x, fill, target, self.speedups, self.batch_size)
                scorer = scorers[key]
                boxes = grid.boxes(x.device)
                reachable = scorer.reachable((boxes[:, 0], boxes[:, 1]))
                if number == 0:
                    chosen = reachable.nonzero().flatten()
                else:
                    share = (budget - used) // (len(levels) - number)
                    priority = box_means(estimate, boxes).masked_fill(~reachable, -math.inf)
                    chosen = priority.topk(min(share, int(reachable.sum()))).indices
                evaluated = ~reachable  # unreachable boxes drop nothing, known without a pass
                evaluated[chosen] = True
                drops = torch.zeros(len(grid), device=x.device)
                drops[chosen] = scorer.drops((boxes[chosen, 0], boxes[chosen, 1]), progress_reporter(progress, used, budget))
                used += len(chosen)
                chosen_per_level.append(len(chosen))
                level_map, coverage = mean_drop_map(drops.view(grid.counts), grid.axis_masks(x.device), evaluated.view(grid.counts))
                _, full_coverage = mean_drop_map(drops.view(grid.counts), grid.axis_masks(x.device))
                complete = coverage == full_coverage
                scale = finest_volume / math.prod(grid.box_size)
                estimate = torch.where(complete, level_map * scale, estimate)
        progress(budget, budget, unit="passes")
        parameters = {**self.parameters(finest, target), "budget": budget,
                      "levels": [{"size_voxels": list(g.box_size), "stride_voxels": list(g.stride), "occluders": len(g),
                                  "evaluated": n} for g, n in zip(levels, chosen_per_level)]}
        parameters["map"] = ("exact mean drop at the finest size where refined; coarser levels elsewhere, "
                             "scaled by the box-volume ratio")
        extras = run_record(next(iter(scorers.values())))
        extras.update({"occluded_passes": sum(s.evaluated for s in scorers.values()), "occluders_evaluated": used,
                       "exact_occluders_at_finest_size": len(finest),
                       "fewer_passes_than_exact": round(len(finest) / max(used, 1), 2)})
        return Attribution(estimate.float(), True, parameters, extras)
