"""Target scores of masked inputs, exact, with as little network work as possible: the one engine
under every perturbation method (occlusion's boxes, and coalitions of segments for SHAP and LIME).

A perturbation replaces some input voxels by a fill (a baseline, see :mod:`xaioverlay.baselines`):
occlusion fills one box per item (:class:`BoxMasks`); a coalition keeps some segments of a label
volume and fills the others (:class:`SegmentMasks`, scored through :class:`SegmentScorer`).

The network's input is seen through *views*: the whole input, or for a model run with a sliding
window each window, weighted as MONAI blends them (see :mod:`xaioverlay.sliding`). The target is the
sum of the views' shares, and a view's share depends only on the input inside it, so a perturbation
changes only the shares of views it touches (window reuse). Inside a view, filled voxels that cannot
reach the target region through the network's receptive field change nothing (skipping: a segment
that cannot reach it counts as kept there), and the rest is computed by
:class:`~.incremental.IncrementalRun` on the bounding box of what is filled (only what the change
reaches and the target reads), or by plain forward passes when the network cannot be traced.

Every switch in :class:`Speedups` keeps the scores exact; all off is brute force (each masked
volume through the model's own inferer), the reference the tests compare against.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .. import sliding
from ..errors import ModelError
from ..memory import batch_that_fits, is_out_of_memory
from ..models.base import LoadedModel
from ..targets import Target
from . import boxes as bx
from .incremental import IncrementalRun, Painter, Patch, trace
from .precision import full_float32

log = logging.getLogger(__name__)

#: Largest batch of masked inputs per call: whole volumes gain nothing on CPU beyond ~8 (measured
#: here); incremental boxes are small, so more per call saves Python overhead. CUDA: bounded by memory.
MAX_BATCH = {"forward": {"cpu": 8, "cuda": 256}, "incremental": {"cpu": 32, "cuda": 1024}}


@dataclass(frozen=True)
class Speedups:
    """Exact speed-ups, each can be switched off (tests compare each with brute force)."""

    skip: bool = True  # filled voxels that cannot reach the target region are not evaluated
    crop: bool = True  # each layer is computed only where the target region reads it
    incremental: bool = True  # each layer is computed only where the filled voxels change it
    reuse_windows: bool = True  # sliding windows no perturbation touches keep their clean output

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
        """Boxes of the input in this view's voxels, clipped to it (empty where they miss it)."""
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

    def acquire(self) -> None:
        """Nothing to hold between calls (see :meth:`IncrementalScorer.acquire`)."""

    def release(self) -> None:
        """Nothing to free."""

    def reaches(self, boxes: bx.Box) -> torch.Tensor:
        return ~bx.empty(boxes)

    def scores(self, boxes: bx.Box, paint: Painter) -> torch.Tensor:
        """(B,) target of the view's masked inputs, each painted whole."""
        masked = paint(torch.zeros_like(boxes[0]), tuple(self.view.x.shape[2:]))
        return self.view.target((self.model.infer if self.infer else self.model.forward)(masked))


class IncrementalScorer:
    """A view's occluded scores by exact incremental inference (see :mod:`.incremental`).

    With ``hold`` (one view: the whole input) the clean pass is kept for the scorer's life. Otherwise
    (one view of several sliding windows) the clean pass (every layer's values on the view: about
    0.24 GB for a 16-channel UNet on a 96³ window) is held only between :meth:`acquire` and
    :meth:`release`, while this view is scored, so a sliding-window model holds one window's at a
    time; what :meth:`reaches` needs (the layers' boxes) is kept throughout. Each acquire after the
    first re-runs the clean pass (one forward).
    """

    engine = "incremental"

    def __init__(self, model: LoadedModel, graph, view: View, speedups: Speedups, hold: bool = True) -> None:
        self.model, self.graph, self.view, self.speedups, self.hold = model, graph, view, speedups, hold
        self.clean_output: torch.Tensor | None = None
        self.acquire()
        # tracing can bake a Python branch into the graph: the replayed graph must give the network's output
        reference = model.forward(view.x)
        scale = float(reference.abs().max()) or 1.0
        same_shape = reference.shape == self.clean_output.shape
        if not same_shape or float((reference - self.clean_output).abs().max()) > 1e-3 * scale:
            raise ValueError("the traced graph does not reproduce the network's output")
        del reference
        self.clean_score = float(view.target(self.clean_output)[0])
        self.item_bytes = sum(v.numel() * v.element_size() for v in self.run.values.values()
                              if isinstance(v, torch.Tensor))
        self.release()

    def acquire(self) -> None:
        """Run (or re-run) the clean pass and keep its values for :meth:`scores`."""
        if self.clean_output is not None:
            return
        needed = weights_box(self.view.target.weights)
        with self.model.autocast():
            self.run = IncrementalRun(self.graph, self.view.x, needed, crop=self.speedups.crop,
                                      incremental=self.speedups.incremental)
        self.model.passes.forward += 1
        self.clean_output = self.run.output.float()

    def release(self) -> None:
        """Free the clean pass's values (the boxes :meth:`reaches` uses stay), unless held."""
        if not self.hold:
            self.run.values, self.run.output, self.clean_output = {}, None, None

    def reaches(self, boxes: bx.Box) -> torch.Tensor:
        return self.run.reaches_output(boxes)

    def scores(self, boxes: bx.Box, paint: Painter) -> torch.Tensor:
        """(B,) target of the view's masked inputs; ``boxes``: what each changes, in the view's voxels."""
        batch = boxes[0].shape[0]
        with self.model.autocast():
            out = self.run.evaluate(boxes, paint)
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


