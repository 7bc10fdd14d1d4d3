"""Windows and macOS hazards, caught on Linux: Unix-only modules and calls, text read in the system's
code page instead of UTF-8, and the explain path running where ``resource`` (and ``/proc``) do not exist.

CI runs on Linux only; these tests stand in for a Windows or macOS machine by removing what those
systems lack (``resource``, ``fcntl``) or by running Python in a locale whose encoding is not UTF-8.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from xaioverlay import measure
from xaioverlay.demo import bundle_path
from xaioverlay.phantoms import make_phantom
from xaioverlay.volumes import write_volume

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "XAIOverlay" / "XAIOverlay.py", *sorted((ROOT / "XAIOverlay" / "xaioverlay").rglob("*.py")),
           *sorted((ROOT / "XAIOverlay" / "XAIOverlayLib").rglob("*.py"))]
#: Standard-library modules that exist on Linux and macOS but not on Windows (or only on Linux).
UNIX_ONLY_MODULES = {"resource", "fcntl", "termios", "tty", "pty", "pwd", "grp", "spwd", "crypt", "syslog", "posix"}
#: ``os``/``signal`` names and ``subprocess`` keywords that Windows lacks.
UNIX_ONLY_NAMES = {"killpg", "setsid", "setpgrp", "fork", "forkpty", "getuid", "geteuid", "getpgid", "sysconf",
                   "SIGKILL", "SIGHUP", "start_new_session", "preexec_fn"}


def _python(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def unix_only_uses(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names} & UNIX_ONLY_MODULES
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module.split(".")[0]} & UNIX_ONLY_MODULES
        elif isinstance(node, ast.Attribute) and node.attr in UNIX_ONLY_NAMES:
            found.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg in UNIX_ONLY_NAMES:
            found.add(node.arg)
    return found


def text_io_without_encoding(source: str) -> list[int]:
    """Lines that open, read or write text without naming an encoding (Windows would use its code page)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg for k in node.keywords}
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in ("read_text", "write_text") and "encoding" not in keywords:
            lines.append(node.lineno)
        elif name in ("open", "fdopen") and "encoding" not in keywords:
            given = [k.value for k in node.keywords if k.arg == "mode"]
            mode = node.args[1] if len(node.args) > 1 else (given[0] if given else None)
            binary = isinstance(mode, ast.Constant) and "b" in str(mode.value)
            if not binary and not (name == "open" and isinstance(node.func, ast.Attribute)):  # Image.open etc. excluded
                lines.append(node.lineno)
    return lines


def test_the_scans_see_what_they_look_for():
    sample = textwrap.dedent("""
        import resource, os, subprocess
        def f(path):
            os.killpg(1, 9); subprocess.Popen(["x"], start_new_session=True)
            open(path).read(); path.read_text(); open(path, "rb"); path.write_text("x", encoding="utf-8")
    """)
    assert unix_only_uses(sample) == {"resource", "killpg", "start_new_session"}
    assert text_io_without_encoding(sample) == [5, 5]


def test_no_module_uses_what_only_unix_has():
    assert len(SOURCES) > 40
    offenders = {str(p.relative_to(ROOT)): sorted(unix_only_uses(_python(p))) for p in SOURCES}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_text_files_are_read_and_written_as_utf8():
    offenders = {str(p.relative_to(ROOT)): text_io_without_encoding(_python(p)) for p in SOURCES}
    assert {name: lines for name, lines in offenders.items() if lines} == {}


def _c_locale_env() -> dict:
    """Python in a locale whose preferred encoding is ASCII: files opened without an encoding fail on
    non-ASCII text, as they are misread in cp1252 on a Windows machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONUTF8", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0",
               PYTHONPATH=os.pathsep.join([str(ROOT / "XAIOverlay"), env.get("PYTHONPATH", "")]))
    return env


def test_a_spec_with_non_ascii_class_names_loads_whatever_the_system_encoding(tmp_path, densenet_spec):
    import yaml

    spec = yaml.safe_load(densenet_spec.read_text(encoding="utf-8"))
    spec["class_names"] = ["Hintergrund", "Läsion"]
    densenet_spec.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    code = ("import json, sys, locale; from xaioverlay.models import load_model;"
            "print(locale.getpreferredencoding(False));"
            "print(json.dumps(load_model(sys.argv[1], device='cpu').class_names))")
    result = subprocess.run([sys.executable, "-c", code, str(densenet_spec)], capture_output=True, text=True,
                            encoding="utf-8", errors="replace", env=_c_locale_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-1500:]
    encoding, names = result.stdout.strip().splitlines()[-2:]
    assert "UTF" not in encoding.upper()  # the stand-in really is a non-UTF-8 system
    assert json.loads(names) == ["Hintergrund", "Läsion"]


#: Runs in a fresh interpreter where ``resource`` and ``fcntl`` cannot be imported (as on Windows):
#: ``xaioverlay explain`` on the demo classifier, then the worker's describe request.
WITHOUT_UNIX_MODULES = """
import io, json, sys
import psutil  # loaded first: its Linux backend itself uses resource (its Windows backend does not)
sys.modules["resource"] = None  # from here on, importing it raises ImportError, as on Windows
sys.modules["fcntl"] = None
from xaioverlay import measure
from xaioverlay.cli import main
from xaioverlay.worker import serve
code = main(["explain", "--model", sys.argv[1], "--input", sys.argv[2], "--methods", "gradcam",
             "--out", sys.argv[3], "--progress", "none", "--no-montage"])
