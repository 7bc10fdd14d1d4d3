"""``xaioverlay serve``: start the page and print its one address, which carries the access token."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from xaioverlay.errors import InputError, ModelError

log = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", metavar="DIR_OR_MANIFEST",
                        help="a folder of volumes or a CSV manifest (as for `cohort`); default: two demo phantoms")
    parser.add_argument("--model", help="model path (bundle, nnU-Net folder, spec, TorchScript); "
                                        "default: the demo segmenter")
    parser.add_argument("--cohort", metavar="DIR",
                        help="a cohort's --out folder: its cases, their stored maps (nothing recomputed), table rows "
                             "and similar cases; Explain computes other methods only with --model")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only); the token is always "
                             "required")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache", metavar="DIR",
                        help="map cache folder (default: XAIOverlay-cache in the temp folder)")


def page_cases(source: str | None, folder: Path) -> list:
    """The page's case list: from a folder or CSV manifest, or (none given) two demo phantoms written to ``folder``."""
    from XAIOverlayLib.cases import Case

    if source is None:
        from xaioverlay.demo import DEMO_SEED
        from xaioverlay.phantoms import make_phantom
        from xaioverlay.volumes import write_volume

        files = [write_volume(make_phantom(DEMO_SEED + n).image, folder / f"phantom_{n}.nrrd") for n in range(2)]
        return [Case(f"phantom_{n}", path=path) for n, path in enumerate(files)]
    from xaioverlay.cohort.manifest import read_cases

    cases = read_cases(source)
    several = [case.case_id for case in cases if len(case.images) != 1]
    if several:
        raise InputError(f"cases {', '.join(several[:3])} have several input volumes; the page explains "
                         "single-volume cases: give one image column")
    return [Case(case.case_id, path=Path(case.images[0])) for case in cases]


def describe(logic, model: str, device: str, timeout: float = 300.0) -> dict:
    """The model's description from the worker (the logic asks it once; this waits for the answer)."""
    answers: list = []
    logic.describe(model, device, then=answers.append, failed=answers.append)
    deadline = time.monotonic() + timeout
    while not answers:
        if time.monotonic() > deadline:
            raise ModelError(f"the worker did not describe {model} within {timeout:.0f} s")
        logic.process_events(0.1)
    if not isinstance(answers[0], dict):
        raise ModelError(str(answers[0]))
    return answers[0]


def run_serve(args: argparse.Namespace, printer=None) -> int:
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # no display needed
    if args.cohort and args.cases:
        raise InputError("give --cohort or --cases, not both: a cohort's cases are those it ran")
    if args.model is None and not args.cohort:
        from xaioverlay.demo import SEGMENTER, bundle_path

        args.model = str(bundle_path(SEGMENTER))
    from xaioverlay.model_files import resolve_model_path

    model = str(resolve_model_path(args.model)) if args.model else None
    try:
        from slicer import vtkMRMLInteractionNode
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import SlicerApp
        from trame_slicer.rca_view import RemoteSliceViewFactory
    except ImportError as error:
        raise InputError(f"the browser page needs trame-slicer ({error}); "
                         "install it: pip install 'xaioverlay[web]'") from error
    from XAIOverlayLib.logic import OverlayLogic

    from .access import new_token, protect
    from .layout import build_layout
    from .page import OverlayPage

    cohort = None
    if args.cohort:
        from .cohort import open_cohort

        cohort = open_cohort(args.cohort)
        cases = cohort.cases
    else:
        cases = page_cases(args.cases, Path(tempfile.mkdtemp(prefix="xaioverlay-serve-")))
    server = get_server("xaioverlay", client_type="vue3")
    server.enable_module(trame_slicer_module)
    if not logging.getLogger().isEnabledFor(logging.INFO):  # VTK's deprecation warnings are not the user's to act on
        from vtkmodules.vtkCommonCore import vtkObject

        vtkObject.GlobalWarningDisplayOff()
    app = SlicerApp()
    app.scene.AddNode(vtkMRMLInteractionNode())
    app.view_manager.register_factory(RemoteSliceViewFactory(server))
    logic = OverlayLogic(app.scene, cache_root=args.cache, application_logic=app.app_logic)
    info = describe(logic, model, args.device) if model else cohort.description()
    page = OverlayPage(server, app, logic, cases, model, info, cohort)
    build_layout(page)

    token = new_token()
    server.controller.on_server_bind.add(lambda wslink_server: protect(wslink_server, token))

    def announce(**_) -> None:
        port = server.port
        print(f"http://{args.host}:{port}/?token={token}", flush=True)

    server.controller.on_server_ready.add(announce)
    try:
        server.start(port=args.port, host=args.host, open_browser=False, show_connection_info=False, timeout=0)
    finally:
        logic.shutdown()
    return 0


if __name__ == "__main__":  # python -m xaioverlay_web.serve: the same as `xaioverlay serve`
    from xaioverlay.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