def first_batch_size(device: torch.device, item_bytes: int, engine: str) -> int:
    """Masked inputs per call: as many as fit in the free memory's share (:data:`~xaioverlay.memory.BATCH_SHARE`)
    at an item's (over-)estimated cost."""
    return batch_that_fits(device, item_bytes, MAX_BATCH[engine].get(device.type, 8))


class ViewMasks(Protocol):
    """A batch of N perturbations as one view sees them."""

    boxes: bx.Box  # per item the box of view voxels it fills, ((N, 3), (N, 3)); empty: changes nothing here

    def painter(self, index: torch.Tensor) -> Painter:
        """How the items ``index`` (K,) paint the view's input (see :data:`~.incremental.Painter`)."""


class Masks(Protocol):
    """A batch of N perturbations, each filling a union of *parts* (boxes or segments) of the input."""

    count: int

    def parts(self) -> bx.Box:
        """Bounding boxes of the parts in input voxels, ((U, 3), (U, 3))."""

    def on_view(self, view: View, parts: bx.Box, live: torch.Tensor) -> ViewMasks:
        """The batch seen by ``view``; ``parts``: the parts' boxes in its voxels; ``live`` (U,): the parts
        that can change its share of the target (the others count as kept)."""


class _BoxesOnView:
    def __init__(self, view: View, boxes: bx.Box) -> None:
        self.view, self.boxes = view, boxes

    def painter(self, index: torch.Tensor) -> Painter:
        x, fill, boxes = self.view.x, self.view.fill, (self.boxes[0][index], self.boxes[1][index])

        def paint(low: torch.Tensor, size: tuple) -> torch.Tensor:
            if tuple(size) == tuple(x.shape[2:]):  # whole inputs: one mask, no per-item copies of x
                return torch.where(bx.in_box(low, size, boxes)[:, None], fill, x)
            return bx.paste_fill(bx.read_box(x, low, size), low, fill, boxes)

        return paint


@dataclass(frozen=True)
class BoxMasks:
    """N perturbations each filling one box: ``low``, ``high`` (N, 3) input voxels, high exclusive."""

    low: torch.Tensor
    high: torch.Tensor

    @property
    def count(self) -> int:
        return self.low.shape[0]

    def parts(self) -> bx.Box:
        return self.low, self.high

    def on_view(self, view: View, parts: bx.Box, live: torch.Tensor) -> _BoxesOnView:
        gone = ~live[:, None]
        return _BoxesOnView(view, (parts[0].masked_fill(gone, 0), parts[1].masked_fill(gone, 0)))


def removed_boxes(removed: torch.Tensor, parts: bx.Box) -> bx.Box:
    """Bounding box of the removed parts of each item.

    Args:
        removed: (N, U) bool, True where item n fills part u.
        parts: the parts' boxes ((U, 3), (U, 3)), empty boxes allowed.
    Returns:
        ((N, 3), (N, 3)); [0, 0) where an item removes no non-empty part.
    """
    removed = removed & ~bx.empty(parts)[None]
    big = torch.iinfo(torch.long).max
    low = torch.where(removed[..., None], parts[0][None], big).amin(1)
    high = torch.where(removed[..., None], parts[1][None], -big).amax(1)
    none = ~removed.any(1, keepdim=True)
    return low.masked_fill(none, 0), high.masked_fill(none, 0)