replies = io.StringIO()
describe = {"id": "d", "command": "describe", "model": sys.argv[1], "device": "cpu"}
serve(io.StringIO(json.dumps(describe) + "\\n"), replies)
print(json.dumps({"code": code, "source": measure.rss_reader()[0], "events": replies.getvalue().splitlines()}))
"""


def test_explain_and_describe_run_where_resource_cannot_be_imported(tmp_path):
    image = write_volume(make_phantom(seed=7).image, tmp_path / "case.nrrd")
    arguments = [str(bundle_path("tumour_classifier")), str(image), str(tmp_path / "out")]
    engine_first = os.pathsep.join([str(ROOT / "XAIOverlay"), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", WITHOUT_UNIX_MODULES, *arguments], capture_output=True, text=True,
                            encoding="utf-8", errors="replace", timeout=600,
                            env={**os.environ, "PYTHONPATH": engine_first})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] == 0 and report["source"] == "psutil"
    events = [json.loads(line) for line in report["events"]]
    assert events[0]["event"] == "ready" and events[-1]["event"] == "described", events
    record = json.loads((tmp_path / "out" / "explanation.json").read_text(encoding="utf-8"))
    (method,) = record["methods"]
    assert method["peak_memory_kind"] == "cpu rss" and method["peak_memory_mb"] is not None


def test_without_any_memory_source_the_figure_is_left_out_with_a_note(monkeypatch):
    monkeypatch.setattr(measure, "rss_reader", lambda: None)
    with measure.measure("cpu") as cost:
        sum(range(10_000))
    assert cost.seconds > 0 and cost.peak_memory_mb is None and cost.memory_kind == measure.NO_SOURCE
    assert "psutil" in measure.NO_SOURCE


def test_a_bundle_with_non_ascii_metadata_loads_whatever_the_system_encoding(tmp_path):
    """MONAI opens bundle configs in the system's encoding; the engine reads them as UTF-8 itself."""
    import shutil

    bundle = shutil.copytree(bundle_path("tumour_classifier"), tmp_path / "Tumour classifier")
    metadata_file = bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    metadata["authors"] = "Jürgen Ōno"  # "Ō" is C5 8C in UTF-8: bytes cp1252 cannot decode
    metadata_file.write_text(json.dumps(metadata, ensure_ascii=False), encoding="utf-8")
    code = ("import json, sys; from xaioverlay.models import load_model;"
            "print(json.dumps(load_model(sys.argv[1], device='cpu').class_names))")
    result = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True,
                            encoding="utf-8", errors="replace", env=_c_locale_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-1500:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["no tumour", "tumour"]


def test_make_setup_uses_the_python_and_venv_layout_windows_has():
    import shutil

    import pytest

    if shutil.which("make") is None:
        pytest.fail("GNU make is needed for this test (it checks the Makefile's commands)")

    def commands(*variables: str) -> list[str]:
        # MAKELEVEL/MAKEFLAGS dropped: under `make test` a nested make prints "Entering directory" lines
        outer = {"MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEFILES"}
        env = {**{k: v for k, v in os.environ.items() if k not in outer}, "OS": ""}
        result = subprocess.run(["make", "--no-print-directory", "-n", "-B", "setup", "demo", *variables], cwd=ROOT,
                                capture_output=True, text=True, check=True, env=env)
        return result.stdout.splitlines()

    windows = commands("OS=Windows_NT")
    assert windows[0] == "python -m venv .venv"  # python3 is the Microsoft Store's stub there, if anything
    assert all("/bin/" not in line for line in windows)
    assert any(".venv/Scripts/xaioverlay demo" in line for line in windows)
    unix = commands()
    assert unix[0] == "python3 -m venv .venv" and any(".venv/bin/xaioverlay demo" in line for line in unix)
