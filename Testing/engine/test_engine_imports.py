"""The engine runs without Slicer: no module of xaioverlay imports slicer, qt, ctk or the module's own
Slicer-side library, at top level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "XAIOverlay" / "xaioverlay"
FORBIDDEN = {"slicer", "qt", "ctk", "XAIOverlayLib", "XAIOverlay"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_engine_module_imports_slicer_qt_or_ctk():
    files = sorted(ENGINE.rglob("*.py"))
    assert len(files) > 30  # the whole package is scanned
    offenders = {str(path.relative_to(ENGINE)): sorted(imported_roots(path) & FORBIDDEN) for path in files}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_scan_sees_a_nested_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import slicer.util\n    from qt import QTimer\n", encoding="utf-8")
    assert imported_roots(sample) & FORBIDDEN == {"slicer", "qt"}
