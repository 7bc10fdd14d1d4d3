"""A persistent engine process: JSON requests on stdin, JSON-line events on stdout.

The Slicer module runs it as ``PythonSlicer -m xaioverlay.worker`` (``python -m xaioverlay.worker``
works the same) so that Slicer stays responsive, models stay loaded between requests, and a run can
be cancelled. One request per line, one event per line, UTF-8 JSON.

Requests::

    {"id": "r1", "command": "describe", "model": PATH, "device": "auto"}
    {"id": "r2", "command": "explain", "model": PATH, "device": "auto", "amp": false,
     "model_options": {"folds": "0,1", "checkpoint": "final"},          # optional (nnU-Net folders)
     "inputs": [NRRD, ...], "methods": ["gradcam", ...], "target": "class:tumour" | null,
     "score": "logit", "layer": null, "out": DIR, "segmentation": true,
     "segments": "slic:256" | null,                                   # optional (perturbation methods)
     "evaluate": false, "reference_mask": NRRD | null, "metric_options": {...}}
    {"command": "cancel", "target_id": "r2"}          # that request only; no target_id: whatever is running
    {"command": "shutdown"}

Events (every event but ``ready`` carries the request's ``id``)::

    {"event": "ready", "pid": 1234, "version": "0.1.0", "protocol": 1}
    {"event": "message", "message": "Grad-CAM (1/3)", "stage": "method", ...}   # from Progress
    {"event": "progress", "method": "gradcam", "done": 1, "total": 1, "unit": "passes"}
    {"event": "described", "model": {...}, "methods": [...], "default_methods": [...]}
    {"event": "result", "out": DIR, "explanation": {... explanation.json ...}, "segmentation": FILE | null,
     "warnings": ["one line per condition the user must see, e.g. non-finite map values", ...]}
    {"event": "error", "message": "one line: problem and fix"}
    {"event": "cancelled"}

``explain`` writes its outputs with :func:`xaioverlay.outputs.write_outputs` (maps as NRRD on the first
input's exact grid, ``explanation.json`` last) and, for segmentation models when asked, the model's
predicted label map as ``segmentation.nrrd`` on the same grid. With ``"evaluate": true`` every map is
also measured by :func:`xaioverlay.metrics.evaluate.evaluate` (faithfulness, localisation against
``reference_mask`` or, for segmentation models, the model's own segmentation, sanity, complexity) and
each method's record in the result carries ``"metrics"``: {column title: value}, the columns of the
``xaioverlay evaluate`` table except the costs already in the record.

Cancel names one request and stops only that one: a request still waiting its turn is answered
``cancelled`` at once and never run; the running one stops at its next check, which comes at every
progress report (each sliding window, batch of occluders or IG steps, method) and before every pass
of the network (each window of the model's own sliding-window inference included; TorchScript
networks take no hooks, so for them only the reports check). A cancelled run writes nothing: it stops
before any output exists. Anything else printed by libraries goes to stderr, never into the event
stream.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import sys
import threading
import traceback
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Callable, TextIO

from . import __version__
from .errors import Cancelled, InputError, XAIOverlayError

log = logging.getLogger(__name__)

PROTOCOL = 1
SEGMENTATION_FILE = "segmentation.nrrd"
#: Columns of the metrics table already in every method's record (runtime, passes).
RECORDED_COSTS = ("method", "runtime_s", "forward_passes", "backward_passes")


def model_signature(path: Path) -> tuple:
    """What identifies a model's files on disk: (resolved path, (name, size, mtime) of every file)."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml", ".json"):
        files = sorted(p for p in path.parent.iterdir() if p.is_file())  # a spec names weights beside it
    return (str(path), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


class ModelCache:
    """Loaded models kept between requests (least recently used dropped beyond ``capacity``)."""

    def __init__(self, capacity: int = 2, loader: Callable | None = None) -> None:
        self.capacity = capacity
        self.loader = loader
        self.models: OrderedDict[tuple, object] = OrderedDict()

    def get(self, path: str, device: str = "auto", amp: bool = False, options: dict | None = None):
        from .model_files import resolve_model_path
        from .models import load_model

        path = str(resolve_model_path(path))  # a bundle's inference.json is the bundle: its weights count too
        options = {k: v for k, v in (options or {}).items() if v not in (None, "")}
        signature = model_signature(Path(path)) if Path(path).exists() else (path,)
        key = (signature, device, bool(amp), tuple(sorted(options.items())))
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key], True
        model = (self.loader or load_model)(path, device=device, amp=amp, **options)
        self.models[key] = model
        while len(self.models) > self.capacity:
            self.models.popitem(last=False)
        return model, False


