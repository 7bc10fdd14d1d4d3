"""Target scores of occluded inputs, exact, with as little network work as possible.

The network's input is seen through *views*: the whole input, or for a model run with a sliding
window each window, weighted as MONAI blends them (see :mod:`xaioverlay.sliding`). The target is the
sum of the views' shares, and a view's share depends only on the input inside it, so an occluder
changes only the shares of views it touches (window reuse). Inside a view, an occluder that cannot
reach the target region through the network's receptive field changes nothing (skipping), and the
rest is computed by :class:`~.incremental.IncrementalRun` (only what the occluder changes and the
target reads), or by plain forward passes when the network cannot be traced.

Every switch in :class:`Speedups` keeps the scores exact; all off is brute force (each occluded
volume through the model's own inferer), the reference the tests compare against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from ... import sliding
from ...errors import ModelError
from ...measure import available_memory_bytes
from ...models.base import LoadedModel
from ...targets import Target
from . import boxes as bx
from .incremental import IncrementalRun, Patch, trace

log = logging.getLogger(__name__)

#: Largest batch of occluded inputs per call: whole volumes gain nothing on CPU beyond ~8 (measured
#: here); incremental boxes are small, so more per call saves Python overhead. CUDA: bounded by memory.
MAX_BATCH = {"forward": {"cpu": 8, "cuda": 256}, "incremental": {"cpu": 32, "cuda": 1024}}


@dataclass(frozen=True)
class Speedups:
    """Exact speed-ups, each can be switched off (tests compare each with brute force)."""

    skip: bool = True  # occluders that cannot reach the target region are not evaluated
    crop: bool = True  # each layer is computed only where the target region reads it
    incremental: bool = True  # each layer is computed only where the occluder changes it
    reuse_windows: bool = True  # sliding windows no occluder touches keep their clean output

    def describe(self) -> dict:
        return {"skip_unreachable": self.skip, "crop_to_target": self.crop, "incremental": self.incremental,
                "reuse_windows": self.reuse_windows}


BRUTE_FORCE = Speedups(False, False, False, False)


@dataclass
class View:
    """One thing the network sees: ``x`` and ``fill`` (1, C, *shape) starting at voxel ``offset`` of
    the input (negative where a sliding window pads), and this view's share of the target."""

    offset: tuple[int, int, int]
    x: torch.Tensor
    fill: torch.Tensor
    target: Target

    def local(self, boxes: bx.Box) -> bx.Box:
        """Occluder boxes in this view's voxels, clipped to it (empty where they miss it)."""
        offset = torch.as_tensor(self.offset, device=boxes[0].device)
        return bx.clip((boxes[0] - offset, boxes[1] - offset), self.x.shape[2:])


def make_views(model: LoadedModel, x: torch.Tensor, fill: torch.Tensor, target: Target) -> list[View]:
    """The whole input, or one view per sliding window that holds part of the target region."""
    window = model.sliding_window
    if window is None or not window.needed(x.shape[2:]) or target.weights is None:
        return [View((0, 0, 0), x, fill, target)]
    pads = sliding.window_padding(x.shape[2:], window.roi_size)
    padded, padded_fill = sliding.pad(x, pads), sliding.pad(fill, pads)
    weights = sliding.pad(target.weights, pads)
    importance, total, slices = sliding.blend_weights(window, padded.shape[2:], x.device)
    share = torch.where(total > 0, weights / total.clamp_min(1e-12), torch.zeros_like(total))
    views = []
    for part in slices:
        view_weights = share[part] * importance
        if bool((view_weights != 0).any()):
            index = (slice(None), slice(None), *part)
            offset = tuple(p.start - before for p, (before, _) in zip(part, pads))
            views.append(View(offset, padded[index], padded_fill[index], target.restricted(view_weights)))
    return views


def weights_box(weights: torch.Tensor | None) -> bx.Box | None:
    """Bounding box of a target's non-zero weights, ((1, 3), (1, 3)); None for classifiers."""
    if weights is None:
        return None
    where = (weights != 0).nonzero()
    return where.min(0).values[None], where.max(0).values[None] + 1


