"""The page: the module's workflow (choose methods → Explain → compare views → next case) on a trame server.

Everything the page does goes through :class:`XAIOverlayLib.logic.OverlayLogic`, as the Slicer module's
widget does: the page only turns clicks into the logic's calls and the logic's jobs into page state. The
compare views are trame-slicer slice views named like the module's compare views
(:func:`XAIOverlayLib.compare.view_name`), so :func:`XAIOverlayLib.compare.show_compare` fills them exactly
as it fills the module's layout; Slicer's slice pipeline renders them and trame streams the images.
A timer on the server's event loop calls :meth:`OverlayLogic.process_events`, as the module's QTimer does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from XAIOverlayLib import cases as case_list
from XAIOverlayLib import compare, nodes
from XAIOverlayLib.logic import ExplainRequest, Job, OverlayLogic, model_display_name
from XAIOverlayLib.target_spec import TargetChoice

log = logging.getLogger(__name__)

#: Compare views on the page (the methods compared at once).
MAX_VIEWS = 4
#: Methods ticked when the page opens (those the model allows).
DEFAULT_METHODS = ("gradcam",)
TICK_S = 0.05


def xy_to_ras(view) -> list[float]:
    """The view's pixel → RAS mm matrix, row by row (16 values; pixel (0, 0) at the bottom left)."""
    matrix = view._logic.GetSliceNode().GetXYToRAS()  # as tools/offscreen_views.pixel_of reads it
    return [round(matrix.GetElement(row, column), 6) for row in range(4) for column in range(4)]


