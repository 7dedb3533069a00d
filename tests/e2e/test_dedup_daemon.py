"""Two daemons share one dedup window through Redis (``[[stages]] kind = "dedup"``,
``store = "redis"``): an event one stored is answered ``duplicate`` by the other, keyed
per type (``user_action`` by ``data.client_attempt_id``); Redis shows in
``GET /processor/status``; each event is stored once over both daemons' JSONL files.
Skipped without Redis (a failure under ``COLLECTOR_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from test_daemon import start_daemon

redis = pytest.importorskip("redis")


def config(redis_url: str, prefix: str) -> str:
    return f'''[pipeline]
enrich_latency = 0.001
dedup_ttl = 0            # the generic pack's own in-memory Dedup gives way to this one

[[stages]]
kind = "dedup"
store = "redis"
redis_url = "{redis_url}"
prefix = "{prefix}"
type_field = "type"
key_by_type = {{ user_action = "data.client_attempt_id" }}
ttl_by_type = {{ user_action = 86400, system_log = 3600 }}
count_by = "type"
'''


def stored(data: Path) -> list[str]:
    """The ids in a daemon's JSONL event files (a repeat: stored twice)."""
    out = []
    for f in sorted(data.rglob("*.jsonl")):
        if "dead" in f.name:
            continue
        out += [json.loads(line)["id"] for line in f.read_text().splitlines() if line]
    return out


def test_two_daemons_share_the_dedup_window(redis_url: str, tmp_path: Path, no_leaks: None) -> None:
    prefix = f"test:dedupd:{uuid.uuid4().hex[:12]}:"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_daemon(tmp_path / "a", config(redis_url, prefix), workers=2)
    try:
        b = start_daemon(tmp_path / "b", config(redis_url, prefix), workers=1)
        try:
            attempt = {"id": "e1", "type": "user_action", "source": "web", "data": {"client_attempt_id": "att-1"}}
            assert a.post("/events", attempt)[1]["status"] == "accepted"
            # the same attempt under a new event id, to the other daemon: a duplicate by its key
            again = {**attempt, "id": "e2"}
            status, body = b.post("/events", again)
            assert status == 200 and body["status"] == "duplicate", body
            batch = [{"id": f"s{i}", "type": "system_log", "source": "system"} for i in range(20)]
            status, body = b.post("/events/batch", {"events": batch})
            assert status == 202 and body["accepted"] == 20, body
            status, body = a.post("/events/batch", {"events": batch})
            assert body["duplicates"] == 20, body
            # no key: passes (and is stored) on both daemons
            keyless = {"id": "k1", "type": "user_action", "source": "web"}
            assert a.post("/events", keyless)[1]["status"] == "accepted"
            st = b.get("/processor/status")[1]
            (health,) = st["redis"].values()
            assert health["ok"] is True and health["kind"] == "redis"
        finally:
            b.stop()
    finally:
        a.stop()
    ids = stored(a.data) + stored(b.data)
    assert sorted(ids) == sorted(["e1", "k1", *(f"s{i}" for i in range(20))])
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.get(prefix + "user_action:att-1") == b"d" and r.pttl(prefix + "user_action:att-1") > 86_000_000
        assert 3_500_000 < r.pttl(prefix + "s0") <= 3_600_000
        keys = list(r.scan_iter(match=prefix + "*"))
        r.delete(*keys)
    finally:
        r.close()