class ForwardScorer:
    """A view's occluded scores by whole forward passes (networks that cannot be traced)."""

    engine = "forward"

    def __init__(self, model: LoadedModel, view: View, infer: bool = False) -> None:
        self.model, self.view, self.infer = model, view, infer
        run = model.infer if infer else model.forward
        self.clean_score = float(view.target(run(view.x))[0])
        self.item_bytes = view.x.numel() * view.x.element_size() * 64  # rough: activations of a 3D CNN

    def reaches(self, boxes: bx.Box) -> torch.Tensor:
        return ~bx.empty(boxes)

    def scores(self, boxes: bx.Box) -> torch.Tensor:
        """(B,) target of the view's input with each box filled; built on the device in one step."""
        x, fill = self.view.x, self.view.fill
        whole = torch.zeros_like(boxes[0])
        inside = bx.in_box(whole, x.shape[2:], boxes)[:, None]
        occluded = torch.where(inside, fill, x)
        return self.view.target((self.model.infer if self.infer else self.model.forward)(occluded))


class IncrementalScorer:
    """A view's occluded scores by exact incremental inference (see :mod:`.incremental`)."""

    engine = "incremental"

    def __init__(self, model: LoadedModel, graph, view: View, speedups: Speedups) -> None:
        self.model, self.view = model, view
        needed = weights_box(view.target.weights)
        with model.autocast():
            self.run = IncrementalRun(graph, view.x, needed, crop=speedups.crop, incremental=speedups.incremental)
        self.model.passes.forward += 1
        self.clean_output = self.run.output.float()
        # tracing can bake a Python branch into the graph: the replayed graph must give the network's output
        reference = model.forward(view.x)
        scale = float(reference.abs().max()) or 1.0
        if reference.shape != self.clean_output.shape or float((reference - self.clean_output).abs().max()) > 1e-3 * scale:
            raise ValueError("the traced graph does not reproduce the network's output")
        self.clean_score = float(view.target(self.clean_output)[0])
        self.item_bytes = sum(v.numel() * v.element_size() for v in self.run.values.values() if isinstance(v, torch.Tensor))

    def reaches(self, boxes: bx.Box) -> torch.Tensor:
        return self.run.reaches_output(boxes)

    def scores(self, boxes: bx.Box) -> torch.Tensor:
        batch = boxes[0].shape[0]
        with self.model.autocast():
            out = self.run.evaluate(boxes, self.view.fill, self.view.x)
        self.model.passes.forward += batch
        target = self.view.target
        if out is None:
            return torch.full((batch,), self.clean_score, device=boxes[0].device)
        if not isinstance(out, Patch):
            return target(out.float())
        weights = bx.read_box(target.weights[None, None], out.low, out.size)[:, 0] * out.valid[:, None, None, None]
        local = target.restricted(weights)
        clean = bx.read_box(self.clean_output, out.low, out.size)
        return self.clean_score + (local(out.values.float()) - local(clean))


def _window_count(x: torch.Tensor, window) -> int:
    padded = [max(n, r) for n, r in zip(x.shape[2:], window.roi_size)]
    return len(sliding.window_slices(padded, window.roi_size, window.overlap, window.layout))


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_memory_bytes()