def method_catalogue(model) -> list[dict]:
    """Every registered method, with whether this model allows it and, if not, why (one line)."""
    from .methods import REGISTRY

    catalogue = []
    for cls in REGISTRY.values():
        reason = cls.unavailable(model)
        catalogue.append({
            "name": cls.name, "label": cls.label, "signed": cls.signed, "summary": cls.summary,
            "needs_internals": cls.needs_internals, "allowed": reason is None, "reason": reason,
            "spec": getattr(cls, "demo_spec", cls.name),
        })
    return catalogue


class CancelCheck:
    """A forward pre-hook raising :class:`Cancelled` once the worker's running request is cancelled.
    Copies of the network (the randomisation check copies it) share it rather than copy the worker."""

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker

    def __call__(self, module, inputs) -> None:
        self.worker.check_cancelled()

    def __deepcopy__(self, memo) -> "CancelCheck":
        return self


class Worker:
    """Runs requests one at a time and reports through ``send`` (one JSON-ready dict per event)."""

    def __init__(self, send: Callable[[dict], None], models: ModelCache | None = None) -> None:
        self.send = send
        self.models = models or ModelCache()
        self.cancelled = threading.Event()  # the running request's
        self._checked: weakref.WeakSet = weakref.WeakSet()  # networks that check it before every pass

    def check_cancelled(self) -> None:
        """Raise :class:`Cancelled` when the running request was cancelled."""
        if self.cancelled.is_set():
            raise Cancelled("cancelled by the user")

    def _check_every_pass(self, network) -> None:
        """Check for cancel before each pass of ``network``: long steps that report nothing (the model's
        own sliding-window inference, one LRP backward pass) stop at their next window or pass."""
        if network in self._checked:
            return
        try:
            network.register_forward_pre_hook(CancelCheck(self))
        except RuntimeError:  # TorchScript takes no hooks: its runs stop at the next progress report
            pass
        self._checked.add(network)

    def handle(self, request: dict, cancelled: threading.Event) -> None:
        """Run one request; every outcome (result, error, cancelled) ends in exactly one event."""
        rid = request.get("id")
        command = request.get("command")
        self.cancelled = cancelled
        try:
            if command == "explain":
                self.explain(request, cancelled)
            elif command == "describe":
                self.describe(request)
            else:
                raise XAIOverlayError(f"unknown command {command!r}; use describe, explain, cancel or shutdown")
        except Cancelled:
            self.send({"event": "cancelled", "id": rid})
        except XAIOverlayError as error:
            self.send({"event": "error", "id": rid, "message": str(error)})
        except Exception as error:  # a bug: report it, keep serving, leave the traceback on stderr
            traceback.print_exc(file=sys.stderr)
            self.send({"event": "error", "id": rid, "message": f"internal error ({type(error).__name__}: {error}); see the worker log"})

    def _model(self, request: dict, report: Callable[[dict], None]):
        if not request.get("model"):
            raise XAIOverlayError("no model given; choose a MONAI bundle folder, a spec (.yaml/.json) or a TorchScript file")
        model, cached = self.models.get(request["model"], request.get("device", "auto"),
                                        bool(request.get("amp", False)), request.get("model_options"))
        self._check_every_pass(model.network)
        if not cached:
            report({"event": "message", "message": f"loaded {model.model_id}", "stage": "model"})
        return model

    def describe(self, request: dict) -> None:
        from .demo import demo_methods

        rid = request.get("id")
        model = self._model(request, lambda event: self.send({**event, "id": rid}))
        self.send({
            "event": "described", "id": rid, "model": model.describe(),
            "methods": method_catalogue(model), "default_methods": demo_methods(model),
        })

    def explain(self, request: dict, cancelled: threading.Event) -> None:
        from .explain import explain
        from .models import SEGMENTATION
        from .outputs import prepare_output_folder, write_outputs
        from .progress import Progress
        from .volumes import read_volumes, write_volume

        rid = request.get("id")

        def report(event: dict) -> None:
            self.check_cancelled()
            self.send({**event, "id": rid})

        for key in ("inputs", "methods", "out"):
            if not request.get(key):
                raise XAIOverlayError(f"explain request without {key!r}; the module sends inputs, methods and out")
        out = prepare_output_folder(request["out"])
        model = self._model(request, report)
        volumes = read_volumes(request["inputs"])
        report({"event": "message", "message": "reading inputs done", "stage": "inputs"})
        methods, target = list(request["methods"]), request.get("target")
        score, layer = request.get("score", "logit"), request.get("layer") or None
        metrics = None
        if request.get("evaluate"):
            explanation, metrics = self.evaluate(model, volumes, methods, target, score, layer, request,
                                                 Progress(report))
        else:
            explanation = explain(model, volumes, methods, target, score=score, layer=layer,
                                  segments=request.get("segments") or None, progress=Progress(report))
        self.check_cancelled()
        segmentation = None
        if request.get("segmentation") and model.task == SEGMENTATION:
            # the label map of the inference the explanation resolved its target on: no second run
            # before explanation.json, which completes the set
            write_volume(explanation.segmentation(), out / SEGMENTATION_FILE)
            segmentation = str(out / SEGMENTATION_FILE)
        write_outputs(explanation, out, montage=bool(request.get("montage", False)))
        record = json.loads((out / "explanation.json").read_text(encoding="utf-8"))
        for method, measured in zip(record["methods"], metrics or []):
            method["metrics"] = measured
        self.send({"event": "result", "id": rid, "out": str(out), "explanation": record, "segmentation": segmentation,
                   "warnings": explanation.warnings()})

    def evaluate(self, model, volumes, methods, target, score, layer, request, progress):
        """Explain and measure; returns (the explanation, one {column title: value} per method)."""
        from .metrics.evaluate import MetricOptions, columns, evaluate
        from .volumes import read_volume

        reference = read_volume(request["reference_mask"]) if request.get("reference_mask") else None
        given = request.get("metric_options") or {}
        known = {f.name for f in dataclasses.fields(MetricOptions)}
        if set(given) - known:
            raise InputError(f"unknown metric option(s) {', '.join(sorted(set(given) - known))}; known: {', '.join(sorted(known))}")
        evaluation = evaluate(model, volumes, methods, target, score=score, layer=layer,
                              segments=request.get("segments") or None, reference_mask=reference,
                              reference_from_model=reference is None, options=MetricOptions(**given), progress=progress)
        rows = evaluation.rows()
        table = [column for column in columns(rows) if column.key not in RECORDED_COSTS]
        return evaluation.explanation, [{c.title: row[c.key] for c in table if c.key in row} for row in rows]


