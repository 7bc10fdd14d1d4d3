"""The module's logic without Qt: explain volumes, put the maps into the scene, compare, click through cases.

Work goes to the engine worker (:mod:`xaioverlay.worker`) through a :class:`WorkerClient`; the GUI calls
:meth:`OverlayLogic.process_events` from a timer (scripts and tests call :meth:`OverlayLogic.wait`).
No call waits: reading the model, hashing and writing volumes (on a background thread that sees copies
of the voxels, never MRML) and the worker's answers all come back through ``process_events``, and
threshold changes from a slider are applied there too, once per tick, with the last value.
Nodes are made only there, on the caller's thread, and only from complete results: a cancelled or
failed run changes nothing in the scene. Results are cached on disk (:mod:`.cache`), so a revisit,
or a case explained in the background before it was opened, shows at once.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import slicer

from . import cases as case_list
from . import colours, compare, nodes
from .cache import MapCache, cache_key, model_fingerprint, segmentation_key
from .target_spec import TargetChoice, build_target, segment_mask_file
from .worker_client import WorkerClient

log = logging.getLogger(__name__)

#: Outline colours of the model's segments (cyan first): apart from the heat and signed tables' colours.
SEGMENT_COLOURS = ((0.0, 0.85, 1.0), (0.55, 1.0, 0.35), (1.0, 0.4, 1.0), (1.0, 1.0, 1.0))


@dataclass
class ExplainRequest:
    """What the user asked for (the GUI's parameters, as plain values)."""

    volumes: list  # volume nodes in the model's channel order; the first is the anatomy
    model: str
    methods: list[str]
    target: TargetChoice = field(default_factory=TargetChoice)
    score: str = "logit"
    layer: str = ""
    device: str = "auto"
    evaluate: bool = False  # measure every map (xaioverlay.metrics): faithfulness, localisation, sanity
    reference: object = None  # segmentation node for localisation (None: the model's own segmentation)
    amp: bool = False  # mixed precision on CUDA
    model_options: dict = field(default_factory=dict)  # nnU-Net folders: {"folds": "0,1"}
    segments: str = ""  # features of perturbation methods (xaioverlay.segments), "" for each method's own


_JOB_NUMBERS = itertools.count(1)


@dataclass
class Job:
    """One explanation in progress (or done). ``maps`` holds the map node IDs by method spec."""

    methods: list[str]
    keys: dict[str, str]
    model: str
    target_text: str
    reference_mask: str | None = None
    volume_id: str | None = None
    case: case_list.Case | None = None
    background: bool = False
    request_id: str | None = None
    workdir: Path | None = None
    sent: list[str] = field(default_factory=list)
    segmentation_key: str | None = None
    maps: dict[str, str] = field(default_factory=dict)
    segmentation_id: str | None = None
    state: str = "preparing"  # preparing, running, cancelling, done, failed, cancelled
    error: str = ""
    warnings: list[str] = field(default_factory=list)  # from the worker's result, e.g. non-finite map values
    status: str = ""  # one line for the progress bar: the current stage or method, and its passes
    stage: str = ""
    progress: tuple[int, int, str] = (0, 0, "")
    started: float = field(default_factory=time.monotonic)
    id: str = field(default_factory=lambda: f"j{next(_JOB_NUMBERS)}")  # the worker request's id too, once sent

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


def measurement(request: ExplainRequest, anatomy, folder: Path | None) -> tuple[str | None, str]:
    """(reference mask file or None, text naming the measurement for the cache) of a request."""
    if not request.evaluate:
        return None, ""
    if request.reference is None:
        return None, "measured:model-segmentation"
    path, digest = segment_mask_file(request.reference, [], anatomy, Path(folder) / "reference_mask.nrrd")
    return str(path), f"measured:{digest}"


def cache_keys(request: ExplainRequest, info: dict, digest: str, target_text: str,
               measured: str) -> tuple[dict[str, str], str | None]:
    """The cache keys of a request's maps (by method spec) and of the model's segmentation (None for a
    classifier), for an input of content ``digest`` and a model described by ``info``."""
    fingerprint = model_fingerprint(request.model, request.model_options)
    device = request.device if request.device != "auto" else info.get("device", "auto")  # "auto" as resolved
    run = {"device": device, "amp": request.amp}
    keys = {spec: cache_key(digest, fingerprint, f"{spec} segments={request.segments}" if request.segments else spec,
                            target_text, request.score, request.layer, measured, **run)
            for spec in request.methods}
    return keys, segmentation_key(digest, fingerprint, **run) if info["task"] == "segmentation" else None


def model_path(parameters) -> str:
    """The chosen model (a file picked inside a bundle stands for the bundle), or a one-line error when
    none is chosen (an unset path reads as ".")."""
    from xaioverlay.model_files import resolve_model_path

    path = str(parameters.modelPath)
    if path in ("", "."):
        raise ValueError("choose a model first: an nnU-Net trained-model folder, a MONAI bundle folder, a spec file "
                         "(.yaml/.json) or a TorchScript file")
    return str(resolve_model_path(path))


def request_from_parameters(parameters) -> ExplainRequest:
    """The module's parameter node (``XAIOverlayParameterNode``) → a plain request."""
    volumes = [v for v in (parameters.inputVolume, parameters.channel2Volume, parameters.channel3Volume) if v]
    segmentation, segment_id = parameters.targetSegmentation, ""
    if segmentation and parameters.targetSegment:
        segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(parameters.targetSegment)
        if not segment_id:
            raise ValueError(f"segment {parameters.targetSegment!r} not found in {segmentation.GetName()!r}; check its name")
    target = TargetChoice(key=parameters.targetClass, region=parameters.targetRegion.value, segmentation=segmentation,
                          segment_id=segment_id, roi=parameters.targetROI, point=parameters.targetPoint,
                          radius_mm=parameters.targetRadius)
    methods = [spec.strip() for spec in parameters.methods.split(",") if spec.strip()]
    return ExplainRequest(volumes, model_path(parameters), methods, target, parameters.score.value,
                          parameters.camLayer.strip(), parameters.device.value, parameters.measureQuality,
                          parameters.referenceSegmentation, model_options(parameters),
                          segments=parameters.segments.strip())


def model_options(parameters) -> dict:
    """Format options of the module's parameters (only nnU-Net folders take any: the folds)."""
    folds = (parameters.nnunetFolds or "").replace(" ", "")
    return {"folds": folds} if folds else {}


def unavailable_methods(methods: list[str], info: dict) -> list[str]:
    """The method specs the engine does not know or the model does not allow (e.g. CAMs on TorchScript)."""
    allowed = {method["name"] for method in info["methods"] if method["allowed"]}
    return [spec for spec in methods if spec.split(":")[0] not in allowed]


def model_display_name(path: str) -> str:
    """``…/tumour_classifier`` → ``tumour_classifier``; ``…/net.yaml`` → ``net``."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


class OverlayLogic:
    """Everything the module does, given a scene and, where there are views, Slicer's layout node,
    application logic (to fit the views) and volume rendering logic."""

    def __init__(self, scene, *, client: WorkerClient | None = None, cache_root: str | Path | None = None,
                 layout_node=None, application_logic=None, volume_rendering_logic=None) -> None:
        self.scene = scene
        self.application_logic = application_logic
        self.client = client or WorkerClient()
        self.cache = MapCache(cache_root or Path(tempfile.gettempdir()) / "XAIOverlay-cache")
        self.layout_node = layout_node
        self.volume_rendering_logic = volume_rendering_logic
        self.percentile = 95.0
        self.opacity = 0.6
        self.orientation = "Axial"
        self.prefetch_next = True
        self.jobs: dict[str, Job] = {}
        self.models: dict[str, dict] = {}  # model fingerprint → the worker's description
        self._describing: dict[str, str] = {}  # describe request id → model fingerprint
        self._waiting: dict[str, list[tuple]] = {}  # model fingerprint → (then, failed) callbacks
        self._background = ThreadPoolExecutor(1, thread_name_prefix="xaioverlay-prepare")
        self._tasks: list[tuple] = []  # (future, job, then) of work on the background thread
        self._cleanups: list = []  # futures of finished jobs' folders being removed
        self._restyle: list | None = None  # maps to restyle at the next process_events (None: none)
        self._levels: dict = {}  # each map's limit and thresholds, computed once (colours.map_levels)
        self.browser: case_list.CaseBrowser | None = None
        self.last_request: ExplainRequest | None = None
        self.last_job: Job | None = None
        self.pinned: set[str] = set()  # IDs of case volumes kept when moving to another case
        self.compare_tags: list[str] = []
        self.requests_sent = 0  # explain requests sent to the worker (a page shows it: stored maps send none)

    # --- the model ---------------------------------------------------------------------------------
    def describe(self, model: str, device: str = "auto", then: Callable[[dict], None] | None = None,
                 failed: Callable[[str], None] | None = None, options: dict | None = None) -> dict | None:
        """The model's description (task, class names, methods it allows), asked of the worker once per model.

        Never waits: when the description is known it is returned (and ``then(info)`` called at once);
        otherwise the worker is asked and None returned, and :meth:`process_events` calls ``then(info)``
        when the answer arrives, or ``failed(message)`` if the model cannot be read.
        """
        fingerprint = model_fingerprint(model, options)  # nnU-Net folds are part of the model's identity
        if fingerprint in self.models:
            if then is not None:
                then(self.models[fingerprint])
            return self.models[fingerprint]
        waiting = self._waiting.setdefault(fingerprint, [])
        waiting.append((then, failed))
        if len(waiting) == 1:  # the first to ask sends the request; the others wait for the same answer
            request_id = self.client.send({"command": "describe", "model": str(model), "device": device,
                                           "model_options": options or {}})
            self._describing[request_id] = fingerprint
        return None

    def _described(self, event: dict) -> None:
        """The worker's answer to a describe request: call whoever waits for it."""
        if event.get("event") not in ("described", "error", "died", "cancelled"):
            return  # "loaded <model>" and the like
        fingerprint = self._describing.pop(event["id"])
        waiting = self._waiting.pop(fingerprint, [])
        if event["event"] == "described":
            self.models[fingerprint] = answer = {**event["model"], "methods": event["methods"],
                                                 "default_methods": event["default_methods"]}
        else:
            answer = event.get("message") or "the worker stopped before reading the model"
            log.warning("cannot read the model: %s", answer)
        for then, failed in waiting:
            callback = then if event["event"] == "described" else failed
            try:
                if callback is not None:
                    callback(answer)
            except Exception:  # noqa: BLE001 - one waiter's error must not keep the answer from the others
                log.exception("handling the model's description failed")

    # --- explaining --------------------------------------------------------------------------------
    def explain(self, request: ExplainRequest) -> Job:
        """Start explaining and return at once; :meth:`process_events` moves the job along.

        Its steps: the model's description (asked once per model), the target and a copy of the inputs'
        voxels (main thread), their hash for the cache key (background thread), the cached maps into the
        scene, the inputs written (background thread) and sent to the worker for the rest. Cached maps
        appear as soon as the inputs are hashed; an error at any step fails the job with its message.
        """
        if not request.volumes or request.volumes[0] is None:
            raise ValueError("no input volume; choose the volume to explain")
        if not request.methods:
            raise ValueError("no method chosen; choose at least one method to compute")
        anatomy = request.volumes[0]
        job = Job(list(request.methods), {}, str(request.model), "", volume_id=anatomy.GetID(),
                  status="reading the model")
        self.jobs[job.id] = job
        self.last_request = request
        self.last_job = job
        self.describe(request.model, request.device, options=request.model_options,
                      then=lambda info: self._step(job, self._prepare, job, request, info),
                      failed=lambda message: self._step(job, self._fail, job, message))
        return job

    def _fail(self, job: Job, message: str) -> None:
        self._finish(job, "failed", message)

    def _prepare(self, job: Job, request: ExplainRequest, info: dict) -> None:
        """Main thread: what needs the scene (the target's nodes, a copy of the inputs' voxels)."""
        refused = unavailable_methods(request.methods, info)
        if refused:
            allowed = sorted(method["name"] for method in info["methods"] if method["allowed"])
            names = {spec.split(":")[0] for spec in refused}
            reasons = "".join(f" ({m['name']}: {m['reason']})" for m in info["methods"]
                              if m["name"] in names and m.get("reason"))
            raise ValueError(f"method(s) {', '.join(refused)} unknown or not available for this model{reasons}; "
                             f"choose from {', '.join(allowed)}")
        anatomy = self.scene.GetNodeByID(job.volume_id)
        if anatomy is None:
            raise ValueError("the input volume was removed from the scene; choose the volume to explain")
        target = replace(request.target, task=info["task"])
        job.workdir = workdir = Path(tempfile.mkdtemp(prefix="xaioverlay-job-"))
        target_spec, target_text = build_target(target, anatomy, workdir)
        job.reference_mask, measured = measurement(request, anatomy, workdir)
        job.target_text = target_text
        job.status = "reading the inputs"
        snapshots = [nodes.snapshot(volume) for volume in request.volumes]
        self._in_background(job, lambda: nodes.combine_digests([s.digest() for s in snapshots]),
                            lambda digest: self._keyed(job, request, info, digest, snapshots, target_spec, measured))

    def _keyed(self, job: Job, request: ExplainRequest, info: dict, digest: str, snapshots: list,
               target_spec: str | None, measured: str) -> None:
        """Main thread, once the inputs are hashed: adopt a background run, show cached maps, send the rest."""
        target_text = job.target_text
        keys, job.segmentation_key = cache_keys(request, info, digest, target_text, measured)
        job.keys = keys
        if self._adopt_background(job):
            return
        self._cancel_background()
        anatomy = self.scene.GetNodeByID(job.volume_id)
        if anatomy is None:
            raise ValueError("the input volume was removed from the scene; choose the volume to explain")
        for spec in request.methods:
            cached = self.cache.get(keys[spec])
            if cached is not None:
                job.maps[spec] = self._map_node(anatomy, spec, cached, request.model, target_text).GetID()
        if job.segmentation_key and self.cache.get(job.segmentation_key):
            job.segmentation_id = self._segmentation_node(anatomy, self.cache.get(job.segmentation_key), request.model).GetID()
        missing = [spec for spec in request.methods if spec not in job.maps]
        if not missing:
            self._finish(job, "done", "all maps from the cache")
            return
        job.status = "writing the inputs"
        def write() -> list[str]:  # background thread: files only
            return [str(s.write(job.workdir / f"input_{n}.nrrd")) for n, s in enumerate(snapshots)]

        self._in_background(job, write, lambda inputs: self._send(job, inputs, missing, target_spec, request))

    def _send(self, job: Job, inputs: list[str], methods: list[str], target_spec: str | None, request: ExplainRequest) -> None:
        job.sent = list(methods)
        self.requests_sent += 1
        job.state = "running"
        job.status = "starting the worker" if not self.client.running else "queued"
        job.request_id = self.client.send({
            "id": job.id,
            "command": "explain", "model": str(request.model), "device": request.device, "inputs": inputs,
            "model_options": request.model_options,
            "methods": methods, "target": target_spec, "score": request.score, "layer": request.layer or None,
            "out": str(job.workdir / "out"), "segmentation": bool(job.segmentation_key),
            "evaluate": bool(request.evaluate), "reference_mask": job.reference_mask, "amp": bool(request.amp),
            "segments": request.segments or None,
        })

    def show_stored(self, volume, stored: dict, model: str, target_text: str) -> Job:
        """A finished job showing maps computed elsewhere (a cohort's case folder), by spec as
        :class:`CachedMap` entries: their nodes are made as cached maps' are; nothing is computed."""
        job = Job(list(stored), {}, str(model), target_text, volume_id=volume.GetID(), state="done",
                  status="stored maps (nothing computed)")
        for spec, cached in stored.items():
            job.maps[spec] = self._map_node(volume, spec, cached, str(model), target_text).GetID()
        self.last_job = job
        return job

    def prefetch(self, case: case_list.Case, template: ExplainRequest) -> Job | None:
        """Compute a case's maps in the background (cache only, no nodes); None when nothing to do.

        Only single-volume requests whose target needs no node of the current case (a class, or a
        channel over the model's predicted region), for a model already described, can be prepared
        ahead. The case is hashed (and, for a case in the scene, written) on the background thread.
        """
        if len(template.volumes) != 1 or template.reference is not None:
            return None
        if any(job.background for job in self.jobs.values() if not job.finished):
            return None  # one background run at a time; checked before any hashing
        info = self.models.get(model_fingerprint(template.model, template.model_options))
        if info is None:
            return None  # described before any explanation finishes; never asked for here
        target = replace(template.target, task=info["task"])  # the request's own task is not known before
        if target.needs_region_node:
            return None
        volume = self.scene.GetNodeByID(case.node_id) if case.node_id else None
        if case.from_scene and volume is None:
            return None
        target_spec, target_text = build_target(target, None, None)  # a class or the predicted region: no file
        _, measured = measurement(template, None, None)
        job = Job(list(template.methods), {}, str(template.model), target_text, case=case, background=True,
                  workdir=Path(tempfile.mkdtemp(prefix="xaioverlay-prefetch-")), status="preparing the next case")
        self.jobs[job.id] = job
        # a file case not loaded yet is known by its file's digest, as its node will be once loaded
        source = nodes.snapshot(volume) if volume is not None else None

        def prepare() -> tuple:  # background thread: files and hashes only
            digest = nodes.combine_digests([source.digest() if source is not None else case.file_digest()])
            keys, segmentation = cache_keys(template, info, digest, target_text, measured)
            missing = [spec for spec in template.methods if self.cache.get(keys[spec]) is None]
            written = source is not None and missing
            inputs = [str(source.write(job.workdir / "input_0.nrrd")) if written else str(case.path)]
            return keys, missing, inputs, segmentation

        def send(prepared) -> None:
            job.keys, missing, inputs, job.segmentation_key = prepared
            if not missing:
                self._finish(job, "done", "all maps in the cache already")
            else:
                self._send(job, inputs, missing, target_spec, template)

        self._in_background(job, prepare, send)
        return job

    def _adopt_background(self, job: Job) -> bool:
        """A background run computing exactly these maps becomes this job's run (no second request)."""
        for running in list(self.jobs.values()):
            if (running.background and running.state == "running" and running is not job
                    and all(running.keys.get(s) == k for s, k in job.keys.items())):
                shutil.rmtree(job.workdir, ignore_errors=True)
                for name in ("request_id", "sent", "workdir", "segmentation_key", "state", "status", "stage",
                             "progress"):
                    setattr(job, name, getattr(running, name))
                running.workdir = None
                self.jobs.pop(running.id, None)
                return True
        return False

    def _cancel_background(self) -> None:
        for job in list(self.jobs.values()):
            if job.background and not job.finished:
                self.cancel(job)

    def cancel(self, job: Job) -> None:
        """Stop a job, and only that job; nothing it would have made appears (the worker writes nothing partial)."""
        if job.finished:
            return
        if job.request_id is None:  # still being prepared: it never reaches the worker
            self._finish(job, "cancelled", "cancelled")
            return
        job.state = "cancelling"
        job.status = "cancelling"
        self.client.cancel(job.request_id)

    # --- events ------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True while :meth:`process_events` has something to do (jobs, a model being read, a restyle)."""
        return bool(self.jobs or self._describing or self._tasks or self._restyle is not None)

    def process_events(self, timeout: float = 0.0) -> list[Job]:
        """Move everything along: finished background steps, the worker's events, a pending restyle.
        Returns the jobs that changed. Call it from a timer; it waits at most ``timeout`` seconds."""
        changed: list[Job] = []

        def note(job: Job | None) -> None:
            if job is not None and job not in changed:
                changed.append(job)

        for task in [task for task in self._tasks if task[0].done()]:
            self._tasks.remove(task)
            future, job, then = task
            if future.exception() is not None:
                self._step(job, self._fail, job, str(future.exception()))
            else:
                self._step(job, then, future.result())
            note(job)
        for event in self.client.poll(timeout if not self._tasks else min(timeout, 0.05)):
            if event.get("id") in self._describing:
                self._described(event)
                continue
            note(self._handle(event))
        if self._restyle is not None:
            self._apply_percentile()
        self._cleanups = [cleanup for cleanup in self._cleanups if not cleanup.done()]
        return changed

    def wait(self, job: Job, timeout: float = 600.0) -> Job:
        """Process events until ``job`` has finished (scripts, tests, the module's self-test)."""
        deadline = time.monotonic() + timeout
        while not job.finished:
            if time.monotonic() > deadline:
                raise TimeoutError(f"explanation not finished within {timeout:.0f} s ({job.status})")
            self.process_events(0.1)
        for cleanup in self._cleanups:  # its folder is gone too when this returns
            cleanup.result()
        self._cleanups.clear()
        return job

    def _in_background(self, job: Job, work: Callable, then: Callable) -> None:
        """Run ``work()`` on the background thread (it must not touch the scene: copies and files only);
        :meth:`process_events` then calls ``then(result)`` on the main thread, or fails the job."""
        self._tasks.append((self._background.submit(work), job, then))

    def _step(self, job: Job, step: Callable, *args) -> None:
        """One main-thread step of a job (skipped once it has finished, e.g. was cancelled while being
        prepared); an error fails the job with its one-line message."""
        if job.finished:
            return
        try:
            step(*args)
        except Exception as error:  # noqa: BLE001 - shown to the user, never swallowed
            if not isinstance(error, (ValueError, OSError)):
                log.exception("preparing the explanation failed")
            if not job.finished:
                self._finish(job, "failed", str(error))

    def _handle(self, event: dict) -> Job | None:
        kind = event.get("event")
        rid = event.get("id")
        job = next((job for job in self.jobs.values() if job.request_id is not None and job.request_id == rid), None)
        if kind == "died" and job is None:
            log.warning(event.get("message"))
            return None
        if job is None:
            return None
        if kind == "message":
            job.stage = job.status = event.get("message", "")
        elif kind == "progress":
            job.progress = (int(event.get("done", 0)), int(event.get("total", 0)), event.get("unit", ""))
            done, total, unit = job.progress
            job.status = f"{job.stage or event.get('method', '')} · {done}/{total} {unit}"
        elif kind == "result":  # stored in the cache on the background thread, then shown
            job.warnings = [str(line) for line in event.get("warnings") or []]
            for line in job.warnings:
                log.warning(line)
            job.status = "loading the maps"
            self._in_background(job, lambda: self._store_result(job, event),
                                lambda stored: self._show_result(job, *stored))
        elif kind == "cancelled":
            return self._finish(job, "cancelled", "cancelled")
        elif kind in ("error", "died"):
            return self._finish(job, "failed", event.get("message", "the worker failed"))
        return job

    def _finish(self, job: Job, state: str, status: str) -> Job:
        job.state = state
        job.status = status
        if state == "failed":
            job.error = status
        self.jobs.pop(job.id, None)
        if job.workdir is not None:  # removed on the background thread, after what it may still write there
            self._cleanups.append(self._background.submit(shutil.rmtree, job.workdir, True))
        if state == "done" and not job.background:
            self._prefetch_after(job)
        return job

    def _store_result(self, job: Job, event: dict) -> tuple:
        """Background thread: the worker's maps (and segmentation) into the cache; files only."""
        try:
            record = event["explanation"]
            out = Path(event["out"])
            run = {key: record.get(key) for key in ("model", "target", "output", "created", "xaioverlay_version")}
            stored = {}
            for spec, method in zip(job.sent, record["methods"]):
                record_of_map = {**method, **run, "request_spec": spec}
                segments = out / method["segments"]["file"] if "segments" in method else None
                stored[spec] = self.cache.put(job.keys[spec], out / method["file"], record_of_map, segments)
            segmentation = None
            if event.get("segmentation") and job.segmentation_key:
                model = {"model": record.get("model")}
                segmentation = self.cache.put(job.segmentation_key, event["segmentation"], model)
        except Exception as error:
            log.exception("could not store the results")
            raise OSError(f"could not load the results: {error}") from error
        return stored, segmentation

    def _show_result(self, job: Job, stored: dict, segmentation) -> None:
        """Main thread: the stored maps into the scene (unless the job ran in the background)."""
        anatomy = self.scene.GetNodeByID(job.volume_id) if job.volume_id and not job.background else None
        try:
            if anatomy is not None:  # None: the case was closed meanwhile, the maps stay in the cache only
                for spec in job.methods:
                    cached = stored.get(spec) or self.cache.get(job.keys[spec])
                    if cached is not None:
                        job.maps[spec] = self._map_node(anatomy, spec, cached, job.model, job.target_text).GetID()
                if segmentation is not None:
                    job.segmentation_id = self._segmentation_node(anatomy, segmentation, job.model).GetID()
        except Exception as error:
            log.exception("could not load the results")
            raise OSError(f"could not load the results: {error}") from error
        self._finish(job, "done", f"done in {time.monotonic() - job.started:.1f} s")

    def _prefetch_after(self, job: Job) -> None:
        if not self.prefetch_next or self.browser is None or self.last_request is None:
            return
        following = self.browser.peek(+1)
        if following is None:
            return
        try:
            self.prefetch(following, self.last_request)
        except Exception as error:  # noqa: BLE001 - background work must not break the foreground
            log.warning("could not prepare %s in the background: %s", following.name, error)

    # --- nodes -------------------------------------------------------------------------------------
    def _map_node(self, anatomy, spec: str, cached, model: str, target_text: str):
        """The scene node for a cached map: the same node if it already shows this map, else (re)loaded.

        One node per (volume, model, method spec, target): running again replaces its content in
        place; nodes the module did not make are never touched.
        """
        record = cached.record
        identity = cache_key(anatomy.GetID(), model_fingerprint(model), spec, target_text)
        existing = nodes.owned_nodes(self.scene, nodes.MAP, identity=identity)
        node = existing[0] if existing else None
        if node is not None and nodes.attribute(node, "key") == cached.key:
            node.SetAndObserveTransformNodeID(anatomy.GetTransformNodeID())
            return node
        if node is None:
            node = slicer.vtkMRMLScalarVolumeNode()
            node.SetName(map_name(anatomy, record))
            nodes.read_volume_file(cached.path, node)
            self.scene.AddNode(node)
        else:
            nodes.read_volume_file(cached.path, node)
        node.SetAndObserveTransformNodeID(anatomy.GetTransformNodeID())
        nodes.set_attributes(
            node, role=nodes.MAP, source=anatomy.GetID(), identity=identity, key=cached.key,
            method=record.get("method", ""), label=record.get("label", ""), spec=spec,
            parameters=record.get("parameters", {}), target=record.get("target", {}),
            model=(record.get("model") or {}).get("id", ""), runtime_s=record.get("runtime_s", ""),
            passes=record.get("passes", {}), signed=bool(record.get("signed")), record=record,
        )
        colours.style_map(self.scene, node, bool(record.get("signed")), self.percentile, self._levels)
        folder = nodes.xai_folder(self.scene, anatomy, model_display_name(model))
        nodes.place_in_folder(self.scene, node, folder)
        self._segments_node(anatomy, node, cached, folder)
        return node

    def _segments_node(self, anatomy, map_node, cached, folder: int) -> None:
        """The segments a perturbation map was computed over, as outlines (one segmentation node per map,
        replaced with it); its ID is the map node's ``segments`` attribute."""
        old = nodes.owned_nodes(self.scene, nodes.SEGMENTS, map=map_node.GetID())
        nodes.remove_nodes(self.scene, old)
        if cached.segments is None:
            map_node.RemoveAttribute(f"{nodes.PREFIX}segments")
            return
        spec = (cached.record.get("segments") or {}).get("spec", "")
        segments = self._outline_from_labelmap(cached.segments, f"{map_node.GetName()} · segments {spec}".strip(),
                                               anatomy)
        nodes.set_attributes(segments, role=nodes.SEGMENTS, source=anatomy.GetID(), map=map_node.GetID(), spec=spec)
        nodes.set_attributes(map_node, segments=segments.GetID())
        nodes.place_in_folder(self.scene, segments, folder)

    def _outline_from_labelmap(self, path, name: str, anatomy):
        """A label volume file as a segmentation node drawn as outlines, under the volume's parent
        transform like the maps (it is computed in the volume's own frame)."""
        labelmap = nodes.add_volume_from_file(self.scene, path, "labels", labelmap=True)
        segmentation = slicer.vtkMRMLSegmentationNode()
        segmentation.SetName(name)
        self.scene.AddNode(segmentation)
        segmentation.CreateDefaultDisplayNodes()
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
        nodes.remove_nodes(self.scene, [labelmap])
        segmentation.SetAndObserveTransformNodeID(anatomy.GetTransformNodeID())  # after the import: no resampling
        for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):  # outlines apart from the heat colours
            segmentation.GetSegmentation().GetNthSegment(index).SetColor(*SEGMENT_COLOURS[index % len(SEGMENT_COLOURS)])
        display = segmentation.GetDisplayNode()
        display.SetVisibility2DFill(0)
        display.SetVisibility2DOutline(1)
        return segmentation

    def _segmentation_node(self, anatomy, cached, model: str):
        """The model's predicted segmentation as a segmentation node (drawn as an outline), under the
        volume's parent transform like the maps: it is computed in the volume's own frame."""
        found = nodes.owned_nodes(self.scene, nodes.SEGMENTATION, source=anatomy.GetID(), key=cached.key)
        if found:
            found[0].SetAndObserveTransformNodeID(anatomy.GetTransformNodeID())
            return found[0]
        nodes.remove_nodes(self.scene, nodes.owned_nodes(self.scene, nodes.SEGMENTATION, source=anatomy.GetID()))
        segmentation = self._outline_from_labelmap(
            cached.path, f"{anatomy.GetName()} · {model_display_name(model)} segmentation", anatomy)
        nodes.set_attributes(segmentation, role=nodes.SEGMENTATION, source=anatomy.GetID(), key=cached.key)
        nodes.place_in_folder(self.scene, segmentation, nodes.xai_folder(self.scene, anatomy, model_display_name(model)))
        return segmentation

    def map_nodes(self, job: Job) -> list:
        """The job's map nodes in the order the methods were asked for."""
        return [self.scene.GetNodeByID(job.maps[spec]) for spec in job.methods if spec in job.maps]

    # --- display -----------------------------------------------------------------------------------
    def set_percentile(self, percentile: float, maps=None, *, coalesce: bool = False) -> None:
        """Restyle the maps (all the module's when ``maps`` is None) for a new threshold percentile.

        ``coalesce`` (a slider): only record it; the next :meth:`process_events` restyles once, with the
        last value, however many ticks came in between.
        """
        self.percentile = float(percentile)
        self._restyle = list(maps) if maps is not None else []
        if not coalesce:
            self._apply_percentile()

    def _apply_percentile(self) -> None:
        maps, self._restyle = self._restyle, None
        for node in maps or nodes.owned_nodes(self.scene, nodes.MAP):
            if self.scene.GetNodeByID(node.GetID()) is node:
                signed = nodes.attribute(node, "signed") == "true"
                colours.style_map(self.scene, node, signed, self.percentile, self._levels)

    def set_opacity(self, opacity: float) -> None:
        self.opacity = float(opacity)
        compare.set_opacity(self.scene, [*self.compare_tags, *compare.MAIN_VIEWS], self.opacity)

    def show_compare(self, job: Job, orientation: str = "Axial", *, outline: bool = True, legends: bool = True,
                     show_3d: bool = False):
        """Switch to the compare layout and show the job's maps, one linked view each; returns the table node."""
        anatomy = self.scene.GetNodeByID(job.volume_id)
        maps = self.map_nodes(job)
        if anatomy is None or not maps:
            raise ValueError("nothing to compare yet; run the explanation first")
        labels = [nodes.attribute(node, "label") or nodes.attribute(node, "spec") for node in maps]
        if self.layout_node is not None:
            compare.apply_layout(self.layout_node, compare.layout_xml(labels, orientation))
        segmentation = self.scene.GetNodeByID(job.segmentation_id) if (outline and job.segmentation_id) else None
        self.compare_tags = compare.show_compare(self.scene, anatomy, maps, orientation=orientation,
                                                 opacity=self.opacity, segmentation=segmentation)
        self.orientation = orientation
        if legends:
            for tag, node in zip(self.compare_tags, maps):
                view = compare.slice_node(self.scene, tag)
                colours.legend(self.scene, node, nodes.attribute(node, "label"), [view.GetID()] if view else None)
        self.select(maps[0], show_3d=show_3d)
        if self.application_logic is not None:
            self.application_logic.FitSliceToAll(False, False)
        peak = compare.peak_ras(maps[0])
        compare.jump_to(self.scene, [*self.compare_tags, *compare.MAIN_VIEWS], peak)
        return compare.comparison_table(self.scene, anatomy, maps)

    def select(self, volume, show_3d: bool = False) -> None:
        """Show one map in Slicer's main views (and, if asked, as a volume rendering in 3D)."""
        anatomy = self.scene.GetNodeByID(nodes.attribute(volume, "source"))
        compare.show_in_main_views(self.scene, anatomy, volume, self.opacity)
        if self.volume_rendering_logic is not None:
            for node in nodes.owned_nodes(self.scene, nodes.MAP):
                if node is not volume:
                    colours.volume_rendering(self.volume_rendering_logic, self.scene, node, False, show=False)
            colours.volume_rendering(self.volume_rendering_logic, self.scene, volume,
                                     nodes.attribute(volume, "signed") == "true", show=show_3d)

    def set_orientation(self, orientation: str) -> None:
        """Re-orient the compare views, only on a change (re-orienting resets what the user did in them)."""
        if orientation != self.orientation:
            compare.set_orientation(self.scene, self.compare_tags, orientation)
            self.orientation = orientation

    # --- cases -------------------------------------------------------------------------------------
    def set_cases(self, cases: list[case_list.Case]) -> case_list.CaseBrowser:
        self.browser = case_list.CaseBrowser(cases)
        return self.browser

    def open_case(self, step: int, template: ExplainRequest | None = None,
                  explain: bool = True) -> tuple[object, Job | None]:
        """Move ``step`` cases (0: the current one), release the previous one unless pinned, load the
        new one and (unless not ``explain``) start explaining it like ``template`` (cached maps appear at once)."""
        if self.browser is None or not self.browser.cases:
            raise ValueError("no case list; choose a case folder or use the volumes in the scene")
        previous = self.browser.current
        if step and self.browser.peek(step) is None:
            raise ValueError("no more cases in that direction")
        case = self.browser.step(step) if step else previous
        if step and previous is not None and previous.node_id:
            old = self.scene.GetNodeByID(previous.node_id)
            for job in list(self.jobs.values()):
                if not job.background and job.volume_id == previous.node_id:
                    self.cancel(job)
            case_list.release_case(self.scene, old, pinned=previous.node_id in self.pinned)
            if old is not None and self.scene.GetNodeByID(previous.node_id) is None:
                previous.node_id = None
        volume = case_list.load_case(self.scene, case)
        template = template or self.last_request
        if template is None or not explain:
            return volume, None
        return volume, self.explain(replace(template, volumes=[volume]))

    def pin(self, volume, pinned: bool = True) -> None:
        """Keep (or stop keeping) a case's volume and maps loaded when moving to another case."""
        if pinned:
            self.pinned.add(volume.GetID())
        else:
            self.pinned.discard(volume.GetID())

    def shutdown(self) -> None:
        for job in list(self.jobs.values()):
            self.cancel(job)
        self._background.shutdown(wait=False)  # what is queued still runs: the job folders are removed
        self.client.shutdown()


def map_name(anatomy, record: dict) -> str:
    """``CT_1 · Grad-CAM · tumour``."""
    target = record.get("target") or {}
    name = target.get("name", "")
    region = target.get("region")
    if region and region != "predicted":
        name += f" @ {region}"
    return f"{anatomy.GetName()} · {record.get('label', record.get('method', 'map'))} · {name}".rstrip(" ·")
