"""Data-integrity figures from a real daemon (seed 002, requirement 6): a pack sharded by
session with ``Dedup(count_by="event")``, and ``Gaps`` added by the config's
``[[stages]]``; the counts show in ``GET /metrics`` (JSON ``integrity``), the
Prometheus text and ``GET /aggregates``. Two workers; every wait is bounded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from conftest import wait_until
from paths import SUPPORT
from test_daemon import Daemon, _cli, start_daemon

CONFIG = '''[pipeline]
pack = "integrity_pack:pipeline_without_gaps"

[[stages]]
kind = "gaps"
session = "session_id"
seq = "seq"
by = "event"
max_sessions = 10000
'''


def ev(session: str, seq: int, id_: str | None = None) -> dict[str, Any]:
    kind = "page_view_start" if seq % 2 else "page_view_end"
    return {"id": id_ or f"{session}-{seq}", "event": kind, "session_id": session, "seq": seq}


def prometheus(d: Daemon) -> dict[str, float]:
    status, _, body = d.request("GET", "/metrics", headers={"Accept": "text/plain"})
    assert status == 200
    out = {}
    for ln in body.decode().splitlines():
        m = re.match(r"^(collector_(?:duplicates_total|sequence_\w+)(?:\{[^}]*\})?) (\S+)$", ln)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_duplicates_per_type_and_sequence_gaps_in_metrics_and_aggregates(tmp_path: Path, no_leaks: None) -> None:
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(SUPPORT), os.environ.get("PYTHONPATH")]))}
    d = start_daemon(tmp_path, CONFIG, env=env, workers=2)
    try:
        sessions = [f"s{i}" for i in range(8)]
        status, body = d.post("/events/batch", {"events": [ev(s, q) for s in sessions for q in (1, 2, 4, 5)]})
        assert status == 202 and body["accepted"] == 32, body
        wait_until(lambda: d.get("/aggregates")[1]["gaps"]["sessions"] == 8, 10, what="both workers' partials")
        assert all(w["events"] > 0 for w in d.get("/metrics")[1]["workers"])  # sessions on both workers
        for s in sessions[:3]:  # three of the gaps filled late
            assert d.post("/events", ev(s, 3))[1]["status"] == "accepted"
        assert d.post("/events", ev("s7", 5, "s7-5-again"))[1]["status"] == "accepted"  # a repeated number
        # repeated ids: duplicates, per type
        status, body = d.post("/events/batch", {"events": [ev("s0", 1), ev("s1", 1), ev("s2", 2)]})
        assert status == 202 and body["duplicates"] == 3, body

        def integrity() -> Any:
            return d.get("/metrics")[1]["integrity"]

        wait_until(lambda: (i := integrity()) and sum(i["duplicates"]["dedup"].values()) == 3
                   and i["sequence"]["gaps"]["late"] == 3 and i["sequence"]["gaps"]["repeated"] == 1,
                   10, what="the integrity figures (each worker publishes on its own)")
        i = integrity()
        assert i["duplicates"] == {"dedup": {"page_view_start": 2, "page_view_end": 1}}
        g = i["sequence"]["gaps"]
        assert (g["gaps"], g["skipped"], g["late"], g["repeated"], g["sessions"]) == (5, 8, 3, 1, 8)
        assert g["by"]["page_view_end"]["gaps"] == 5 and g["by"]["page_view_start"]["late"] == 3

        p = prometheus(d)
        assert p['collector_duplicates_total{stage="dedup",type="page_view_start"}'] == 2
        assert p['collector_duplicates_total{stage="dedup",type="page_view_end"}'] == 1
        assert p['collector_sequence_gaps_total{stage="gaps",type="page_view_end"}'] == 8
        assert p['collector_sequence_missing{stage="gaps",type="page_view_end"}'] == 5
        assert p['collector_sequence_late_total{stage="gaps",type="page_view_start"}'] == 3
        assert p['collector_sequence_repeated_total{stage="gaps",type="page_view_start"}'] == 1
        assert p['collector_sequence_sessions{stage="gaps"}'] == 8
        status, _, text = d.request("GET", "/metrics/prometheus")
        assert status == 200 and b'collector_duplicates_total{stage="dedup",type="page_view_end"} 1' in text

        aggs = d.get("/aggregates")[1]
        assert aggs["dedup"] == i["duplicates"]["dedup"] and aggs["gaps"] == g
        status, one = d.get("/processor/aggregation?aggregator=gaps&key=page_view_start")
        assert status == 200 and one["value"]["late"] == 3
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]


def test_the_generic_pack_counts_duplicates_per_type_when_asked(tmp_path: Path, no_leaks: None) -> None:
    d = start_daemon(tmp_path, '[pipeline]\nenrich_latency = 0.001\ndedup_count_by = "type"\n', workers=2)
    try:
        one = {"id": "e-1", "type": "sensor_data", "source": "iot_device", "data": {"t": 1}}
        assert d.post("/events", one)[1]["status"] == "accepted"
        assert d.post("/events", one)[1]["status"] == "duplicate"
        wait_until(lambda: d.get("/metrics")[1]["integrity"]["duplicates"]["dedup"], 10, what="the duplicate counts")
        assert d.get("/metrics")[1]["integrity"] == {"duplicates": {"dedup": {"sensor_data": 1}}}
        assert prometheus(d) == {'collector_duplicates_total{stage="dedup",type="sensor_data"}': 1.0}
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]


def test_without_integrity_stages_metrics_has_none(tmp_path: Path, no_leaks: None) -> None:
    d = start_daemon(tmp_path, "[pipeline]\nenrich_latency = 0.001\n", workers=1)
    try:
        one = {"id": "e-1", "type": "sensor_data", "source": "iot_device"}
        assert d.post("/events", one)[1]["status"] == "accepted"
        assert d.post("/events", one)[1]["status"] == "duplicate"
        m = d.get("/metrics")[1]
        assert m["integrity"] is None and m["duplicates_dropped"] == 1
        assert prometheus(d) == {} and "dedup" not in d.get("/aggregates")[1]
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]


def test_check_config_warns_when_gaps_are_not_sharded_by_the_session(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[stages]]\nkind = "gaps"\nsession = "data.session_id"\nseq = "data.seq"\n')
    r = _cli("check-config", str(cfg))
    assert r.returncode == 0 and "gaps gaps: session data.session_id, seq data.seq; warning: the pipeline " \
        "shards by 'id'" in r.stdout, r.stdout + r.stderr
    cfg.write_text('[[stages]]\nkind = "gaps"\nsequence = "n"\n')
    r = _cli("check-config", str(cfg))
    assert r.returncode == 2 and "`$.stages[0].sequence`: unknown field of a 'gaps' stage" in r.stderr, r.stderr