def serve(requests: TextIO, replies: TextIO, worker: Worker | None = None) -> int:
    """Serve requests from ``requests`` until ``shutdown`` or end of input; returns the exit status."""
    lock = threading.Lock()

    def send(event: dict) -> None:
        line = json.dumps(event, default=str)
        with lock:
            replies.write(line + "\n")
            replies.flush()

    worker = worker or Worker(send)
    worker.send = send
    pending: queue.Queue = queue.Queue()
    # the running request's id and cancel flag; requests read but not started; those cancelled before their turn
    state = {"id": None, "cancelled": threading.Event(), "queued": set(), "skip": set()}
    state_lock = threading.Lock()

    def cancel(target) -> None:
        with state_lock:
            if target is None or target == state["id"]:
                state["cancelled"].set()
            elif target in state["queued"]:  # not started: answered now, dropped when its turn comes
                state["queued"].discard(target)
                state["skip"].add(target)
                send({"event": "cancelled", "id": target})
            # otherwise it has finished already (its final event is on its way): nothing to stop

    def read() -> None:
        for line in requests:
            line = line.strip()
            if not line:
                continue
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError:
                send({"event": "error", "id": None, "message": f"cannot read request {line[:80]!r}; send one JSON object per line"})
                continue
            command = request.get("command")
            if command == "cancel":
                cancel(request.get("target_id"))
            elif command == "shutdown":
                with state_lock:
                    state["cancelled"].set()
                break
            else:
                with state_lock:
                    state["queued"].add(request.get("id"))
                pending.put(request)
        pending.put(None)

    threading.Thread(target=read, name="xaioverlay-requests", daemon=True).start()
    send({"event": "ready", "pid": os.getpid(), "version": __version__, "protocol": PROTOCOL})
    while True:
        request = pending.get()
        if request is None:
            return 0
        with state_lock:
            if request.get("id") in state["skip"]:  # answered when it was cancelled
                state["skip"].discard(request.get("id"))
                continue
            state["queued"].discard(request.get("id"))
            state["id"] = request.get("id")
            state["cancelled"] = cancelled = threading.Event()
        worker.handle(request, cancelled)
        with state_lock:
            state["id"] = None


def main() -> int:
    # The event stream gets its own copy of stdout; anything else that prints (libraries, C code)
    # lands on stderr, where the module keeps the last lines to explain a crash.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"monai\.")
    level = logging.INFO if os.environ.get("XAIOVERLAY_WORKER_VERBOSE") else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    return serve(sys.stdin, replies)


if __name__ == "__main__":
    sys.exit(main())
