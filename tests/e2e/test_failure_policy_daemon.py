"""Failure policies of ``[[enrich]]`` steps in the daemon: per-item answers, the dead-letter
file, the per-event log lines, and the counters in ``GET /processor/enrichment`` and the
Prometheus text. A real ``collector serve`` and the aiohttp fault server; waits bounded.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from source_servers import FaultServer
from test_daemon import start_daemon

pytestmark = pytest.mark.timeout(180)

CONFIG = """
[[sources]]
name = "users"
kind = "http"
url = "{url}/v/{{key}}"
value_path = "data.value"
cache = {{ mode = "none" }}
resilience = {{ timeout = 2.0, retries = 0, backoff = 0.01, breaker_failures = 0 }}

[[enrich]]
name = "users"
source = "users"
key = "user_id"
target = "segment"
on_missing = "dead_letter"
on_error = "hold"
hold_for = 2.5
hold_backoff = 0.05
then = "keep"
log = true

[pipeline]
enrich_latency = 0
"""


def ev(i: str, user: str) -> dict[str, Any]:
    return {"id": i, "type": "user_action", "source": "web", "user_id": user}


def test_daemon_answers_dead_letters_holds_logs_and_counts_per_policy(tmp_path: Path) -> None:
    srv = FaultServer()
    with srv.running():
        d = start_daemon(tmp_path, CONFIG.format(url=srv.url), workers=1, env={"COLLECTOR_LOG_FORMAT": "json"})
        try:
            # not found → dead_letter: 422 (the same event would be refused again)
            status, body = d.post("/events", ev("one", "missing-1"))
            why = "enrich users: refused this event: key 'missing-1' not found in source users (http)"
            assert status == 422 and body == {"status": "deadlettered", "id": "one", "path": "$.user_id", "reason": why}

            status, body = d.post("/events/batch", {"events": [ev("b0", "a"), ev("b1", "missing-2"), ev("b2", "b")]})
            assert status == 202 and (body["accepted"], body["deadlettered"]) == (2, 1), body
            r = body["results"][1]
            assert r["status"] == "deadlettered" and r["path"] == "$.events[1].user_id" and "missing-2" in r["reason"]

            # the source fails for good: held for hold_for, then kept at the default, one log line each
            srv.mode = "500"
            status, body = d.post("/events/batch", {"events": [ev("c0", "c"), ev("c1", "d")]})
            assert status == 202 and body["accepted"] == 2, body

            # the source is down for 0.8 s: held, then enriched
            timer = threading.Timer(0.8, lambda: setattr(srv, "mode", "ok"))
            timer.start()
            status, body = d.post("/events/batch", {"events": [ev("e0", "e"), ev("e1", "f")]})
            timer.join()
            assert status == 202 and body["accepted"] == 2, body

            _, e = d.get("/processor/enrichment")
            u = e["sources"]["users"]
            assert u["policy"] == {"not_found": "dead_letter", "error": "hold", "then": "keep"}
            assert (u["dead_lettered"], u["held"], u["recovered"], u["kept"]) == (2, 4, 2, 2), u
            _, m = d.get("/metrics")
            assert m["enrichment"]["users"]["held"] == 4
            status, _, raw = d.request("GET", "/metrics/prometheus")
            lab = 'lookup="users",kind="http"'
            text = raw.decode()
            for name, v in (("dead_lettered", 2), ("held", 4), ("recovered", 2), ("kept", 2), ("log_suppressed", 0)):
                assert f"collector_source_{name}_total{{{lab}}} {v}" in text, name
        finally:
            assert d.stop() == 0

    stored = {r["id"]: r for r in d.stored()}
    assert set(stored) == {"b0", "b2", "c0", "c1", "e0", "e1"}
    assert stored["b0"]["segment"] == "v-a" and stored["e1"]["segment"] == "v-f"
    assert stored["c0"].get("segment") in (None, "")
    dead = d.deadletters()
    assert sorted(x["stage"] for x in dead) == ["enrich:users", "enrich:users"] and {x["reason"] for x in dead} >= {why}
    kept = [x for x in d.logs() if "keeps its default" in x.get("msg", "")]
    assert sorted(x["event_id"] for x in kept) == ["c0", "c1"], kept
    assert all(x["step"] == "users" and x["source"] == "users (http)" and x["policy"] == "keep" for x in kept)
    assert {x["key"] for x in kept} == {"c", "d"} and all("500" in x["reason"] for x in kept)
