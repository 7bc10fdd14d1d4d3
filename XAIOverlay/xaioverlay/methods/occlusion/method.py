"""Occlusion sensitivity: how much the target drops when a box of the input is filled in."""

from __future__ import annotations

from typing import ClassVar

import torch

from ...models.base import LoadedModel
from ...progress import NO_PROGRESS, Progress
from ...targets import Target
from ..base import NO_CONTEXT, Attribution, Context, Method
from ..masking import BoxMasks, MaskedScorer, SegmentScorer, Speedups, segment_boxes
from ..precision import full_float32
from .fill import fill_values
from .grid import OccluderGrid, mean_drop_map
from .options import Lengths, OccluderOptions, parse_occlusion


def run_record(scorer: MaskedScorer) -> dict:
    """What an occlusion run measured about itself (for ``explanation.json``'s extras)."""
    record = {
        "clean_score": round(scorer.clean_score, 6),
        "occluded_passes": scorer.evaluated,  # network passes (one per occluder and window it reaches)
        "occluders_evaluated": scorer.occluders_evaluated,
        "skipped_unreachable": scorer.skipped,  # (occluder, window) pairs that cannot reach the target
        "engine": scorer.engine,
        "batch_size": scorer.batch_size,
        "speedups": scorer.speedups.describe(),
    }
    if scorer.windows:
        record["windows"] = scorer.windows
        record["window_passes_reused"] = scorer.reused
    if scorer.slower_because:
        record["slower_because"] = scorer.slower_because
    return record


def progress_reporter(progress: Progress):
    """``report(done, total)`` for :meth:`MaskedScorer.drops`, in passes."""
    return lambda done, count: progress(done, count, unit="passes")


def segment_drops(scorer: SegmentScorer, report) -> torch.Tensor:
    """(S,) float64 drop of the target when each segment alone is filled."""
    keep = ~torch.eye(scorer.num_segments, dtype=torch.bool, device=scorer.segments.device)
    return scorer.full_score - scorer.score(keep, report)


def typical_extent(segments: torch.Tensor) -> list[float]:
    """Median bounding-box edge of the segments, per axis, in voxels (the blur fill's scale)."""
    low, high = segment_boxes(segments, int(segments.max()) + 1)
    return (high - low).float().median(0).values.tolist()


class Occlusion(Method):
    """Exact occlusion: every box of a grid is filled in turn; the map is the mean drop of the target
    over the boxes covering each voxel (positive: the region supports the target; negative: hiding
    it raises the target, so the map is signed). With segments (``--segments``), each segment is
    filled in turn instead and its drop is the map over its voxels."""

    name = "occlusion"
    label = "Occlusion"
    signed = True
    by_window = False  # not linear in the target: sliding windows are handled in ..masking
    summary = "Occlusion: target drop when a box is hidden (option: SIZE[/STRIDE][:FILL], voxels or mm, e.g. 16/8, 20mm/10mm:blur)"
    demo_spec: ClassVar[str] = "occlusion:16/8"
    DEFAULT_SIZE: ClassVar[Lengths] = Lengths((16.0, 16.0, 16.0))
    uses_segments: ClassVar[bool] = True

    def __init__(self, options: OccluderOptions | None = None, speedups: Speedups = Speedups(), batch_size: int | None = None) -> None:
        self.options = options or OccluderOptions(self.DEFAULT_SIZE)
        self.speedups = speedups
        self.batch_size = batch_size

    @classmethod
    def from_option(cls, option: str | None, *, layer: str | None = None) -> "Occlusion":
        return cls(parse_occlusion(option, cls.DEFAULT_SIZE, cls.name))

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.options.text()}"

    def grid(self, shape, spacing_mm: tuple[float, float, float] | None) -> OccluderGrid:
        size, stride = self.options.voxels(spacing_mm)
        return OccluderGrid(tuple(shape), size, stride)

    def parameters(self, grid: OccluderGrid, target: Target) -> dict:
        return {
            "size": self.options.size.text(),
            "stride": self.options.effective_stride.text(),
            "size_voxels": list(grid.box_size),
            "stride_voxels": list(grid.stride),
            "fill": self.options.fill,
            "grid": list(grid.counts),
            "occluders": len(grid),
            "map": f"mean drop of the {target.score} over the occluders covering each voxel",
        }

    def attribute(self, model: LoadedModel, x: torch.Tensor, target: Target, progress: Progress = NO_PROGRESS,
                  context: Context = NO_CONTEXT) -> Attribution:
        if context.segments is not None:
            return self.attribute_segments(model, x, target, progress, context)
        grid = self.grid(x.shape[2:], context.spacing_mm)
        with torch.inference_mode(), full_float32():
            fill = fill_values(x, self.options.fill, grid.box_size)
            scorer = MaskedScorer(model, x, fill, target, self.speedups, self.batch_size)
            boxes = grid.boxes(x.device)
            drops = scorer.drops(BoxMasks(boxes[:, 0], boxes[:, 1]), progress_reporter(progress)).float()
            importance, _ = mean_drop_map(drops.view(grid.counts), grid.axis_masks(x.device))
        return Attribution(importance.float(), True, self.parameters(grid, target), run_record(scorer))

    def attribute_segments(self, model: LoadedModel, x: torch.Tensor, target: Target,
                           progress: Progress, context: Context) -> Attribution:
        """Each segment of ``context.segments`` filled alone; the map is its drop over its voxels."""
        segments = context.segments.ids
        fill = fill_values(x, self.options.fill, typical_extent(segments))
        scorer = SegmentScorer(model, x, fill, target, segments, self.speedups, self.batch_size)
        drops = segment_drops(scorer, progress_reporter(progress))
        parameters = {"segments": context.segments.spec, "segment_count": scorer.num_segments,
                      "fill": self.options.fill,
                      "map": f"drop of the {target.score} when the voxel's segment is filled"}
        return Attribution(drops.float()[segments], True, parameters, run_record(scorer.masked))
