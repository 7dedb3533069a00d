"""The clickstream pack (seed 002) as users run it: ``collector serve --pack clickstream``
with tokens checked by a real auth service and cached in real Redis, one SQLite table per
event type (the embedded default); the ingest → NATS JetStream → ETL consumer →
ClickHouse setup; pairing across a consumer restart; ``collector demo clickstream``.

Ledgers: the ids sent (and acknowledged) per type against the rows stored per table.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import _need, wait_until
from ledger import Ledger
from test_daemon import Daemon, start_daemon

from collector.clickstream import generate_sessions
from collector.packs.clickstream import table_names
from collector.sources.auth import AuthService

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]
PV = "3f2b8c1e-6a4d-4d7e-9f10-2b3c4d5e6f70"


def options(svc: AuthService, **more: str) -> str:
    lines = ['[pipeline]', 'pack = "clickstream"', "[pipeline.options]",
             f"auth_url = {json.dumps(svc.verify_url)}", f"auth_key = {json.dumps(svc.key)}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in more.items()]
    return "\n".join(lines) + "\n"


def rows(db: Path) -> dict[str, list[dict[str, Any]]]:
    con = sqlite3.connect(db)
    try:
        out = {}
        for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            out[name] = [json.loads(r[0]) for r in con.execute(f'SELECT event FROM "{name}"')]
        return out
    finally:
        con.close()


def metrics(d: Daemon) -> dict[str, Any]:
    return dict(d.get("/metrics")[1])


def test_serve_pack_clickstream_tokens_tables_pairs_and_integrity(tmp_path: Path, redis_url: str,
                                                                   no_leaks: None) -> None:
    svc = AuthService()
    with svc.running():
        tokens = {f"u{i}": svc.issue(f"u{i}", ttl=600)[0] for i in range(20)}
        d = start_daemon(tmp_path, options(svc, redis_url=redis_url), workers=2)
        try:
            # one of each type, token checked: 202 and stored without the token
            one = {"event": "quality_change", "token": tokens["u1"],
                   "data": {"video_id": "v1", "old_quality": 720, "new_quality": 1080}}
            status, body = d.post("/events", one)
            assert status == 202 and body["status"] == "accepted", body
            # a wrong type: 422 with the field path
            status, body = d.post("/events", {**one, "data": {**one["data"], "old_quality": "720p"}})
            assert status == 422 and "$.data.old_quality" in json.dumps(body), body
            # a forged token: 401, not stored
            forged = tokens["u2"][:-4] + ("AAAA" if not tokens["u2"].endswith("AAAA") else "BBBB")
            status, body = d.post("/events", {**one, "token": forged})
            assert status == 401, body
            # a null token: anonymous
            status, body = d.post("/events", {**one, "token": None, "id": "anon-1"})
            assert status == 202, body

            sent = generate_sessions(3000, seed=7, tokens=tokens)
            led = Ledger()
            led.send(e["id"] for e in sent)
            for i in range(0, len(sent), 100):
                status, body = d.post("/events/batch", {"events": sent[i:i + 100]})
                assert status == 202 and body["accepted"] == len(sent[i:i + 100]), body
                led.acked.update(e["id"] for e in sent[i:i + 100])
            # a repeated id (duplicate, per type) and a skipped sequence number (a gap)
            status, body = d.post("/events/batch", {"events": sent[:5]})
            assert status == 202 and body["duplicates"] == 5, body
            dup_types = Counter(e["event"] for e in sent[:5])
            gap = [{"event": "element_click", "token": None, "session_id": "gappy", "seq": q,
                    "data": {"element_type": "movie", "page_type": "main"}} for q in (1, 2, 5)]
            assert d.post("/events/batch", {"events": gap})[1]["accepted"] == 3

            def integrity() -> Any:
                return metrics(d).get("integrity") or {}

            wait_until(lambda: sum(integrity().get("duplicates", {}).get("dedup", {}).values()) == 5
                       and integrity()["sequence"]["gaps"]["gaps"] >= 2, 10, what="integrity figures")
            i = integrity()
            assert i["duplicates"]["dedup"] == dict(dup_types)
            assert i["sequence"]["gaps"]["gaps"] == 2  # 3 and 4 of session "gappy"; the generator skips none
            calls = svc.calls
            assert calls <= len(tokens) + 2, calls  # once per token (Redis and each worker's cache)
        finally:
            assert d.stop() == 0, d.log.read_text()[-3000:]

    tables = rows(d.data / "clickstream.db")
    stored = {e["id"]: e for name, evs in tables.items() if name != "page_view" for e in evs}
    verdict = led.check(i for i in stored if i in led.sent)
    verdict.assert_clean()
    assert verdict.duplicated == 0
    by_type = Counter(e["event"] for e in sent)
    for name, n in by_type.items():
        assert sum(1 for e in tables[name] if e["id"] in led.sent) == n, name
    assert set(table_names()) >= set(tables)
    for e in stored.values():
        assert "token" not in e and e["timestamp"].endswith("Z")
        assert e["user_id"] == "anonymous" or e["user_id"].startswith("u")
    by_token = {t: u for u, t in tokens.items()}
    for e in sent:
        assert stored[e["id"]]["user_id"] == (by_token[e["token"]] if e["token"] else "anonymous")
    assert stored["anon-1"]["user_id"] == "anonymous"
    # page views: every start with its end is one paired page_view with a duration
    ends = {(stored[e["id"]]["user_id"], e["data"]["page_view_id"]) for e in sent if e["event"] == "page_view_end"}
    pvs = {(p["user_id"], p["data"]["page_view_id"]): p for p in tables["page_view"]}
    assert set(pvs) >= ends and len(ends) > 100
    for k in ends:
        p = pvs[k]
        assert p["data"]["paired"] is True and p["data"]["duration_seconds"] >= 0, p
        assert p["data"]["page_type"] in ("movie", "category", "promotion", "main", "search")


def test_ingest_to_nats_then_etl_into_clickhouse_pairs_across_a_consumer_restart(
    tmp_path: Path, redis_url: str, clickhouse_url: str, no_leaks: None
) -> None:
    pytest.importorskip("nats")
    from test_nats import Names

    nurl = _need(os.environ.get("COLLECTOR_NATS_URL") or "nats://127.0.0.1:4222", 4222, "NATS")
    names = Names()
    db = "cs_" + uuid.uuid4().hex[:10]
    svc = AuthService()

    def ch(query: str) -> str:
        # POST: ClickHouse's HTTP GET is read-only (DROP needs POST)
        req = urllib.request.Request(clickhouse_url + "/", data=query.encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return str(r.read().decode())

    r = subprocess.run([sys.executable, "-m", "collector", "migrate", "--pack", "clickstream", "--dsn",
                        clickhouse_url, "--schema", db], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and f"create table {db}.page_view_start" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "collector", "migrate", "--pack", "clickstream", "--dsn",
                        clickhouse_url, "--schema", db], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("up to date"), r.stdout + r.stderr

    async def stream(delete: bool) -> None:
        import nats

        nc = await nats.connect(nurl, connect_timeout=5)
        try:
            js = nc.jetstream()
            if delete:
                await js.delete_stream(names.stream)
            else:
                await js.add_stream(name=names.stream, subjects=names.subjects)
        finally:
            await nc.close()

    asyncio.run(stream(False))  # the ingest side publishes into it; the ETL side consumes it
    with svc.running():
        token = svc.issue("viewer", ttl=600)[0]
        (tmp_path / "ingest").mkdir()
        (tmp_path / "etl").mkdir()
        ingest = start_daemon(tmp_path / "ingest", options(svc, role="ingest", nats_url=nurl,
                              subject_prefix=names.prefix, stream=names.stream), workers=1)
        etl_cfg = options(svc, role="etl", clickhouse_url=clickhouse_url, clickhouse_database=db,
                          redis_url=redis_url, pair_store="redis")
        etl_args = ["--source", nurl, "--stream", names.stream, "--subject", f"{names.prefix}.>",
                    "--durable", names.durable]
        try:
            starts = [{"id": f"s{i}", "event": "page_view_start", "token": token,
                       "data": {"page_view_id": str(uuid.UUID(int=i + 1)), "page_type": "movie"}} for i in range(50)]
            ends = [{**s, "id": f"e{i}", "event": "page_view_end"} for i, s in enumerate(starts)]
            clicks = [{"id": f"c{i}", "event": "element_click", "token": None,
                       "data": {"element_type": "trailer", "page_type": "movie"}} for i in range(30)]
            assert ingest.post("/events/batch", {"events": starts + clicks})[1]["accepted"] == 80
            etl = start_daemon(tmp_path / "etl", etl_cfg, workers=2, args=etl_args)
            try:
                wait_until(lambda: ch(f"SELECT count() FROM {db}.page_view_start").strip() == "50", 60,
                           what="the starts in ClickHouse")
            finally:
                assert etl.stop() == 0, etl.log.read_text()[-3000:]
            # the consumer is down; the ends arrive meanwhile; a new consumer pairs them
            assert ingest.post("/events/batch", {"events": ends})[1]["accepted"] == 50
            etl = start_daemon(tmp_path / "etl", etl_cfg, workers=2, args=etl_args)
            try:
                wait_until(lambda: ch(f"SELECT count() FROM {db}.page_view FINAL").strip() == "50", 60,
                           what="50 page views in ClickHouse")
                pv = [json.loads(x) for x in ch(f"SELECT event FROM {db}.page_view FINAL").splitlines()]
            finally:
                assert etl.stop() == 0, etl.log.read_text()[-3000:]
        finally:
            assert ingest.stop() == 0, ingest.log.read_text()[-3000:]
            asyncio.run(stream(True))

    assert all(p["user_id"] == "viewer" and p["data"]["paired"] is True for p in pv), pv[:3]
    try:
        counts = {t: int(ch(f"SELECT uniqExact(id) FROM {db}.{t}").strip())
                  for t in ("page_view_start", "page_view_end", "element_click")}
    finally:
        ch(f"DROP DATABASE IF EXISTS {db}")
    assert counts == {"page_view_start": 50, "page_view_end": 50, "element_click": 30}, counts


def test_demo_clickstream_runs_as_a_user_runs_it(tmp_path: Path, no_leaks: None) -> None:
    r = subprocess.run([sys.executable, "-m", "collector", "demo", "clickstream", "--duration", "2", "--workers", "2",
                        "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert "the daemon stopped with exit code 0" in r.stderr and " events/s" in r.stderr
    assert "rows per table" in r.stdout and "a paired page view" in r.stdout
    tables = rows(tmp_path / "d" / "clickstream.db")
    assert {"element_click", "page_view_start", "page_view_end", "page_view"} <= set(tables)
