"""tools/benchmark_ct_scale.py keeps working: a small run prints a row for every item, with figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "benchmark_ct_scale.py"


@pytest.mark.slow
def test_quick_run_prints_every_row_with_time_memory_and_passes(tmp_path):
    run = subprocess.run([sys.executable, str(TOOL), "--quick", "--same-process", "--models", "2", "--methods", "gxi",
                          "--keep", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = run.stdout
    row_pattern = r"^  (.+?)\s{2,}(ball|region|-)\s+\d.*$"
    rows = {(m.group(1), m.group(2)): m.group(0) for m in re.finditer(row_pattern, printed, re.M)}
    assert set(rows) == {("inference", "-"), ("fwd+bwd ball", "ball"), ("gxi", "ball"), ("fwd+bwd all", "-"),
                         ("fwd+bwd region", "region"), ("gxi", "region")}, printed
    gxi = rows[("gxi", "ball")].split()
    # time, three ratios, peak RSS, passes f/b, windows touched of all
    assert float(gxi[2]) > 0 and all(value.endswith("×") for value in gxi[3:6]) and float(gxi[6]) > 0
    forward, backward = map(int, gxi[7].split("/"))
    used, total = map(int, gxi[8].split("/"))
    assert forward == backward == used and 0 < used < total  # the ball touches some of the windows, each once
    assert "failed" not in printed
