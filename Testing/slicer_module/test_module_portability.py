"""The Slicer side on Windows and macOS, caught on Linux: the worker's text streams stay UTF-8 whatever
the system's code page, and a case folder scan leaves no directory handle open (Windows pins a folder
while a handle is open: it cannot be renamed or deleted)."""

from __future__ import annotations

import os
import sys
import time
import warnings

from XAIOverlayLib import cases
from XAIOverlayLib.worker_client import WorkerClient, worker_environment


def test_worker_error_output_keeps_non_ascii_text_on_a_non_utf8_system():
    """A worker that dies with a non-ASCII message (a user's folder name, say), started from a system whose
    locale encoding is ASCII (standing in for cp1252 on Windows): the client shows the message intact."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONUTF8", "PYTHONIOENCODING"))}
    base.update(LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0")
    dying = "import sys; sys.stderr.write('cannot read C:/Users/J\\u00fcrgen/scan.nii\\n'); sys.exit(3)"
    client = WorkerClient([sys.executable, "-c", dying], env=worker_environment(base))
    client.send({"command": "describe", "model": "x"})
    events, deadline = [], time.monotonic() + 60
    while not events and time.monotonic() < deadline:
        events = client.poll(timeout=0.5)
    (died,) = events
    assert died["event"] == "died" and died["returncode"] == 3
    assert "cannot read C:/Users/Jürgen/scan.nii" in died["message"], died


def test_scanning_a_dicom_folder_closes_its_directory_handle(tmp_path):
    series = tmp_path / "cases" / "series"
    series.mkdir(parents=True)
    for number in range(3):
        (series / f"IM{number}").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = cases.cases_from_folder(tmp_path / "cases")
    assert [(case.name, case.dicom) for case in found] == [("series", True)]
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