def first_batch_size(device: torch.device, item_bytes: int, engine: str) -> int:
    """Occluded inputs per call: a quarter of the free memory over an item's (over-)estimated cost."""
    cap = MAX_BATCH[engine].get(device.type, 8)
    return max(1, min(cap, int(free_memory_bytes(device) * 0.25 // max(item_bytes, 1))))


class OcclusionScorer:
    """Target scores of a volume with boxes filled in, for any set of boxes.

    Args:
        x: (1, C, X, Y, Z) the model input; ``fill``: the same shape, values pasted in a box.
        speedups: which exact speed-ups to use.
    """

    def __init__(self, model: LoadedModel, x: torch.Tensor, fill: torch.Tensor, target: Target,
                 speedups: Speedups = Speedups(), batch_size: int | None = None) -> None:
        self.model, self.speedups = model, speedups
        windowed = model.sliding_window is not None and model.sliding_window.needed(x.shape[2:])
        self.graph, self.slower_because = None, ""
        if speedups.crop or speedups.incremental or speedups.skip:
            try:
                self.graph = trace(model.network)
            except Exception as error:  # scripted or dynamic networks: forward passes instead
                self.slower_because = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}" if str(error) else type(error).__name__
                log.info("occlusion: network not traceable (%s); using whole forward passes", self.slower_because)
        splits = target.splits_over_windows  # else scored whole, through the model's own inference
        if windowed and not (speedups.reuse_windows and splits):
            # the model's own sliding-window inference for every occluded volume
            self.views = [View((0, 0, 0), x, fill, target)]
            self.scorers = [ForwardScorer(model, self.views[0], infer=True)]
            if speedups.reuse_windows and not splits:
                self.slower_because = "a probability of blended sliding windows is scored on the whole volume"
        else:
            self.views = make_views(model, x, fill, target)
            self.scorers = [self._scorer(v) for v in self.views]
        self.windows = {"used": len(self.views), "total": _window_count(x, model.sliding_window)} if windowed else None
        self.clean_score = sum(s.clean_score for s in self.scorers)
        self.batch_size = batch_size or first_batch_size(x.device, max(s.item_bytes for s in self.scorers), self.engine)
        self.evaluated = self.skipped = self.reused = self.occluders_evaluated = 0

    def _scorer(self, view: View):
        if self.graph is not None:
            try:
                return IncrementalScorer(self.model, self.graph, view, self.speedups)
            except Exception as error:  # an operation the tracer recorded but cannot replay
                self.slower_because = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                log.info("occlusion: incremental inference unavailable (%s); using whole forward passes", self.slower_because)
                self.graph = None
        return ForwardScorer(self.model, view)

    @property
    def engine(self) -> str:
        return self.scorers[0].engine if self.scorers else "none"

    def reachable(self, boxes: bx.Box) -> torch.Tensor:
        """(N,) True where a box can change the target (always, unless skipping is on)."""
        reach = torch.zeros(boxes[0].shape[0], dtype=torch.bool, device=boxes[0].device)
        for _, index, _ in self.plan(boxes):
            reach[index] = True
        return reach

    def plan(self, boxes: bx.Box, count: bool = False) -> list[tuple[object, torch.Tensor, bx.Box]]:
        """Per view: indices of the boxes that must be evaluated there, and those boxes in its voxels.

        With ``count``, adds to :attr:`reused` the (box, window) pairs where the box misses the window
        and to :attr:`skipped` those where it meets the window but cannot reach the target."""
        work = []
        for view, scorer in zip(self.views, self.scorers):
            local = view.local(boxes)
            touched = ~bx.empty(local)
            reaching = touched
            if self.speedups.skip and len(touched):
                chunk = 4096
                reaching = touched & torch.cat([scorer.reaches((local[0][i:i + chunk], local[1][i:i + chunk]))
                                                for i in range(0, len(touched), chunk)])
            if count:
                self.reused += int((~touched).sum())
                self.skipped += int((touched & ~reaching).sum())
            index = reaching.nonzero().flatten()
            work.append((scorer, index, (local[0][index], local[1][index])))
        return work

    def drops(self, boxes: bx.Box, report: Callable[[int, int], None] = lambda done, total: None) -> torch.Tensor:
        """Clean score minus occluded score for each box: (N,). ``report(done, total)`` counts passes."""
        count = boxes[0].shape[0]
        scores = torch.full((count,), self.clean_score, dtype=torch.float64, device=boxes[0].device)
        work = self.plan(boxes, count=True)
        total = sum(len(index) for _, index, _ in work)
        if work:
            self.occluders_evaluated += int(torch.unique(torch.cat([index for _, index, _ in work])).numel())
        done = 0
        report(0, total)
        for scorer, index, local in work:
            start = 0
            while start < len(index):
                stop = min(start + self.batch_size, len(index))
                try:
                    values = scorer.scores((local[0][start:stop], local[1][start:stop]))
                except Exception as error:
                    if not is_out_of_memory(error):
                        raise
                    self._halve(stop - start)
                    continue
                scores.index_add_(0, index[start:stop], values.double() - scorer.clean_score)
                done += stop - start
                report(done, total)
                start = stop
        self.evaluated += total
        return (self.clean_score - scores).float()

    def _halve(self, tried: int) -> None:
        if tried <= 1:
            raise ModelError("out of memory even for one occluded input; free memory, use --device cpu, or a smaller volume")
        self.batch_size = max(1, tried // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("occlusion: out of memory; batch size halved to %d", self.batch_size)