def kept_voxels(keep: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Which voxels each coalition keeps.

    Args:
        keep: (N, S) bool, True where coalition n keeps segment s.
        ids: (N, X, Y, Z) long segment ids per coalition, or (X, Y, Z) shared by all; S or any negative
            id: a voxel no coalition fills.
    Returns:
        (N, X, Y, Z) bool.
    """
    count = keep.shape[1]
    keep = torch.cat([keep, torch.ones_like(keep[:, :1])], 1)
    ids = torch.where((ids < 0) | (ids >= count), count, ids)
    if ids.ndim == 3:
        return keep[:, ids.flatten()].view(-1, *ids.shape)
    return keep.gather(1, ids.flatten(1)).view(ids.shape)


class _SegmentsOnView:
    def __init__(self, view: View, ids: torch.Tensor, keep: torch.Tensor, boxes: bx.Box) -> None:
        self.view, self.ids, self.keep, self.boxes = view, ids, keep, boxes

    def painter(self, index: torch.Tensor) -> Painter:
        x, fill, keep, ids = self.view.x, self.view.fill, self.keep[index], self.ids

        def paint(low: torch.Tensor, size: tuple) -> torch.Tensor:
            if tuple(size) == tuple(x.shape[2:]):  # whole inputs: no per-item copies of x, fill or ids
                return torch.where(kept_voxels(keep, ids[0, 0])[:, None], x, fill)
            kept = kept_voxels(keep, bx.read_box(ids, low, size, -1)[:, 0])[:, None]
            return torch.where(kept, bx.read_box(x, low, size), bx.read_box(fill, low, size))

        return paint


class SegmentMasks:
    """N coalitions of the segments of a label volume: each keeps the segments where ``keep`` (N, S)
    is True and fills the others. ``segments``: (X, Y, Z) long ids 0..S-1 on the model grid;
    ``boxes``: :func:`segment_boxes` of it; ``ids_by_view``: a cache of the ids in each view's voxels."""

    def __init__(self, segments: torch.Tensor, boxes: bx.Box, keep: torch.Tensor, ids_by_view: dict) -> None:
        self.segments, self.boxes, self.keep, self.ids_by_view = segments, boxes, keep, ids_by_view
        self.count = keep.shape[0]

    def parts(self) -> bx.Box:
        return self.boxes

    def on_view(self, view: View, parts: bx.Box, live: torch.Tensor) -> _SegmentsOnView:
        ids = self.ids_by_view.get(view.offset)
        if ids is None:  # the view's voxels outside the volume (sliding-window padding) are never filled
            offset = torch.as_tensor(view.offset, device=self.segments.device)[None]
            ids = self.ids_by_view[view.offset] = bx.read_box(self.segments[None, None], offset, view.x.shape[2:], -1)
        keep = self.keep | ~live[None]
        return _SegmentsOnView(view, ids, keep, removed_boxes(~keep, parts))


def segment_boxes(segments: torch.Tensor, count: int) -> bx.Box:
    """Bounding box of each segment: ``segments`` (X, Y, Z) long ids 0..count-1 → ((S, 3), (S, 3)),
    high exclusive, [0, 0) for an id that no voxel has."""
    lows, highs = [], []
    for axis in range(3):
        slabs = segments.movedim(axis, 0)
        present = torch.stack([torch.bincount(slab.flatten(), minlength=count)[:count] > 0 for slab in slabs], 1)
        position = torch.arange(present.shape[1], device=segments.device)
        lows.append(torch.where(present, position, present.shape[1]).amin(1))
        highs.append(torch.where(present, position + 1, 0).amax(1))
    low, high = torch.stack(lows, 1), torch.stack(highs, 1)
    gone = (high <= low).any(1, keepdim=True)
    return low.masked_fill(gone, 0), high.masked_fill(gone, 0)


class MaskedScorer:
    """Target scores of a volume with parts filled in, for any batch of perturbations (:class:`Masks`).

    Args:
        x: (1, C, X, Y, Z) the model input; ``fill``: the same shape, the values filled voxels take.
        speedups: which exact speed-ups to use.
        batch_size: masked inputs per call (default: from free memory; halved on out-of-memory).
    """

    def __init__(self, model: LoadedModel, x: torch.Tensor, fill: torch.Tensor, target: Target,
                 speedups: Speedups = Speedups(), batch_size: int | None = None) -> None:
        self.model, self.speedups = model, speedups
        started, passes_before = time.perf_counter(), model.passes.forward
        windowed = model.sliding_window is not None and model.sliding_window.needed(x.shape[2:])
        self.graph, self.slower_because = None, ""
        if speedups.crop or speedups.incremental or speedups.skip:
            try:
                self.graph = trace(model.network)
            except Exception as error:  # scripted or dynamic networks: forward passes instead
                self.slower_because = _reason(error)
                log.info("masking: network not traceable (%s); using whole forward passes", self.slower_because)
        splits = target.splits_over_windows  # else scored whole, through the model's own inference
        if windowed and not (speedups.reuse_windows and splits):
            # the model's own sliding-window inference for every masked volume
            self.views = [View((0, 0, 0), x, fill, target)]
            self.scorers = [ForwardScorer(model, self.views[0], infer=True)]
            if speedups.reuse_windows and not splits:
                self.slower_because = "a probability of blended sliding windows is scored on the whole volume"
        else:
            self.views = make_views(model, x, fill, target)
            self.scorers = [self._scorer(v, hold=len(self.views) == 1) for v in self.views]
        self.windows = {"used": len(self.views), "total": _window_count(x, model.sliding_window)} if windowed else None
        self.clean_score = sum(s.clean_score for s in self.scorers)
        #: Measured: seconds of one whole pass of a view (the clean passes above); a masked pass costs at
        #: most about this, so ``passes × seconds_per_pass`` bounds a run's time
        #: (see :func:`~xaioverlay.segments.check_duration`).
        self.seconds_per_pass = (time.perf_counter() - started) / max(1, model.passes.forward - passes_before)
        item_bytes = max(s.item_bytes for s in self.scorers)
        self.batch_size = batch_size or first_batch_size(x.device, item_bytes, self.engine)
        self.evaluated = self.skipped = self.reused = self.occluders_evaluated = 0

    def _scorer(self, view: View, hold: bool = True):
        if self.graph is not None:
            try:
                return IncrementalScorer(self.model, self.graph, view, self.speedups, hold)
            except Exception as error:  # an operation the tracer recorded but cannot replay
                self.slower_because = _reason(error)
                log.info("masking: incremental inference unavailable (%s); using whole forward passes",
                         self.slower_because)
                self.graph = None
        return ForwardScorer(self.model, view)

    @property
    def engine(self) -> str:
        return self.scorers[0].engine if self.scorers else "none"

    def reachable(self, masks: Masks) -> torch.Tensor:
        """(N,) True where a perturbation can change the target (always, unless skipping is on)."""
        reach = torch.zeros(masks.count, dtype=torch.bool, device=masks.parts()[0].device)
        for _, _, index, _ in self.plan(masks):
            reach[index] = True
        return reach

    def plan(self, masks: Masks, count: bool = False) -> list[tuple[object, ViewMasks, torch.Tensor, bx.Box]]:
        """Per view: its scorer, the batch as it sees it, the indices of the items that must be evaluated
        there and their boxes in its voxels.

        With ``count``, adds to :attr:`reused` the (item, window) pairs where the item misses the window
        and to :attr:`skipped` those where it meets the window but cannot reach the target."""
        work = []
        parts = masks.parts()
        for view, scorer in zip(self.views, self.scorers):
            local = view.local(parts)
            touched = ~bx.empty(local)
            reaching = touched
            if self.speedups.skip and len(touched):
                chunk = 4096
                reaching = touched & torch.cat([scorer.reaches((local[0][i:i + chunk], local[1][i:i + chunk]))
                                                for i in range(0, len(touched), chunk)])
            seen = masks.on_view(view, local, reaching)
            changed = ~bx.empty(seen.boxes)
            if count:
                met = changed if reaching is touched else ~bx.empty(masks.on_view(view, local, touched).boxes)
                self.reused += int((~met).sum())
                self.skipped += int((met & ~changed).sum())
            index = changed.nonzero().flatten()
            work.append((scorer, seen, index, (seen.boxes[0][index], seen.boxes[1][index])))
        return work

    def drops(self, masks: Masks, report: Callable[[int, int], None] = lambda done, total: None) -> torch.Tensor:
        """Clean score minus masked score for each perturbation: (N,) float64. ``report(done, total)``
        counts passes (one per item and view it changes)."""
        scores = torch.full((masks.count,), self.clean_score, dtype=torch.float64, device=masks.parts()[0].device)
        work = self.plan(masks, count=True)
        total = sum(len(index) for _, _, index, _ in work)
        if work:
            self.occluders_evaluated += int(torch.unique(torch.cat([index for _, _, index, _ in work])).numel())
        done = 0
        report(0, total)
        for scorer, seen, index, local in work:
            if not len(index):
                continue
            scorer.acquire()  # one view's clean pass in memory at a time
            try:
                start = 0
                while start < len(index):
                    stop = min(start + self.batch_size, len(index))
                    try:
                        values = scorer.scores((local[0][start:stop], local[1][start:stop]),
                                               seen.painter(index[start:stop]))
                    except Exception as error:
                        if not is_out_of_memory(error):
                            raise
                        self._halve(stop - start)
                        continue
                    scores.index_add_(0, index[start:stop], values.double() - scorer.clean_score)
                    done += stop - start
                    report(done, total)
                    start = stop
            finally:
                scorer.release()
        self.evaluated += total
        return self.clean_score - scores

    def _halve(self, tried: int) -> None:
        if tried <= 1:
            raise ModelError("out of memory even for one masked input; free memory, use --device cpu, "
                             "or a smaller volume")
        self.batch_size = max(1, tried // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("masking: out of memory; batch size halved to %d", self.batch_size)


def _reason(error: Exception) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0][:120]}" if text else type(error).__name__