class OverlayPage:
    """The page's state and controls over one :class:`OverlayLogic` and its compare views.

    ``cases``: the case list; ``model``: the model path (None: nothing is computed, Explain is disabled);
    ``info``: the model's description (from the worker); ``cohort``: a cohort folder whose stored maps each
    case shows (:mod:`.cohort`), its methods offered first.
    """

    def __init__(self, server, app, logic: OverlayLogic, cases: list[case_list.Case], model: str | None, info: dict,
                 cohort=None) -> None:
        self.server = server
        self.app = app
        self.logic = logic
        self.model = model
        self.info = info
        self.cohort = cohort
        allowed = [method["name"] for method in info["methods"] if method["allowed"]]
        stored = cohort.methods if cohort is not None else []
        self.methods = [*stored, *[method for method in allowed if method not in stored]]
        self.views = self._create_views()
        self.job: Job | None = None
        self.shown: Job | None = None
        self.clicked = 0.0
        logic.set_cases(cases)
        case_list.load_case(app.scene, logic.browser.current)
        self._init_state(cases)
        self._bind()
        if cohort is not None:  # Next shows stored maps: computing the next case ahead would be wasted
            logic.prefetch_next = False
            self._start(0, self.server.state.chosen, self.server.state.target)  # shown at the first tick

    # --- views -------------------------------------------------------------------------------------
    def _create_views(self) -> list:
        from trame_slicer.views import ViewLayoutDefinition
        from trame_slicer.views.abstract_view import ViewProps
        from trame_slicer.views.view_layout_definition import ViewType

        views = []
        for index in range(MAX_VIEWS):
            tag = compare.view_name(index)
            props = ViewProps(label=str(index + 1), orientation="Axial", group=compare.COMPARE_GROUP,
                              color=compare.VIEW_COLOURS[index % len(compare.VIEW_COLOURS)])
            views.append(self.app.view_manager.create_view(ViewLayoutDefinition(tag, ViewType.SLICE_VIEW, props)))
        return views

    def view_template(self, index: int) -> str:
        from trame_slicer.app.logic import get_view_trame_id

        return get_view_trame_id(self.server, self.views[index])

    # --- state -------------------------------------------------------------------------------------
    def _init_state(self, cases: list[case_list.Case]) -> None:
        state = self.server.state
        state.trame__title = "XAIOverlay"
        state.cases = [case.name for case in cases]
        state.case_index = 0
        state.model_name = model_display_name(self.model) if self.model else self.cohort.model.get("id", "")
        state.task = self.info.get("task", "")
        names = self.info.get("class_names") or self.info.get("channel_names") or []
        state.classes = [str(name) for name in names]
        state.target = next((str(name) for name in names if str(name).lower() not in ("background", "no tumour")), "")
        state.methods = self.methods
        defaults = self.cohort.methods[:MAX_VIEWS] if self.cohort is not None else DEFAULT_METHODS
        state.chosen = [method for method in self.methods if method in defaults]  # the ticked methods
        state.explain_reason = "" if self.model else "Explain needs a model: start serve with --model MODEL_PATH"
        state.similar = []  # the current case's similar cases in the cohort: {"id", "text"}
        state.requests_sent = 0  # explain requests sent to the worker
        state.progress_text = "ready"
        state.run = 0  # runs started (the progress element's data-run: tests wait for the next one)
        state.progress_value = 0
        state.status_line = ""
        state.running = False
        state.error = ""
        state.slots = [""] * MAX_VIEWS
        state.slot_labels = [""] * MAX_VIEWS
        state.slot_geometry = ["[]"] * MAX_VIEWS
        state.enlarged = ""  # the method whose view fills the compare area ("": all side by side)
        state.metrics_columns = []
        state.metrics_rows = []
        state.percentile = self.logic.percentile
        state.opacity = self.logic.opacity
        state.orientation = self.logic.orientation
        state.orientations = list(compare.ORIENTATIONS)

    def _bind(self) -> None:
        controller, state = self.server.controller, self.server.state
        controller.explain = self.explain
        controller.cancel = self.cancel
        controller.next_case = lambda chosen, target: self.open_case(+1, chosen, target)
        controller.previous_case = lambda chosen, target: self.open_case(-1, chosen, target)
        controller.open_similar = self.open_similar
        state.change("percentile")(lambda percentile, **_: self.logic.set_percentile(percentile, coalesce=True))
        state.change("opacity")(lambda opacity, **_: self._set_opacity(opacity))
        state.change("orientation")(lambda orientation, **_: self._set_orientation(orientation))
        controller.on_server_ready.add(lambda **_: asyncio.ensure_future(self._tick()))

    # --- actions -----------------------------------------------------------------------------------
    def template(self, chosen: list[str], target: str) -> ExplainRequest:
        """The request for ``chosen`` methods (in the page's order) and ``target``, as the clicked button sent them
        (not read back from the state: a checkbox ticked just before the click may not have reached the server)."""
        methods = [method for method in self.methods if method in chosen]
        if not methods:
            raise ValueError("no method chosen; tick at least one method")
        if len(methods) > MAX_VIEWS:
            raise ValueError(f"{len(methods)} methods chosen; the page compares at most {MAX_VIEWS} at once")
        return ExplainRequest([], self.model, methods, TargetChoice(key=target or ""))

    def explain(self, chosen: list[str], target: str) -> None:
        self._start(0, chosen, target)

    def open_case(self, step: int, chosen: list[str], target: str) -> None:
        self._start(step, chosen, target)

    def open_similar(self, case_id: str, chosen: list[str], target: str) -> None:
        """Jump to case ``case_id`` of the case list (a similar case of the current one)."""
        names = [case.name for case in self.logic.browser.cases]
        if case_id in names and names.index(case_id) != self.logic.browser.index:
            self._start(names.index(case_id) - self.logic.browser.index, chosen, target)

    def _start(self, step: int, chosen: list[str], target: str) -> None:
        """Explain the current case (``step`` 0, in cohort mode only once the page is open) or open another one
        (a cohort's case: its stored maps; else explained like the current one)."""
        state = self.server.state
        self.clicked = time.monotonic()
        stored = self.cohort is not None and (step != 0 or self.job is None)
        try:
            if step == 0 and not stored and not self.model:
                raise ValueError(state.explain_reason)
            template = self.template(chosen, target) if not stored else None
            if self.job is not None and not self.job.finished and step == 0:
                self.logic.cancel(self.job)
            if step:
                self._clear_views()
            if step:  # the case left stays loaded while it is a neighbour (:meth:`_release_far_cases`)
                self.logic.pin(case_list.load_case(self.app.scene, self.logic.browser.current))
            if stored:
                self.job = self._open_stored(step, chosen)
            else:
                _, self.job = self.logic.open_case(step, template)
        except ValueError as error:
            state.error = str(error)
            return
        log.info("case opened in %.2f s", time.monotonic() - self.clicked)
        state.error = ""
        state.case_index = self.logic.browser.index
        state.similar = self.cohort.similar(self.logic.browser.current.name) if self.cohort is not None else []
        state.progress_text = "preparing"
        state.run += 1
        state.progress_value = 0
        state.running = True
        self.shown = None

    def _open_stored(self, step: int, chosen: list[str]) -> Job:
        """Open the case ``step`` away and show its stored cohort maps of the ticked methods (all of them when
        none of the ticked methods is stored)."""
        volume, _ = self.logic.open_case(step, explain=False)
        name = self.logic.browser.current.name
        specs = [spec for spec in self.cohort.methods if spec in chosen] or self.cohort.methods
        stored = self.cohort.stored_maps(name, specs[:MAX_VIEWS])
        return self.logic.show_stored(volume, stored, self.cohort.model_path, self.cohort.target_text(name))

    def cancel(self) -> None:
        if self.job is not None and not self.job.finished:
            self.logic.cancel(self.job)
            self.server.state.progress_text = "cancelling"

    def _set_opacity(self, opacity) -> None:
        self.logic.set_opacity(float(opacity))
        self._render()

    def _set_orientation(self, orientation: str) -> None:
        if self.logic.compare_tags and orientation in compare.ORIENTATIONS:
            self.logic.set_orientation(orientation)
            self._fit()

    # --- the timer ---------------------------------------------------------------------------------
    async def _tick(self) -> None:
        while True:
            try:
                self.logic.process_events(0.0)
                with self.server.state:
                    self._update()
            except Exception:  # noqa: BLE001 - the timer must keep running; the error is logged
                log.exception("updating the page failed")
            await asyncio.sleep(TICK_S)

    def _update(self) -> None:
        state, job = self.server.state, self.job
        if job is None:
            return
        done, total, _ = job.progress
        state.status_line = job.status
        state.requests_sent = self.logic.requests_sent
        state.progress_value = int(100 * done / total) if total else (100 if job.finished else 0)
        if not job.finished:
            state.progress_text = job.status or job.state
            return
        if self.shown is job:
            self._publish_geometry()
            return
        self.shown = job
        state.running = False
        if job.state == "done":
            self._show(job)
            state.progress_text = "done"
            log.info("%s shown %.2f s after the click", job.methods, time.monotonic() - self.clicked)
            self._release_far_cases()
        else:
            state.progress_text = job.state
            state.error = job.error

    def _release_far_cases(self) -> None:
        """Keep the current case and its neighbours loaded (going back shows their maps without reading them
        again); release the others, after the current case is shown."""
        browser = self.logic.browser
        for index, case in enumerate(browser.cases):
            volume = self.app.scene.GetNodeByID(case.node_id) if case.node_id else None
            if volume is None or abs(index - browser.index) <= 1:
                continue
            self.logic.pin(volume, False)
            case_list.release_case(self.app.scene, volume)
            case.node_id = None

    def _show(self, job: Job) -> None:
        state = self.server.state
        maps = self.logic.map_nodes(job)
        if not maps:
            return
        self.logic.show_compare(job, state.orientation)
        columns, rows = compare.table_rows([nodes.attribute(node, "record", {}, parse=True) for node in maps])
        state.metrics_columns = columns
        state.metrics_rows = [[cell if not isinstance(cell, float) else f"{cell:.4g}" for cell in row] for row in rows]
        specs = [spec for spec in job.methods if spec in job.maps]
        state.slots = specs + [""] * (MAX_VIEWS - len(specs))
        state.enlarged = ""
        labels = [nodes.attribute(node, "label") or nodes.attribute(node, "spec") for node in maps]
        state.slot_labels = labels + [""] * (MAX_VIEWS - len(labels))
        self._render()  # show_compare fitted the views and centred them on the first map's peak

    def _fit(self) -> None:
        """Fit the views to the anatomy, then centre them on the first map's peak (as the module does)."""
        job = self.shown or self.job
        maps = self.logic.map_nodes(job) if job is not None else []
        for view in self.views[: len(maps)]:
            view.fit_view_to_content()
        if maps:
            compare.jump_to(self.app.scene, self.logic.compare_tags, compare.peak_ras(maps[0]))
        self._render()

    def _render(self) -> None:
        for view in self.views:
            view.schedule_render()
        self._publish_geometry()

    def _publish_geometry(self) -> None:
        slots = self.server.state.slots
        geometry = [json.dumps(xy_to_ras(view)) if slot else "[]" for view, slot in zip(self.views, slots)]
        if geometry != self.server.state.slot_geometry:
            self.server.state.slot_geometry = geometry

    def _clear_views(self) -> None:
        state = self.server.state
        state.slots = [""] * MAX_VIEWS
        state.slot_labels = [""] * MAX_VIEWS
        state.metrics_rows = []
