"""Failure policies of enrichment steps (keep, dead_letter, hold) through the public API.

Real ``Collector`` worker processes write to a JSONL sink and a dead-letter file; the
sources are the aiohttp fault server (tests/support/source_servers.py) and a real
PostgreSQL table. Each test keeps a ledger: ids sent, per-item answers, ids stored, ids
dead-lettered; nothing acknowledged may be missing. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import wait_until
from ledger import Ledger
from policy_support import Order, read_lines
from source_servers import FaultServer
from test_sources import fast, playback

from collector import Collector, Lookup, OperationResult, Pipeline
from collector.errors import ConfigError
from collector.playback import PlaybackEvent
from collector.sinks import DeadLetterConfig, JsonlSinkConfig
from collector.sources.config import (
    CacheConfig,
    HttpBatch,
    HttpSourceConfig,
    PostgresSourceConfig,
    decode_sources,
)
from collector.sources.runtime import build_enricher

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def http() -> Iterator[FaultServer]:
    with FaultServer().running() as srv:
        yield srv


def users(n: int, keys: list[str]) -> list[PlaybackEvent]:
    """``n`` playback events cycling over ``keys`` (their user ids)."""
    evs = playback(n, 1)
    for i, e in enumerate(evs):
        e.user_id = keys[i % len(keys)]
    return evs


def http_source(srv: FaultServer, userinfo: str = "", **resilience: Any) -> HttpSourceConfig:
    """The fault server in batch mode (one request per call), no local caching of answers."""
    return HttpSourceConfig(
        name="users", url=f"http://{userinfo}127.0.0.1:{srv.port}/batch", value_path="value", batch=HttpBatch(response_path="data", max_keys=100),
        resilience=fast(**resilience), cache=CacheConfig(mode="none"),
    )


def pipeline(tmp: Path, source: Any, event_type: Any = PlaybackEvent, key: str = "user_id",
             target: str = "region", **policy: Any) -> Pipeline:
    return Pipeline(
        name="policy", event_type=event_type, key=key,
        lookups=(Lookup(name=target, key=key, target=target, source=source, **policy),),
        sinks=(JsonlSinkConfig(path=str(tmp / "events-{worker}.jsonl"), fsync="never"),),
        deadletter=DeadLetterConfig(path=str(tmp / "dl-{worker}.jsonl"), fsync="never"),
    )


class Books:
    """The ledger of one run: sent, answered, stored, dead-lettered."""

    def __init__(self, tmp: Path, evs: list[Any], res: OperationResult) -> None:
        self.led = Ledger()
        ids = self.ids = [str(e.id) for e in evs]
        self.led.send(ids)
        kinds = {err.index: err for err in res.errors}
        self.errors = kinds
        self.led.answer([{"id": ids[i], "status": kinds[i].kind if i in kinds else "accepted"} for i in range(len(ids))], ids)
        self.stored = {str(x["id"]): x for x in read_lines(tmp, "events-*.jsonl")}
        self.dead = read_lines(tmp, "dl-*.jsonl")
        self.dead_ids = {str(msgspec.json.decode(d["payload"])["id"]) for d in self.dead}
        self.verdict = self.led.check(str(x["id"]) for x in read_lines(tmp, "events-*.jsonl"))

    def assert_clean(self, n: int) -> None:
        """Nothing acknowledged is lost; every id sent is stored or dead-lettered, not both."""
        self.verdict.assert_clean()
        answered_dead = {str(self.ids[i]) for i, err in self.errors.items() if err.kind == "deadlettered"}
        assert self.led.acked == set(self.stored), "acknowledged == stored"
        assert answered_dead == self.dead_ids, "answered deadlettered == in the dead-letter file"
        assert self.verdict.duplicated == 0 and len(self.dead) == len(self.dead_ids)
        assert len(self.stored) + len(self.dead_ids) == n and not (set(self.stored) & self.dead_ids)


# ---------------------------------------------------------------- keep
def test_keep_is_the_default_field_at_its_default_counted(http: FaultServer, tmp_path: Path, no_leaks: None) -> None:
    evs = users(300, ["a", "b", "missing-1", "c", "missing-2"])
    with Collector(pipeline(tmp_path, http_source(http)), workers=2, chunk_size=50) as c:
        res = c.handle(evs).wait(timeout=60)
        m = c.enrichment()["region"]
    books = Books(tmp_path, evs, res)
    books.assert_clean(300)
    assert res.errors == [] and len(books.stored) == 300
    assert all(x.get("region", "") == ("" if x["user_id"].startswith("missing") else f"v-{x['user_id']}")
               for x in books.stored.values())
    lk = res.batch.lookups["region"]
    assert lk.not_found == lk.kept == 120 and lk.dead_lettered == lk.held == 0
    assert m.kept == 120 and m.policy == {"not_found": "keep", "error": "keep"}


def test_keep_with_log_writes_one_line_per_event_within_the_rate(http: FaultServer,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    src = HttpSourceConfig(url=f"http://user:s3cret@127.0.0.1:{http.port}/v/{{key}}", value_path="data.value",
                           resilience=fast(), cache=CacheConfig(mode="none"))
    spec = Lookup(name="seg", key="user_id", target="region", source=src, log=True, log_rate=5)
    en = build_enricher((spec,), None, None, PlaybackEvent, "id")  # type: ignore[arg-type]
    lim = en.lookups[0].policy.limiter
    assert lim is not None
    now = [0.0]
    lim.clock, lim.at = (lambda: now[0]), 0.0

    async def body() -> list[Any]:
        try:
            out = [(await en.enrich(users(12, ["missing-7", "a"])))["seg"]]  # 6 events of a missing key
            out.append((await en.enrich(users(4, ["missing-8"])))["seg"])
            now[0] += 1.0  # a second later: 5 more lines may go out
            out.append((await en.enrich(users(2, ["missing-9"])))["seg"])
            return out
        finally:
            await en.close()

    with caplog.at_level(logging.INFO, logger="collector.sources"):
        first, second, third = asyncio.run(asyncio.wait_for(body(), 30))
    lines = [r for r in caplog.records if "keeps its default" in r.getMessage()]
    # a burst of log_rate lines; the rest are counted, and the next line says how many
    assert (first.kept, first.log_suppressed, second.kept, second.log_suppressed) == (6, 1, 4, 4)
    assert third.kept == 2 and third.log_suppressed == 0 and len(lines) == 7
    f = lines[0].fields  # type: ignore[attr-defined]
    assert f["step"] == "seg" and f["key"] == "missing-7" and f["reason"] == "not_found" and f["policy"] == "keep"
    assert f["event_id"] == 0 and "s3cret" not in caplog.text and "***" in f["source"]
    assert "key 'missing-7' not found in source http" in lines[0].getMessage()
    assert lines[5].fields["suppressed"] == 5 and "5 similar lines suppressed" in lines[5].getMessage()  # type: ignore[attr-defined]
    assert "suppressed" not in lines[6].fields  # type: ignore[attr-defined]


# ---------------------------------------------------------------- dead_letter
@pytest.mark.parametrize("fault", ["not_found", "error"])
def test_dead_letter_sends_failed_events_to_the_dead_letter_file_and_stores_the_rest(
        http: FaultServer, tmp_path: Path, fault: str, no_leaks: None) -> None:
    keys = ["a", "missing-1", "b", "c"] if fault == "not_found" else ["a", "b"]
    evs = users(200, keys)
    if fault == "error":
        http.mode = "500"
    src = http_source(http, userinfo="user:s3cret@")  # a password in the URL: never in a reason
    with Collector(pipeline(tmp_path, src, on_failure="dead_letter"), workers=2, chunk_size=40) as c:
        res = c.handle(evs).wait(timeout=60)
        m = c.enrichment()["region"]
    books = Books(tmp_path, evs, res)
    books.assert_clean(200)
    expect_dead = 50 if fault == "not_found" else 200
    assert len(books.dead_ids) == expect_dead == res.batch.lookups["region"].dead_lettered == m.dead_lettered
    assert res.handled_events == 200 and res.failed_events == 0  # held by the dead-letter sink: handled
    d = books.dead[0]
    assert d["stage"] == "enrich:region" and d["path"] == "$.user_id"
    if fault == "not_found":
        assert d["reason"] == "enrich region: refused this event: key 'missing-1' not found in source users (http)"
        assert all(x["region"] == f"v-{x['user_id']}" for x in books.stored.values())
    else:
        assert d["reason"].startswith("enrich region: gave up: source users (http) failed for key ")
        assert "SourceError: HTTP 500 from http://user:***@127.0.0.1:" in d["reason"], d["reason"]
    assert not any("s3cret" in x["reason"] for x in books.dead)
    assert not any("s3cret" in err.reason for err in books.errors.values())
    assert all(err.kind == "deadlettered" and err.path == "$.user_id" and err.reason.startswith("enrich region: ")
               for err in books.errors.values())


def test_dead_letter_needs_a_dead_letter_sink(http: FaultServer) -> None:
    with pytest.raises(ConfigError, match="no dead-letter sink"):
        Pipeline(name="p", event_type=PlaybackEvent, key="user_id",
                 lookups=(Lookup(name="r", key="user_id", target="region", source=http_source(http), on_missing="hold",
                                 then="dead_letter"),))


# ---------------------------------------------------------------- hold
def later(seconds: float, fn: Any) -> threading.Timer:
    t = threading.Timer(seconds, fn)
    t.start()
    return t


def test_hold_waits_for_a_source_down_half_a_second_and_stores_the_events_enriched(
        http: FaultServer, tmp_path: Path, no_leaks: None) -> None:
    evs = users(400, [f"k{i}" for i in range(20)])
    p = pipeline(tmp_path, http_source(http, breaker_failures=3, breaker_reset=0.2),
                 on_failure="hold", hold_for=5, hold_backoff=0.05, then="dead_letter")
    with Collector(p, workers=2, chunk_size=50) as c:
        http.mode = "500"
        t0 = time.monotonic()
        op = c.handle(evs)
        later(0.5, lambda: setattr(http, "mode", "ok"))
        res = op.wait(timeout=60)
        took = time.monotonic() - t0
        m = c.enrichment()["region"]
    books = Books(tmp_path, evs, res)
    books.assert_clean(400)
    assert res.errors == [] and not books.dead and len(books.stored) == 400
    assert all(x["region"] == f"v-{x['user_id']}" for x in books.stored.values())
    lk = res.batch.lookups["region"]
    assert lk.held == lk.recovered == m.held == m.recovered == 400 and lk.failures == 0 and lk.kept == 0
    assert 0.5 <= took < 5, took


@pytest.mark.parametrize("then", ["keep", "dead_letter"])
def test_a_hold_that_never_recovers_falls_back_within_hold_for(http: FaultServer, tmp_path: Path, then: str,
                                                               no_leaks: None) -> None:
    evs = users(200, ["a", "b", "c", "d"])
    http.mode = "500"
    p = pipeline(tmp_path, http_source(http, breaker_failures=0), on_failure="hold", hold_for=1.0,
                 hold_backoff=0.05, then=then)
    with Collector(p, workers=2, chunk_size=50) as c:
        t0 = time.monotonic()
        res = c.handle(evs).wait(timeout=60)
        took = time.monotonic() - t0
    books = Books(tmp_path, evs, res)
    books.assert_clean(200)
    lk = res.batch.lookups["region"]
    assert lk.held == 200 and lk.recovered == 0
    if then == "keep":
        assert lk.kept == 200 and len(books.stored) == 200 and all(x.get("region", "") == "" for x in books.stored.values())
    else:
        assert lk.dead_lettered == 200 and len(books.dead_ids) == 200
        assert books.dead[0]["reason"].startswith("enrich region: gave up: source users (http) failed for key ")
    assert 1.0 <= took < 4.0, f"a chunk waits hold_for (1 s), not more: {took:.2f}s"
    assert http.requests >= 3, "the held keys were asked again"


def test_a_held_chunk_does_not_stall_the_other_chunks_of_its_worker(http: FaultServer, tmp_path: Path,
                                                                    no_leaks: None) -> None:
    held_src = HttpSourceConfig(name="users", url=f"{http.url}/v/{{key}}", value_path="data.value",
                                resilience=fast(breaker_failures=0), cache=CacheConfig(mode="none"))
    p = pipeline(tmp_path, held_src, on_missing="hold", hold_for=3.0, hold_backoff=0.05)
    with Collector(p, workers=1, chunk_size=50) as c:
        slow = c.handle(users(50, ["missing-1"]))  # held for 3 s: the key never appears
        time.sleep(0.2)
        t0 = time.monotonic()
        quick = c.handle(users(500, [f"k{i}" for i in range(50)])).wait(timeout=60)
        took = time.monotonic() - t0
        assert not slow.done(), "still held"
        res = slow.wait(timeout=60)
    assert quick.errors == [] and took < 1.5, f"chunks behind a held one took {took:.2f}s"
    lk = res.batch.lookups["region"]
    assert lk.held == 50 and lk.kept == 50 and lk.recovered == 0


def test_held_events_survive_a_worker_killed_mid_hold(http: FaultServer, tmp_path: Path, no_leaks: None) -> None:
    evs = users(100, [f"k{i}" for i in range(10)])
    p = pipeline(tmp_path, http_source(http, breaker_failures=0), on_failure="hold", hold_for=30,
                 hold_backoff=0.05, then="dead_letter")
    with Collector(p, workers=1, chunk_size=50) as c:
        http.mode = "500"
        op = c.handle(evs)
        wait_until(lambda: http.requests >= 3, 30, what="the held keys asked again")
        victim = c.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: c.worker_pids()[0] not in (0, victim), 30, what="the worker replaced")
        http.mode = "ok"
        res = op.wait(timeout=60)
    books = Books(tmp_path, evs, res)
    books.assert_clean(100)
    assert res.errors == [] and len(books.stored) == 100 and not books.dead
    assert all(x["region"] == f"v-{x['user_id']}" for x in books.stored.values())
    assert res.batch.redelivered_chunks >= 1


# ---------------------------------------------------------------- PostgreSQL: a missing row
@pytest.fixture
def players(pg_dsn: str) -> Iterator[str]:
    import asyncpg

    table = f"players_{uuid.uuid4().hex[:8]}"

    async def run(sql: str, *args: Any) -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE TABLE {table} (id bigint primary key, email text)"))
    asyncio.run(run(f"INSERT INTO {table} SELECT i, 'p' || i || '@example.com' FROM generate_series(10, 14) AS i"))
    yield table
    asyncio.run(run(f"DROP TABLE IF EXISTS {table}"))


def test_postgres_missing_row_held_until_inserted_or_dead_lettered(pg_dsn: str, players: str, tmp_path: Path,
                                                                   no_leaks: None) -> None:
    import asyncpg

    evs = [Order(id=i, player_id=10 + i % 7) for i in range(140)]  # players 15 and 16 are not in the table
    src = PostgresSourceConfig(name="players", dsn=pg_dsn, table=players, columns=("email",))
    p = pipeline(tmp_path, src, event_type=Order, key="player_id", target="player",
                 on_missing="hold", hold_for=3.0, hold_backoff=0.05, then="dead_letter")

    async def insert_15() -> None:
        await asyncio.sleep(0.5)
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f"INSERT INTO {players} VALUES (15, 'late@example.com')")
        finally:
            await conn.close()

    with Collector(p, workers=2, chunk_size=35) as c:
        op = c.handle(evs)
        asyncio.run(asyncio.wait_for(insert_15(), 30))
        res = op.wait(timeout=60)
    books = Books(tmp_path, evs, res)
    books.assert_clean(140)
    assert {x["player_id"] for x in books.stored.values()} == set(range(10, 16))
    assert all(x["player"] == f"p{x['player_id']}@example.com" for x in books.stored.values() if x["player_id"] < 15)
    assert all(x["player"] == "late@example.com" for x in books.stored.values() if x["player_id"] == 15)
    assert len(books.dead_ids) == 20 and books.dead[0]["reason"] == (
        "enrich player: refused this event: key 16 not found in source players (postgres)")
    lk = res.batch.lookups["player"]
    # the events of player 15 in chunks run before the insert were held, then recovered
    assert lk.dead_lettered == 20 and lk.held == lk.recovered + 20 and lk.recovered > 0


# ---------------------------------------------------------------- configuration
def test_policy_from_toml_and_bad_values_name_their_path(tmp_path: Path) -> None:
    doc = {"sources": [{"name": "fx", "kind": "map", "data": {"a": 1}}],
           "enrich": [{"source": "fx", "key": "k", "target": "t", "on_missing": "dead_letter", "on_error": "hold",
                       "hold_for": 2, "then": "dead_letter", "log": True}]}
    (lk,) = decode_sources(doc)
    assert (lk.policy_for("not_found"), lk.policy_for("error"), lk.then, lk.hold_for) == ("dead_letter", "hold", "dead_letter", 2)
    for bad, match in [({"on_failure": "drop"}, r"\$\.enrich\[0\]\.on_failure"),
                       ({"then": "hold"}, r"\$\.enrich\[0\]\.then"),
                       ({"hold_for": 0}, r"\$\.enrich\[0\]\.hold_for"),
                       ({"on_faillure": "keep"}, r"on_faillure.*\$\.enrich\[0\]")]:
        with pytest.raises(ConfigError, match=match):
            decode_sources({**doc, "enrich": [{"source": "fx", "key": "k", "target": "t", **bad}]})
    with pytest.raises(ConfigError, match="on_error must be one of"):
        Lookup(name="x", key="k", target="t", method="m", on_error="retry")

    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[sources]]\nname = "users"\nkind = "map"\ndata = { u1 = "gold" }\n\n'
                   '[[enrich]]\nsource = "users"\nkey = "user_id"\ntarget = "segment"\non_failure = "dead-letter"\n')
    r = subprocess.run([sys.executable, "-m", "collector", "check-config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "$.enrich[0].on_failure" in r.stderr and str(cfg) in r.stderr, r.stderr
    cfg.write_text(cfg.read_text().replace('"dead-letter"', '"hold"\nhold_for = 2\nthen = "dead_letter"'))
    r = subprocess.run([sys.executable, "-m", "collector", "check-config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "lookup segment: segment from user_id via 'users'; not found: hold 2s/10 tries then dead_letter" in r.stdout


def test_returned_events_stay_aligned_when_a_step_or_a_sink_dead_letters(http: FaultServer, tmp_path: Path,
                                                                        no_leaks: None) -> None:
    evs = users(12, ["a", "missing-1", "b"])
    for i, e in enumerate(evs):
        e.device_type = "web" if i % 4 == 0 else "tv"
    p = pipeline(tmp_path, http_source(http), on_missing="dead_letter")
    only_tv = JsonlSinkConfig(path=str(tmp_path / "events-{worker}.jsonl"), fsync="never",
                              when={"path": "device_type", "eq": "tv"})  # a web event: no sink takes it
    with Collector(p.with_sinks(only_tv), workers=1) as c:
        res = c.handle(evs, return_events=True).wait(timeout=60)
    kinds = {e.index: e.reason.partition(":")[0] for e in res.errors}
    assert kinds == {i: ("enrich region" if evs[i].user_id == "missing-1" else "sink routing")
                     for i in range(12) if evs[i].user_id == "missing-1" or i % 4 == 0}
    assert res.events is not None
    for i, got in enumerate(res.events):
        assert (got is None) == (i in kinds) and (got is None or (got.id, got.region) == (i, f"v-{evs[i].user_id}"))
