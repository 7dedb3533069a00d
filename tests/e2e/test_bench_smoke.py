"""End-to-end: ``collector bench inmem --quick`` runs as a user runs it and writes its results.

One subprocess run, small and bounded (well under 60 s): it proves the harness, the
peers and the reporting work, not how fast anything is (benchmarks live in bench/).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_inmem_quick_runs_and_reports(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "collector", "bench", "inmem", "--quick",
        "--events", "20000", "--repeats", "1", "--workers", "1..2", "--peers", "abcde",
        "--out", str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "inmem: 20,000 events" in out
    assert "targets" in out and "collector x2" in out
    assert "WARNING: wrong counts" not in out
    (result,) = tmp_path.glob("inmem-quick-*.json")
    data = json.loads(result.read_text())
    systems = {(s["key"], s["procs"]) for s in data["summary"]}
    assert {("collector", 1), ("collector", 2), ("a", 1), ("b", 1), ("c", 2), ("d", 2)} <= systems
    if importlib.util.find_spec("bytewax") is None:
        assert "peer (e) skipped" in out  # absent peers are named with the reason, never faked
    assert all(s["eps"] > 0 for s in data["summary"])
    if importlib.util.find_spec("matplotlib") is not None:
        assert list(tmp_path.glob("inmem-quick-*.png"))