class SegmentScorer:
    """The target's score when only some segments of the input are kept, the others filled.

    The contract every segment method (SHAP, LIME, ...) builds on::

        scorer = SegmentScorer(model, x, fill, target, segments)
        scorer.score(keep)   # keep: (B, S) bool → (B,) float64 target scores
        scorer.full_score    # every segment kept (the clean input); scorer.empty_score: none kept
        scorer.num_segments, scorer.passes
        check_duration(samples * scorer.views, scorer.seconds_per_pass, ...)  # xaioverlay.segments, before sampling

    Args:
        x: (1, C, X, Y, Z) the model input; ``fill``: the same shape, the values of filled voxels.
        segments: (X, Y, Z) long segment ids 0..S-1 on the model grid (see :mod:`xaioverlay.segments`).
    """

    def __init__(self, model: LoadedModel, x: torch.Tensor, fill: torch.Tensor, target: Target,
                 segments: torch.Tensor, speedups: Speedups = Speedups(), batch_size: int | None = None) -> None:
        if tuple(segments.shape) != tuple(x.shape[2:]):
            raise ValueError(f"segments {tuple(segments.shape)} are not on the model grid {tuple(x.shape[2:])}")
        with torch.inference_mode(), full_float32():
            self.masked = MaskedScorer(model, x, fill, target, speedups, batch_size)
        self.segments = segments.to(device=x.device, dtype=torch.long)
        self.num_segments = int(self.segments.max()) + 1
        self.boxes = segment_boxes(self.segments, self.num_segments)
        self._ids_by_view: dict = {}
        self._empty_score: float | None = None

    @property
    def full_score(self) -> float:
        """The target with every segment kept."""
        return float(self.masked.clean_score)

    @property
    def empty_score(self) -> float:
        """The target with every segment filled (evaluated once, on first use)."""
        if self._empty_score is None:
            none = torch.zeros((1, self.num_segments), dtype=torch.bool, device=self.segments.device)
            self._empty_score = float(self.score(none)[0])
        return self._empty_score

    @property
    def passes(self) -> int:
        """Masked network passes so far (one per coalition and sliding window it changes)."""
        return self.masked.evaluated

    @property
    def views(self) -> int:
        """Passes a coalition costs at most: the sliding windows that hold part of the target (1 otherwise)."""
        return len(self.masked.views)

    @property
    def seconds_per_pass(self) -> float:
        """Measured on this machine when the scorer was built (see :attr:`MaskedScorer.seconds_per_pass`)."""
        return self.masked.seconds_per_pass

    def score(self, keep: torch.Tensor, report: Callable[[int, int], None] = lambda done, total: None) -> torch.Tensor:
        """(B,) float64 target of the input with the segments where ``keep`` (B, S) is False filled."""
        if keep.ndim != 2 or keep.shape[1] != self.num_segments:
            raise ValueError(f"keep must be (B, {self.num_segments}), got {tuple(keep.shape)}")
        keep = keep.to(device=self.segments.device, dtype=torch.bool)
        masks = SegmentMasks(self.segments, self.boxes, keep, self._ids_by_view)
        with torch.inference_mode(), full_float32():
            return self.masked.clean_score - self.masked.drops(masks, report)

    def reachable_segments(self, chunk: int = 256) -> torch.Tensor:
        """(S,) bool: False where filling the segment cannot change the target in any coalition (it lies
        outside what the target reads through the receptive field, in every window used): a dummy player,
        whose Shapley value is 0 and whose removal from the game leaves the other values unchanged."""
        count, device = self.num_segments, self.segments.device
        reach = []
        for start in range(0, count, chunk):
            alone = torch.ones((min(chunk, count - start), count), dtype=torch.bool, device=device)
            alone[torch.arange(len(alone)), torch.arange(start, start + len(alone))] = False
            reach.append(self.masked.reachable(SegmentMasks(self.segments, self.boxes, alone, self._ids_by_view)))
        return torch.cat(reach)
