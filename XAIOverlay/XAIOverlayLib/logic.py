"""The module's logic without Qt: explain volumes, put the maps into the scene, compare, click through cases.

Work goes to the engine worker (:mod:`xaioverlay.worker`) through a :class:`WorkerClient`; the GUI calls
:meth:`OverlayLogic.process_events` from a timer (scripts and tests call :meth:`OverlayLogic.wait`).
Nodes are made only there, on the caller's thread, and only from complete results: a cancelled or
failed run changes nothing in the scene. Results are cached on disk (:mod:`.cache`), so a revisit,
or a case explained in the background before it was opened, shows at once.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

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
    model_options: dict = field(default_factory=dict)  # nnU-Net folders: {"folds": "0,1"}


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
    state: str = "running"  # running, cancelling, done, failed, cancelled
    error: str = ""
    status: str = ""  # one line for the progress bar: the current stage or method, and its passes
    stage: str = ""
    progress: tuple[int, int, str] = (0, 0, "")
    started: float = field(default_factory=time.monotonic)

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


def model_path(parameters) -> str:
    """The chosen model, or a one-line error when none is chosen (an unset path reads as ".")."""
    path = str(parameters.modelPath)
    if path in ("", "."):
        raise ValueError("choose a model first: an nnU-Net trained-model folder, a MONAI bundle folder, a spec file "
                         "(.yaml/.json) or a TorchScript file")
    return path


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
                          parameters.referenceSegmentation, model_options(parameters))


def model_options(parameters) -> dict:
    """Format options of the module's parameters (only nnU-Net folders take any: the folds)."""
    folds = (parameters.nnunetFolds or "").replace(" ", "")
    return {"folds": folds} if folds else {}


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
        self.browser: case_list.CaseBrowser | None = None
        self.last_request: ExplainRequest | None = None
        self.last_job: Job | None = None
        self.pinned: set[str] = set()  # IDs of case volumes kept when moving to another case
        self.compare_tags: list[str] = []

    # --- the model ---------------------------------------------------------------------------------
    def describe(self, model: str, device: str = "auto", timeout: float = 300.0, options: dict | None = None) -> dict:
        """The model's description (task, class names, methods it allows); asks the worker once per model
        and options (nnU-Net folds)."""
        fingerprint = model_fingerprint(model, options)
        if fingerprint not in self.models:
            request_id = self.client.send({"command": "describe", "model": str(model), "device": device,
                                           "model_options": options or {}})
            deadline = time.monotonic() + timeout
            while fingerprint not in self.models:
                for event in self.client.poll(0.1):
                    if event.get("id") == request_id and event["event"] == "described":
                        self.models[fingerprint] = {**event["model"], "methods": event["methods"],
                                                    "default_methods": event["default_methods"]}
                    elif event.get("id") == request_id and event["event"] in ("error", "died"):
                        raise RuntimeError(event["message"])
                    else:
                        self._handle(event)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the worker did not describe {model} within {timeout:.0f} s")
        return self.models[fingerprint]

    # --- explaining --------------------------------------------------------------------------------
    def explain(self, request: ExplainRequest) -> Job:
        """Start explaining; cached maps appear at once, the rest when the worker is done."""
        if not request.volumes or request.volumes[0] is None:
            raise ValueError("no input volume; choose the volume to explain")
        if not request.methods:
            raise ValueError("no method chosen; choose at least one method to compute")
        info = self.describe(request.model, request.device, options=request.model_options)
        target = replace(request.target, task=info["task"])
        anatomy = request.volumes[0]
        digest = nodes.content_digest(request.volumes)
        fingerprint = model_fingerprint(request.model, request.model_options)
        workdir = Path(tempfile.mkdtemp(prefix="xaioverlay-job-"))
        try:
            target_spec, target_text = build_target(target, anatomy, workdir)
            reference_mask, measured = measurement(request, anatomy, workdir)
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        keys = {spec: cache_key(digest, fingerprint, spec, target_text, request.score, request.layer, measured)
                for spec in request.methods}
        job = Job(list(request.methods), keys, str(request.model), target_text, reference_mask, volume_id=anatomy.GetID(),
                  workdir=workdir)
        if info["task"] == "segmentation":
            job.segmentation_key = segmentation_key(digest, fingerprint)
        self.last_request = request
        adopted = self._adopt_background(job)
        if adopted is not None:
            shutil.rmtree(workdir, ignore_errors=True)
            self.last_job = adopted
            return adopted
        self.last_job = job
        self._cancel_background()
        for spec in request.methods:
            cached = self.cache.get(keys[spec])
            if cached is not None:
                job.maps[spec] = self._map_node(anatomy, spec, cached, request.model, target_text).GetID()
        if job.segmentation_key and self.cache.get(job.segmentation_key):
            job.segmentation_id = self._segmentation_node(anatomy, self.cache.get(job.segmentation_key), request.model).GetID()
        missing = [spec for spec in request.methods if spec not in job.maps]
        if not missing:
            return self._finish(job, "done", "all maps from the cache")
        inputs = [str(nodes.write_volume_file(volume, workdir / f"input_{index}.nrrd")) for index, volume in enumerate(request.volumes)]
        self._send(job, inputs, missing, target_spec, request)
        return job

    def _send(self, job: Job, inputs: list[str], methods: list[str], target_spec: str | None, request: ExplainRequest) -> None:
        job.sent = list(methods)
        job.status = "starting the worker" if not self.client.running else "queued"
        job.request_id = self.client.send({
            "command": "explain", "model": str(request.model), "device": request.device, "inputs": inputs,
            "model_options": request.model_options,
            "methods": methods, "target": target_spec, "score": request.score, "layer": request.layer or None,
            "out": str(job.workdir / "out"), "segmentation": bool(job.segmentation_key),
            "evaluate": bool(request.evaluate), "reference_mask": job.reference_mask,
        })
        self.jobs[job.request_id] = job

    def prefetch(self, case: case_list.Case, template: ExplainRequest) -> Job | None:
        """Compute a case's maps in the background (cache only, no nodes); None when nothing to do.

        Only single-volume requests whose target needs no node of the current case (a class, or a
        channel over the model's predicted region) can be prepared ahead.
        """
        if len(template.volumes) != 1 or template.reference is not None:
            return None
        if any(job.background for job in self.jobs.values() if not job.finished):
            return None  # one background run at a time; checked before any hashing
        info = self.describe(template.model, template.device, options=template.model_options)
        target = replace(template.target, task=info["task"])  # the request's own task is not known before
        if target.needs_region_node:
            return None
        volume = self.scene.GetNodeByID(case.node_id) if case.node_id else None
        if case.from_scene and volume is None:
            return None
        # a file case not loaded yet is known by its file's digest, as its node will be once loaded
        digest = nodes.content_digest([volume]) if volume is not None else nodes.combine_digests([case.file_digest()])
        fingerprint = model_fingerprint(template.model, template.model_options)
        target_spec, target_text = build_target(target, None, None)  # a class or the predicted region: no file
        _, measured = measurement(template, None, None)
        keys = {spec: cache_key(digest, fingerprint, spec, target_text, template.score, template.layer, measured)
                for spec in template.methods}
        missing = [spec for spec in template.methods if self.cache.get(keys[spec]) is None]
        if not missing:
            return None
        job = Job(list(template.methods), keys, str(template.model), target_text, case=case, background=True,
                  workdir=Path(tempfile.mkdtemp(prefix="xaioverlay-prefetch-")))
        if info["task"] == "segmentation":
            job.segmentation_key = segmentation_key(digest, fingerprint)
        if volume is not None:
            inputs = [str(nodes.write_volume_file(volume, job.workdir / "input_0.nrrd"))]
        else:
            inputs = [str(case.path)]
        self._send(job, inputs, missing, target_spec, template)
        return job

    def _adopt_background(self, job: Job) -> Job | None:
        """A background job computing exactly these maps becomes this request's job."""
        for running in self.jobs.values():
            if running.background and not running.finished and all(running.keys.get(s) == k for s, k in job.keys.items()):
                running.background = False
                running.volume_id = job.volume_id
                running.methods = job.methods
                return running
        return None

    def _cancel_background(self) -> None:
        for job in list(self.jobs.values()):
            if job.background and not job.finished:
                self.cancel(job)

    def cancel(self, job: Job) -> None:
        """Stop a job; nothing it would have made appears (the worker writes nothing partial)."""
        if job.finished:
            return
        job.state = "cancelling"
        job.status = "cancelling"
        if job.request_id:
            self.client.cancel(job.request_id)

    # --- events ------------------------------------------------------------------------------------
    def process_events(self, timeout: float = 0.0) -> list[Job]:
        """Handle the worker's events; returns the jobs that changed (call from a timer)."""
        changed: list[Job] = []
        for event in self.client.poll(timeout):
            job = self._handle(event)
            if job is not None and job not in changed:
                changed.append(job)
        return changed

    def wait(self, job: Job, timeout: float = 600.0) -> Job:
        """Process events until ``job`` has finished (scripts, tests, the module's self-test)."""
        deadline = time.monotonic() + timeout
        while not job.finished:
            if time.monotonic() > deadline:
                raise TimeoutError(f"explanation not finished within {timeout:.0f} s ({job.status})")
            self.process_events(0.1)
        return job

    def _handle(self, event: dict) -> Job | None:
        kind = event.get("event")
        job = self.jobs.get(event.get("id"))
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
        elif kind == "result":
            try:
                self._accept_result(job, event)
            except Exception as error:  # noqa: BLE001 - shown to the user, never swallowed
                log.exception("could not load the results")
                return self._finish(job, "failed", f"could not load the results: {error}")
            return self._finish(job, "done", f"done in {time.monotonic() - job.started:.1f} s")
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
        if job.request_id:
            self.jobs.pop(job.request_id, None)
        if job.workdir is not None:
            shutil.rmtree(job.workdir, ignore_errors=True)
        if state == "done" and not job.background:
            self._prefetch_after(job)
        return job

    def _accept_result(self, job: Job, event: dict) -> None:
        record = event["explanation"]
        out = Path(event["out"])
        run = {key: record.get(key) for key in ("model", "target", "output", "created", "xaioverlay_version")}
        stored = {}
        for spec, method in zip(job.sent, record["methods"]):
            stored[spec] = self.cache.put(job.keys[spec], out / method["file"], {**method, **run, "request_spec": spec})
        segmentation = None
        if event.get("segmentation") and job.segmentation_key:
            segmentation = self.cache.put(job.segmentation_key, event["segmentation"], {"model": record.get("model")})
        if job.background:
            return
        anatomy = self.scene.GetNodeByID(job.volume_id) if job.volume_id else None
        if anatomy is None:  # the case was closed meanwhile: the maps stay in the cache only
            return
        for spec in job.methods:
            cached = stored.get(spec) or self.cache.get(job.keys[spec])
            if cached is not None:
                job.maps[spec] = self._map_node(anatomy, spec, cached, job.model, job.target_text).GetID()
        if segmentation is not None:
            job.segmentation_id = self._segmentation_node(anatomy, segmentation, job.model).GetID()

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
        colours.style_map(self.scene, node, bool(record.get("signed")), self.percentile)
        nodes.place_in_folder(self.scene, node, nodes.xai_folder(self.scene, anatomy, model_display_name(model)))
        return node

    def _segmentation_node(self, anatomy, cached, model: str):
        """The model's predicted segmentation as a segmentation node (drawn as an outline)."""
        found = nodes.owned_nodes(self.scene, nodes.SEGMENTATION, source=anatomy.GetID(), key=cached.key)
        if found:
            return found[0]
        nodes.remove_nodes(self.scene, nodes.owned_nodes(self.scene, nodes.SEGMENTATION, source=anatomy.GetID()))
        labelmap = nodes.add_volume_from_file(self.scene, cached.path, "model segmentation", labelmap=True)
        segmentation = slicer.vtkMRMLSegmentationNode()
        segmentation.SetName(f"{anatomy.GetName()} · {model_display_name(model)} segmentation")
        self.scene.AddNode(segmentation)
        segmentation.CreateDefaultDisplayNodes()
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
        nodes.remove_nodes(self.scene, [labelmap])
        for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):  # outlines apart from the heat colours
            segmentation.GetSegmentation().GetNthSegment(index).SetColor(*SEGMENT_COLOURS[index % len(SEGMENT_COLOURS)])
        nodes.set_attributes(segmentation, role=nodes.SEGMENTATION, source=anatomy.GetID(), key=cached.key)
        nodes.place_in_folder(self.scene, segmentation, nodes.xai_folder(self.scene, anatomy, model_display_name(model)))
        return segmentation

    def map_nodes(self, job: Job) -> list:
        """The job's map nodes in the order the methods were asked for."""
        return [self.scene.GetNodeByID(job.maps[spec]) for spec in job.methods if spec in job.maps]

    # --- display -----------------------------------------------------------------------------------
    def set_percentile(self, percentile: float, maps=None) -> None:
        self.percentile = float(percentile)
        for node in maps if maps is not None else nodes.owned_nodes(self.scene, nodes.MAP):
            colours.style_map(self.scene, node, nodes.attribute(node, "signed") == "true", self.percentile)

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

    def open_case(self, step: int, template: ExplainRequest | None = None) -> tuple[object, Job | None]:
        """Move ``step`` cases (0: the current one), release the previous one unless pinned, load the
        new one and start explaining it like ``template`` (cached maps appear at once)."""
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
        if template is None:
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
        self.client.shutdown()


def map_name(anatomy, record: dict) -> str:
    """``CT_1 · Grad-CAM · tumour``."""
    target = record.get("target") or {}
    name = target.get("name", "")
    region = target.get("region")
    if region and region != "predicted":
        name += f" @ {region}"
    return f"{anatomy.GetName()} · {record.get('label', record.get('method', 'map'))} · {name}".rstrip(" ·")
