"""End-to-end: ``collector bench inmem --quick`` runs as a user runs it and writes its results.

One subprocess run, small and bounded (JSON-array and NDJSON input, both shard modes:
about a minute on a quiet 2-CPU machine): it proves the harness, the
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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "inmem, json input: 20,000 events" in out and "inmem, ndjson input: 20,000 events" in out
    assert "targets" in out and "collector x2" in out
    assert "WARNING: wrong counts" not in out
    (result,) = tmp_path.glob("inmem-quick-*.json")
    data = json.loads(result.read_text())
    for fmt in ("json", "ndjson"):  # both inputs, both shard modes, beside every peer
        systems = {(s["key"], s["procs"], s["shard"]) for s in data["summary"] if s["input"] == fmt}
        assert {("collector", 1, "key"), ("collector", 2, "key"), ("collector", 2, "chunk"), ("a", 1, None),
                ("b", 1, None), ("c", 2, None), ("d", 2, None)} <= systems
        # the ratios the project aims at, for each shard mode: to the ceiling and to the 1-process loop
        names = [r["name"] for r in data["ratios"] if r["name"].startswith(f"inmem {fmt}:")]
        for shard in ("key", "chunk"):
            assert any(f"shard={shard} ÷ ceiling (d)" in x for x in names), names
            assert any(f"shard={shard} ÷ (b) msgspec loop" in x for x in names), names
    if importlib.util.find_spec("bytewax") is None:
        assert "peer (e) skipped" in out  # absent peers are named with the reason, never faked
    assert all(s["eps"] > 0 for s in data["summary"])
    if importlib.util.find_spec("matplotlib") is not None:
        assert list(tmp_path.glob("inmem-quick-*.png"))
