"""Per-source enrichment metrics (issue 11): shared-memory figures per lookup, read from
``Collector.enrichment()``, the daemon's ``/metrics`` (JSON and Prometheus text) and
``GET /processor/enrichment``; and the ``collector rates-service`` command.

Real processes, real HTTP: an aiohttp fault server (tests/support/source_servers.py)
behind an ``http`` source; every wait is bounded.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from source_servers import FaultServer
from test_daemon import start_daemon
from test_sources import fast, playback, region_pipeline

from collector import Collector
from collector.sources.config import HttpSourceConfig

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]

SOURCE = """
[[sources]]
name = "users"
kind = "http"
url = "{url}/v/{{key}}"
value_path = "data.value"
resilience = {{ timeout = 2.0, retries = 0, backoff = 0.01, breaker_failures = 3, breaker_reset = 120 }}

[[enrich]]
name = "users"
source = "users"
key = "user_id"
target = "segment"

[pipeline]
enrich_latency = 0
"""


def _events(prefix: str, keys: list[str], repeat: int = 2) -> dict[str, Any]:
    evs = [{"id": f"{prefix}-{i}-{j}", "type": "user_action", "source": "web", "user_id": k}
           for i, k in enumerate(keys) for j in range(repeat)]
    return {"events": evs}


def test_daemon_shows_per_source_figures_errors_by_kind_and_the_open_breaker(tmp_path: Path) -> None:
    srv = FaultServer()
    with srv.running():
        d = start_daemon(tmp_path, SOURCE.format(url=srv.url), workers=1)
        try:
            # ok: 5 distinct keys, each twice in the chunk → 1 call (5 keys), then all cached
            status, body = d.post("/events/batch", _events("a", [f"u{i}" for i in range(5)]))
            assert status == 202 and body["accepted"] == 10, body
            status, body = d.post("/events/batch", _events("b", [f"u{i}" for i in range(5)]))
            assert status == 202 and body["accepted"] == 10, body
            _, e = d.get("/processor/enrichment")
            u = e["sources"]["users"]
            assert u["kind"] == "http" and u["calls"] >= 1 and u["keys_fetched"] == 5
            assert u["misses"] == 10 and u["cache_hits"] == 10 and u["failures"] == 0
            assert u["success_rate"] == 1.0 and u["breaker"] == "closed" and u["latency_ms"]["count"] == u["calls"]
            assert e["events"] == 20 and e["success_rate"] == 1.0

            # faults: invalid JSON once, then two 500s → 3 consecutive failures open the breaker
            srv.mode = "badjson"
            assert d.post("/events/batch", _events("c", ["x0", "x1"]))[0] == 202
            srv.mode = "500"
            assert d.post("/events/batch", _events("d", ["y0", "y1"]))[0] == 202
            assert d.post("/events/batch", _events("e", ["z0", "z1"]))[0] == 202
            asked = srv.requests
            assert d.post("/events/batch", _events("f", ["w0"]))[0] == 202  # refused at once: no request
            assert srv.requests == asked

            _, e = d.get("/processor/enrichment")
            u = e["sources"]["users"]
            assert u["errors"]["invalid"] == 1 and u["errors"]["http_status"] == 2, u["errors"]
            assert u["errors"]["timeout"] == 0 and u["errors"]["connection"] == 0
            assert u["breaker"] == "open" and u["breaker_workers"]["open"] == 1, u
            assert u["breaker_transitions"]["open"] == 1 and u["short_circuited"] >= 1
            assert u["failures"] == 14 and u["success_rate"] == pytest.approx(1 - 14 / 34, abs=1e-5)
            assert 0 < u["latency_ms"]["p50"] <= u["latency_ms"]["p99"]

            # /metrics JSON carries the same figures; the Prometheus text has them per lookup
            _, m = d.get("/metrics")
            assert m["enrichment"]["users"]["errors"]["http_status"] == 2
            assert m["enrichment"]["users"]["cache_hits"] == 10
            status, _, raw = d.request("GET", "/metrics/prometheus")
            text = raw.decode()
            assert status == 200
            lab = 'lookup="users",kind="http"'
            assert f"collector_source_cache_hits_total{{{lab}}} 10" in text
            assert f'collector_source_errors_total{{{lab},error="http_status"}} 2' in text
            assert f'collector_source_errors_total{{{lab},error="invalid"}} 1' in text
            assert f'collector_source_breaker_workers{{{lab},state="open"}} 1' in text
            assert f'collector_source_breaker_transitions_total{{{lab},to="open"}} 1' in text
            assert f'collector_source_call_latency_seconds_bucket{{{lab},le="+Inf"}} {u["calls"]}' in text

            _, doc = d.get("/openapi.json")
            assert "/processor/enrichment" in doc["paths"] and "EnrichmentStats" in doc["components"]["schemas"]
        finally:
            assert d.stop() == 0


def test_collector_enrichment_embedded(no_leaks: None) -> None:
    srv = FaultServer()
    with srv.running():
        src = HttpSourceConfig(url=f"{srv.url}/v/{{key}}", value_path="data.value", resilience=fast(timeout=5))
        with Collector(region_pipeline(src), workers=2, chunk_size=100) as c:
            assert c.enrichment()["region"].events == 0
            res = c.handle(playback(1000, 50)).wait(timeout=60)
            assert res.handled_events == 1000
            srv.mode = "500"
            c.handle(playback(60, 60)[50:]).wait(timeout=60)  # 10 new keys, all failing
            e = c.enrichment()
        r = e["region"]
        lk = res.batch.lookups["region"]
        assert r.kind == "http" and r.keys_fetched >= 50 and r.calls >= lk.calls
        assert r.cache_hits + r.misses == 1010 and r.cache_hits >= lk.cache_hits
        assert r.errors["http_status"] >= 1 and r.failures == 10 and r.success_rate == pytest.approx(1 - 10 / 1010)
        assert r.breaker == "closed" and sum(r.breaker_workers.values()) == 2


def test_rates_service_command_serves_latest_until_sigterm(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector", "rates-service", "--port", "0", "--port-file", str(port_file),
         "--rate", "USD=1.25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        wait_until(lambda: (port_file.exists() and port_file.read_text().strip()) or proc.poll() is not None,
                   30, what="the rates service to listen")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        port = int(port_file.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/latest", timeout=10) as r:
            doc = json.loads(r.read())
        assert doc["base"] == "EUR" and doc["rates"]["USD"] == 1.25 and doc["rates"]["EUR"] == 1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert f"rates service on http://127.0.0.1:{port}/latest" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_timeouts_and_refused_connections_are_counted_by_kind(no_leaks: None) -> None:
    from source_servers import free_port

    from collector import Lookup, Pipeline
    from collector.playback import PlaybackEvent

    srv = FaultServer()
    with srv.running():
        srv.mode, srv.delay = "slow", 2.0
        slow = HttpSourceConfig(url=f"{srv.url}/v/{{key}}", value_path="data.value", resilience=fast(timeout=0.3))
        dead = HttpSourceConfig(url=f"http://127.0.0.1:{free_port()}/v/{{key}}", resilience=fast(timeout=2))
        p = Pipeline(name="kinds", event_type=PlaybackEvent, key="user_id", lookups=(
            Lookup(name="slow", key="user_id", target="region", source=slow),
            Lookup(name="dead", key="device_type", target="model", source=dead),
        ))
        with Collector(p, workers=1) as c:
            res = c.handle(playback(20, 5)).wait(timeout=60)
            e = c.enrichment()
    assert res.handled_events == 20
    assert e["slow"].errors["timeout"] >= 1 and e["slow"].failures == 20 and e["slow"].success_rate == 0.0
    assert e["dead"].errors["connection"] >= 1 and e["dead"].failures == 20
    assert e["slow"].latency_ms["p50"] >= 250.0  # the call waited for its 0.3 s timeout
