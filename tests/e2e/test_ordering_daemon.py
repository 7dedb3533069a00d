"""``Order`` in a real daemon: ``[[stages]] kind = "order"`` with a buffer after an
``enrich`` stage; answers come once the held events were committed, and the ordering
counters show in ``GET /metrics`` (JSON ``integrity``) and its Prometheus text, and the
JSON-lines sink holds the events in time order. One
worker; every wait is bounded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from conftest import wait_until
from test_daemon import Daemon, start_daemon

CONFIG = '''[pipeline]
enrich_latency = 0.001

[[stages]]
kind = "enrich"

[[stages]]
kind = "order"
key = "source"
by = "timestamp"
max_delay = 0.5
'''


def ev(minute: int) -> dict[str, Any]:
    return {"id": f"e-{minute}", "type": "sensor_data", "source": "iot_device",
            "timestamp": f"2026-11-30T10:{minute:02d}:00Z", "data": {"minute": minute}}


def prometheus(d: Daemon) -> dict[str, float]:
    status, _, body = d.request("GET", "/metrics", headers={"Accept": "text/plain"})
    assert status == 200
    out = {}
    for ln in body.decode().splitlines():
        m = re.match(r"^(collector_ordering_\w+(?:\{[^}]*\})?) (\S+)$", ln)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_ordering_counters_in_metrics_and_answers_after_the_commit(tmp_path: Path, no_leaks: None) -> None:
    d = start_daemon(tmp_path, CONFIG, workers=1)
    try:
        status, body = d.post("/events/batch", {"events": [ev(m) for m in (5, 1, 4, 2, 3, 6)]})
        assert status == 202 and body["accepted"] == 6, body
        assert d.post("/events", ev(0))[1]["status"] == "accepted"  # older than what was delivered: late, stored

        def ordering() -> Any:
            i = d.get("/metrics")[1]["integrity"]
            return i and i.get("ordering", {}).get("order")

        o = wait_until(lambda: (o := ordering()) and o["ordered"] == 7 and o, 10, what="the ordering counters")
        assert (o["reordered"], o["late"], o["held"], o["untimed"]) == (4, 1, 0, 0), o  # 1, 4, 2, 3 came after 5
        p = prometheus(d)
        assert p['collector_ordering_reordered_total{stage="order"}'] == 4
        assert p['collector_ordering_late_total{stage="order"}'] == 1
        assert p['collector_ordering_held{stage="order"}'] == 0
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
    # the JSON-lines sink (one file per worker) holds them in time order, the late one last
    (f,) = (tmp_path / "data").glob("events-*.jsonl")
    assert [json.loads(ln)["data"]["minute"] for ln in f.read_text().splitlines()] == [1, 2, 3, 4, 5, 6, 0]
