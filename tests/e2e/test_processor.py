"""Seed 003's processor endpoints and routing, from a real daemon (two workers).

``GET /processor/status`` and ``GET /metrics/processor`` answer what the daemon did
(events routed, blocked, duplicated, enriched through a map source with a two-level
cache in Redis) and are validated against the daemon's own OpenAPI document; routes
to two sinks are read back per sink; ``collector check-config`` refuses a route to a
sink that does not exist, naming the rule's path. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema_rs
from conftest import wait_until
from test_daemon import Daemon, _cli, start_daemon

REDIS = os.environ.get("COLLECTOR_TEST_REDIS", "redis://127.0.0.1:6379/0")

CONFIG = f'''[pipeline]
enrich_latency = 0.001

[[sinks]]
kind = "jsonl"
name = "main"
path = "events-{{worker}}.jsonl"

[[sinks]]
kind = "sqlite"
name = "audit"
path = "audit.db"
default = false

[[sources]]
name = "segments"
kind = "map"
data = {{ user_1 = "gold", user_2 = "silver" }}
cache = {{ mode = "two-level", redis_url = "{REDIS}", redis_prefix = "collector-test-processor:" }}

[[enrich]]
source = "segments"
key = "user_id"
target = "segment"

[[rules]]
name = "bots"
when = {{ path = "data.user_agent", regex = "(?i)bot" }}
action = "block"

[[rules]]
name = "premium-to-audit"
when = {{ path = "data.user_type", eq = "premium" }}
action = "route"
sinks = ["audit", "main"]
set = {{ "data.route" = "high_value" }}

[[rules]]
name = "logs-to-audit-only"
when = {{ path = "type", eq = "system_log" }}
action = "route"
sinks = ["audit"]
'''


def _redis_up() -> bool:
    u = urlsplit(REDIS)
    with contextlib.suppress(OSError), socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), 1):
        return True
    return False


def _validate(doc: dict[str, Any], name: str, body: Any) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    errors = [str(e) for e in jsonschema_rs.validator_for(schema).iter_errors(body)]
    assert not errors, errors[:5]


def test_routes_status_and_processor_metrics(tmp_path: Path, no_leaks: None) -> None:
    d = start_daemon(tmp_path, CONFIG)
    try:
        _run(d)
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]


def _run(d: Daemon) -> None:
    events = []
    for i in range(60):
        kind = ("user_action", "system_log", "sensor_data")[i % 3]
        data: dict[str, Any] = {"n": i}
        if i % 5 == 0:
            data["user_type"] = "premium"
        if i % 7 == 0:
            data["user_agent"] = "Googlebot/2.1"
        events.append({"id": f"ev-{i}", "type": kind, "source": "web", "user_id": f"user_{i % 3}", "data": data})
    status, body = d.post("/events/batch", {"events": events})
    assert status == 202 and body["invalid"] == 0 and body["failed"] == 0, body
    status, dup = d.post("/events", events[1])  # a duplicate (if it was stored) or filtered again
    assert status == 200
    blocked = {e["id"] for e in events if "user_agent" in e["data"]}
    assert {r["id"] for r in body["results"] if r["status"] == "filtered"} == blocked
    # the ledger per sink: premium → audit and main; system_log → audit only; the rest → main (default)
    want_main, want_audit = set(), set()
    for e in events:
        if e["id"] in blocked:
            continue
        premium, log = "user_type" in e["data"], e["type"] == "system_log"
        if premium or log:
            want_audit.add(e["id"])
        if premium or not log:
            want_main.add(e["id"])
    main = {r["id"] for r in d.stored()}
    with contextlib.closing(sqlite3.connect(d.data / "audit.db")) as db:
        audit = {r[0] for r in db.execute("SELECT id FROM events")}
    assert main == want_main and audit == want_audit

    doc = d.get("/openapi.json")[1]
    assert {"/processor/status", "/metrics/processor"} <= set(doc["paths"])

    redis_up = _redis_up()
    status, st = d.get("/processor/status")
    _validate(doc, "ProcessorStatus", st)
    assert st["status"] == ("ok" if redis_up else "degraded") and status == 200, st
    assert st["workers"] == {"alive": 2, "total": 2, "heartbeats_fresh": True, "inflight_events": 0}
    assert st["sinks"] == {"main": {"ok": True}, "audit": {"ok": True}, "deadletter": {"ok": True}}
    assert st["sources"] == {"segment": {"ok": True, "kind": "map"}}
    (redis,) = st["redis"].values()
    assert redis["ok"] is redis_up and redis["kind"] == "redis"

    n_stored = len(events) - len(blocked)

    def metrics() -> Any:
        status, m = d.get("/metrics/processor")
        assert status == 200
        return m

    m = wait_until(lambda: (lambda m: m if m["events_filtered_total"] == len(blocked) else None)(metrics()), 10,
                   what="the filtered total")
    _validate(doc, "ProcessorMetrics", m)
    dups = 0 if dup["status"] == "filtered" else 1
    assert m["events_deduplicated_total"] == dups
    assert m["events_processed_total"] == len(events) + 1 and m["events_failed_total"] == 0
    assert m["events_enriched_total"] == n_stored  # enrichment runs after the rules: blocked events skip it
    hist = m["processing_duration"]
    assert hist["chunks"] >= 2 and hist["buckets"][-1] == {"le_ms": None, "count": hist["chunks"]}
    assert hist["p50_ms"] is not None and hist["p50_ms"] <= hist["p99_ms"]
    # a map source answers from memory (no calls, no cache): the ratio has nothing to say yet
    ratio, e = m["enrichment_cache_hit_ratio"], m["enrichment"]
    assert set(e) == {"lookup_calls", "cache_hits", "coalesced", "lookup_failures"} and e["lookup_failures"] == 0
    assert (ratio is None) == (e["cache_hits"] + e["lookup_calls"] == 0) and (ratio is None or 0 <= ratio <= 1)
    assert [w["index"] for w in m["workers"]] == [0, 1] and all(w["alive"] for w in m["workers"])
    assert 0.0 <= m["worker_utilization_percent"] <= 100.0 * os.cpu_count()  # type: ignore[operator]
    n_premium = sum(1 for e in events if "user_type" in e["data"] and e["id"] not in blocked)
    wait_until(lambda: d.get("/processor/filters")[1]["filters"]["rules"]["premium-to-audit"]["routed"] == n_premium,
               10, what="the route counter")
    assert json.dumps(m)  # plain JSON


def test_check_config_refuses_a_route_to_an_unknown_sink(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.replace('sinks = ["audit", "main"]', 'sinks = ["audit", "mian"]'))
    r = _cli("check-config", str(bad))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "`$.rules[1].sinks[1]`: unknown sink 'mian' (the pipeline's sinks: main, audit" in r.stderr, r.stderr
    good = tmp_path / "good.toml"
    good.write_text(CONFIG)
    r = _cli("check-config", str(good))
    assert r.returncode == 0 and "premium-to-audit (route -> audit, main)" in r.stdout, r.stdout + r.stderr
    r = _cli("serve", "--config", str(bad))
    assert r.returncode == 78 and "mian" in r.stderr
    typo = tmp_path / "typo.toml"  # a sink's own selector is checked with its path too
    typo.write_text(CONFIG.replace('default = false\n', 'default = false\nwhen = { path = "type", regexp = "log" }\n'))
    r = _cli("check-config", str(typo))
    assert r.returncode == 2 and "`$.sinks[1].when.regexp`: unknown operator 'regexp'" in r.stderr, r.stderr
