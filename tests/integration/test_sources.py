"""Enrichment sources against real servers: an aiohttp fault server, PostgreSQL, MariaDB, Redis.

Runtimes are driven through the worker's real ``Enricher`` (no engine mocks); clocks
are patched where a TTL or the breaker's reset timeout matters. Every wait is bounded
(``asyncio.wait_for`` around each test body, pytest-timeout around each test).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from source_servers import FaultServer, free_port

from collector import Collector, Lookup, Pipeline
from collector.errors import ConfigError, MissingDependency
from collector.playback import PlaybackEvent
from collector.protocol import LookupSummary
from collector.retry import Backoff
from collector.sources import SOURCES, build_source, source_class
from collector.sources.cache import FOUND, MISS, NOT_FOUND, SKIP, LocalCache
from collector.sources.client import ClientSource
from collector.sources.config import (
    CacheConfig,
    HttpBatch,
    HttpSourceConfig,
    RatesSourceConfig,
    ResilienceConfig,
    decode_source_config,
    decode_sources,
)
from collector.sources.guard import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from collector.sources.http import HttpSource
from collector.sources.memory import MapSource
from collector.sources.rates import RatesService, RatesSource, convert
from collector.sources.redis import RedisSource
from collector.sources.runtime import Enricher, SourceRuntime
from collector.sources.sql import MysqlSource, PostgresSource, SqliteSource

T = TypeVar("T")


class Ev(msgspec.Struct):
    id: int
    k: Any
    out: Any = None
    amount: int = 0


def events(keys: list[Any]) -> list[Ev]:
    return [Ev(i, k) for i, k in enumerate(keys)]


def run(fn: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """Run an async test body with a bound on its duration."""

    async def main() -> T:
        return await asyncio.wait_for(fn(), timeout)

    return asyncio.run(main())


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def runtime(source: Any, clock: Callable[[], float] = time.monotonic, **lookup: Any) -> tuple[Enricher, SourceRuntime]:
    spec = Lookup(name="x", key="k", target="out", source=source, **lookup)
    rt = SourceRuntime(spec, build_source(source), clock=clock)
    return Enricher([rt]), rt


async def enrich(en: Enricher, evs: list[Ev]) -> LookupSummary:
    return (await en.enrich(evs))["x"]


def fast(**kw: Any) -> ResilienceConfig:
    base: dict[str, Any] = {"timeout": 1.0, "retries": 0, "backoff": 0.01, "breaker_failures": 0}
    base.update(kw)
    return ResilienceConfig(**base)


@pytest.fixture
def http() -> Iterator[FaultServer]:
    with FaultServer().running() as srv:
        yield srv


# ---------------------------------------------------------------- pure parts
def test_backoff_is_full_jitter_capped_and_exponential() -> None:
    b = Backoff(base=0.1, cap=0.5, retries=5)
    assert [b.ceiling(i) for i in range(4)] == [0.1, 0.2, 0.4, 0.5]
    assert b.delay(2, rand=lambda lo, hi: lo) == 0.0  # full jitter: the floor is 0
    assert b.delay(9, rand=lambda lo, hi: hi) == 0.5
    tries = []

    async def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise OSError("down")
        return "ok"

    assert run(lambda: Backoff(0.001, retries=2).run(flaky)) == "ok" and len(tries) == 3


def test_breaker_opens_fails_fast_half_opens_and_closes_on_a_patched_clock() -> None:
    clock = Clock()
    br = CircuitBreaker(failures=3, reset_timeout=5.0, clock=clock)
    for _ in range(2):
        assert br.allow()
        br.failure()
    assert br.state == CLOSED
    br.failure()
    assert br.state == OPEN and br.opens == 1 and not br.allow()
    clock.t += 5.0
    assert br.state == HALF_OPEN
    assert br.allow() and not br.allow()  # one probe only
    br.failure()  # the probe failed: open again
    assert br.state == OPEN and br.opens == 2
    clock.t += 5.0
    assert br.allow()
    br.success()
    assert br.state == CLOSED and br.allow()
    rate = CircuitBreaker(failures=0, error_rate=0.5, window=4, clock=clock)
    for ok in (True, False, True, False):
        rate.success() if ok else rate.failure()
    assert rate.state == OPEN


def test_configs_are_tagged_frozen_and_forbid_unknown_fields() -> None:
    cfg = decode_source_config({"kind": "http", "url": "http://x/{key}", "cache": {"mode": "two-level"}})
    assert isinstance(cfg, HttpSourceConfig) and cfg.cache.mode == "two-level"
    with pytest.raises(ConfigError, match="urll"):
        decode_source_config({"kind": "http", "urll": "x"})
    with pytest.raises(ConfigError, match="sorcery"):
        decode_source_config({"kind": "sorcery"})
    assert set(SOURCES) == {"client", "http", "postgres", "mysql", "redis", "map", "rates", "sqlite"}
    assert source_class("map") is MapSource
    assert "secret" not in repr(decode_source_config({"kind": "postgres", "dsn": "postgresql://u:secret@h/db", "table": "t", "columns": ["a"]}))
    with pytest.raises(ConfigError, match="either"):
        Lookup(name="x", key="k", target="out")


def test_sources_and_enrichment_steps_from_toml() -> None:
    import tomllib

    doc = tomllib.loads("""
[[sources]]
name = "players"
kind = "postgres"
dsn_env = "PG_DSN"
table = "players"
columns = ["email", "last_signed_in_at"]

[[sources]]
name = "fx"
kind = "rates"
max_age = 60
cache = { mode = "none" }

[[enrich]]
source = "players"
key = "player_id"
target = "player"

[[enrich]]
source = "fx"
key = "currency"
key_fields = ["amount"]
target = "amount_eur"
""")
    players, fx = decode_sources(doc)
    assert players.name == "player" and players.source.table == "players" and players.source.cache.mode == "none"
    assert fx.key_fields == ("amount",) and isinstance(fx.source, RatesSourceConfig) and fx.source.max_age == 60
    doc["sources"][0]["tabel"] = "x"
    with pytest.raises(ConfigError, match=r"tabel.*\$\.sources\[0\]"):
        decode_sources(doc)
    with pytest.raises(ConfigError, match="'nope' is not a source"):
        decode_sources({"sources": [], "enrich": [{"source": "nope", "key": "k", "target": "t"}]})


def test_a_missing_driver_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "aiohttp", None)
    with pytest.raises(MissingDependency, match=r"pip install 'collector\[http\]'"):
        HttpSource(url="http://x/{key}")


def test_rates_conversion_rule() -> None:
    rates = {"USD": Decimal("1.0832"), "BTC": Decimal("0.0000161")}
    dec = {"EUR": 2, "USD": 2, "BTC": 8}
    assert convert(500, "USD", rates, "EUR", dec) == 462  # 5 / 1.0832 = 4.6159 EUR
    assert convert(10000, "EUR", rates, "EUR", dec) == 10000
    assert convert(100_000, "BTC", rates, "EUR", dec) == 6211  # 0.001 BTC = 62.11 EUR
    assert convert(1, "USD", {"USD": Decimal("0.4")}, "EUR", dec) == 3  # 2.5 cents: half away from zero
    assert convert(-1, "USD", {"USD": Decimal("0.4")}, "EUR", dec) == -3
    with pytest.raises(KeyError):
        convert(1, "XYZ", rates, "EUR", dec)


def test_local_cache_bounds_expires_per_outcome_and_keeps_stale_copies() -> None:
    c = LocalCache(10, not_found_ttl=2, error_ttl=1, stale_ttl=5, max_entries=3)
    c.put("a", 1, FOUND, 0)
    c.put("n", SKIP, NOT_FOUND, 0)
    c.put("b", 2, FOUND, 1)
    c.put("c", 3, FOUND, 2)  # full: the entry nearest its deadline ("n", due at 2) goes
    assert sorted(c) == ["a", "b", "c"]
    c.sweep(10.5)  # "a" expired: moved to the stale table until 15
    assert sorted(c) == ["b", "c"] and c.stale_value("a", 12) == 1
    assert c.stale_value("a", 15) is MISS
    c.put("a", 9, FOUND, 12)  # found again: no stale copy left behind
    assert "a" not in c.stale and c.values["a"] == 9
    c.sweep(13)  # "b" (due 11) and "c" (due 12) are stale until 16 and 17
    assert c.stale_value("a", 13) is MISS and c.stale_value("b", 13) == 2 and c.stale_value("c", 16.5) == 3


# ---------------------------------------------------------------- caching, TTLs, stale, breaker
class Flaky:
    """A client whose answers and failures the test controls; counts calls."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {"a": "A", "b": "B"}
        self.down = False
        self.calls = 0

    def source(self, cache: CacheConfig, resilience: ResilienceConfig) -> ClientSource:
        src = ClientSource.of(self, "get")
        src.config = msgspec.structs.replace(src.config, cache=cache, resilience=resilience)
        return src

    async def get(self, k: str) -> str | None:
        self.calls += 1
        if self.down:
            raise ConnectionError("source down")
        return self.data.get(k)


def test_found_not_found_and_error_ttls_are_separate() -> None:
    async def body() -> None:
        clock = Clock()
        cl = Flaky()
        en, _ = runtime(cl.source(cache=CacheConfig(ttl=10, not_found_ttl=2, error_ttl=1, stale_ttl=0), resilience=fast()), clock)
        s = await enrich(en, events(["a", "zz"]))
        assert (s.calls, s.misses, s.not_found) == (1, 2, 1)
        s = await enrich(en, events(["a", "zz"]))
        assert (s.calls, s.hits) == (0, 2)
        clock.t += 2.5  # not-found expired, found has not
        s = await enrich(en, events(["a", "zz"]))
        assert (s.calls, s.hits, s.misses) == (1, 1, 1)
        cl.down = True
        clock.t += 10  # everything expired; the source fails
        evs = events(["a"])
        s = await enrich(en, evs)
        assert s.failures == 1 and s.errors == 1 and evs[0].out is None
        calls = cl.calls
        s = await enrich(en, events(["a"]))  # the error is cached for error_ttl: no call
        assert cl.calls == calls and s.hits == 1 and s.failures == 1
        clock.t += 1.5
        await enrich(en, events(["a"]))
        assert cl.calls == calls + 1

    run(body)


def test_stale_value_is_served_when_the_source_fails_then_expires() -> None:
    async def body() -> None:
        clock = Clock()
        cl = Flaky()
        en, _ = runtime(cl.source(cache=CacheConfig(ttl=10, error_ttl=0, stale_ttl=30), resilience=fast()), clock)
        await enrich(en, events(["a"]))
        cl.down = True
        clock.t += 15
        evs = events(["a", "a"])
        s = await enrich(en, evs)
        assert [e.out for e in evs] == ["A", "A"] and s.stale == 2 and s.errors == 1
        clock.t += 30  # past ttl + stale_ttl: nothing left to serve
        evs = events(["a"])
        s = await enrich(en, evs)
        assert evs[0].out is None and s.stale == 0 and s.failures == 1

    run(body)


def test_breaker_opens_then_events_get_the_fallback_at_once_then_it_closes() -> None:
    async def body() -> None:
        clock = Clock()
        cl = Flaky()
        en, rt = runtime(cl.source(cache=CacheConfig(mode="none"), resilience=fast(breaker_failures=3, breaker_reset=5.0)), clock)
        cl.down = True
        opens = 0
        for _ in range(3):
            s = await enrich(en, events(["a"]))
            opens += s.breaker_opens
        assert rt.breaker.state == OPEN and opens == 1 and cl.calls == 3
        t0 = time.perf_counter()
        s = await enrich(en, events(["a", "b"]))
        assert cl.calls == 3 and s.short_circuited == 1 and s.failures == 2
        assert time.perf_counter() - t0 < 0.5  # no call, no wait
        cl.down = False
        clock.t += 5  # half-open: one probe; it succeeds and closes the breaker
        evs = events(["a", "b"])
        await enrich(en, evs)
        assert rt.breaker.state == CLOSED and [e.out for e in evs] == ["A", "B"]

    run(body)


def test_retries_back_off_and_then_succeed() -> None:
    async def body() -> None:
        cl = Flaky()
        left = [2]
        orig = cl.get

        async def get(k: str) -> str | None:
            if left[0]:
                left[0] -= 1
                raise ConnectionError("blip")
            return await orig(k)

        cl.get = get  # type: ignore[method-assign]
        en, _ = runtime(cl.source(CacheConfig(), fast(retries=2)))
        evs = events(["a"])
        s = await enrich(en, evs)
        assert evs[0].out == "A" and s.calls == 3 and s.errors == 2 and s.failures == 0

    run(body)


# ---------------------------------------------------------------- http
def test_http_round_trip_value_path_and_not_found(http: FaultServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="collector.sources")

    async def body() -> None:
        src = HttpSource(url=f"{http.url}/v/{{key}}", value_path="data.value", resilience=fast(),
                         log_not_found=True, headers={"Authorization": "Bearer s3cret"})
        assert "s3cret" not in repr(src.config)
        en, rt = runtime(src)
        evs = events(["a", "b", "a", "missing-1", 7])
        s = await enrich(en, evs)
        assert [e.out for e in evs] == ["v-a", "v-b", "v-a", None, "v-7"]
        assert (s.calls, s.misses, s.not_found, s.failures) == (1, 5, 1, 0)
        assert http.requests == 4  # one per distinct key, in one get_many call
        assert "key 'missing-1' not found" in caplog.text
        await rt.close()

    run(body)


@pytest.mark.parametrize("post", [False, True], ids=["query", "json-body"])
def test_http_batch_mode_really_batches(http: FaultServer, post: bool) -> None:
    async def body() -> None:
        src = HttpSource(
            url=f"{http.url}/batch",
            method="POST" if post else "GET",
            value_path="value",
            batch=HttpBatch(param="ids", body_key="ids" if post else "", max_keys=100, response_path="data"),
            resilience=fast(),
        )
        en, rt = runtime(src)
        keys = [f"k{i}" for i in range(450)] + ["missing-x"]
        evs = events(keys * 2)
        s = await enrich(en, evs)
        assert all(e.out == f"v-{e.k}" for e in evs if e.k != "missing-x")
        assert http.requests == 5 and sorted(http.keys_per_request) == [51, 100, 100, 100, 100]
        assert s.calls == 5 and s.keys_fetched == 451 and s.not_found == 2
        await rt.close()

    run(body)


def test_single_flight_n_concurrent_misses_make_one_call(http: FaultServer) -> None:
    async def body() -> None:
        http.delay = 0.3
        src = HttpSource(
            url=f"{http.url}/batch", value_path="value",
            batch=HttpBatch(response_path="data"), resilience=fast(timeout=5),
        )
        en, rt = runtime(src)
        chunks = [events(["hot", f"own-{i}"]) for i in range(20)]
        # twenty chunks arriving together: "hot" is fetched once, the rest join it
        sums = await asyncio.gather(*(enrich(en, c) for c in chunks))
        assert all(c[0].out == "v-hot" and c[1].out == f"v-own-{i}" for i, c in enumerate(chunks))
        assert sum(s.coalesced for s in sums) == 19
        assert sum(s.keys_fetched for s in sums) == 21 and http.requests == 20
        await rt.close()

    run(body)


def test_linger_merges_misses_of_chunks_arriving_together_into_one_call(http: FaultServer) -> None:
    async def body() -> None:
        src = HttpSource(
            url=f"{http.url}/batch", value_path="value", batch=HttpBatch(response_path="data"),
            resilience=fast(linger=0.02),
        )
        en, rt = runtime(src)
        chunks = [events([f"k{i}"]) for i in range(10)]
        await asyncio.gather(*(enrich(en, c) for c in chunks))
        assert all(c[0].out == f"v-k{i}" for i, c in enumerate(chunks))
        assert http.requests == 1 and http.keys_per_request == [10]
        await rt.close()

    run(body)


def test_closing_a_runtime_releases_chunks_waiting_on_lingering_keys(http: FaultServer) -> None:
    async def body() -> None:
        src = HttpSource(url=f"{http.url}/batch", value_path="value", batch=HttpBatch(response_path="data"),
                         resilience=fast(linger=30))
        en, rt = runtime(src)
        evs = events(["a"])
        waiting = asyncio.ensure_future(enrich(en, evs))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await rt.close()
        s = await asyncio.wait_for(waiting, 2)
        assert s.failures == 1 and evs[0].out is None and http.requests == 0

    run(body)


@pytest.mark.parametrize("mode", ["500", "badjson", "huge", "shape", "slow", "trickle", "refuse"])
def test_http_faults_are_counted_failures_within_the_timeout(http: FaultServer, mode: str) -> None:
    async def body() -> None:
        url = f"http://127.0.0.1:{free_port()}" if mode == "refuse" else http.url
        http.mode = mode
        http.delay = 3.0 if mode == "slow" else 0.0
        src = HttpSource(
            url=f"{url}/v/{{key}}", value_path="data.value", max_body=64 << 10,
            resilience=fast(timeout=0.5, retries=1, backoff=0.01),
        )
        en, rt = runtime(src)
        evs = events(["a", "b"])
        t0 = time.perf_counter()
        s = await enrich(en, evs)
        took = time.perf_counter() - t0
        assert [e.out for e in evs] == [None, None]
        assert s.failures == 2 and s.errors == 2 and s.calls == 2
        assert took < 2.0, f"{mode}: took {took:.2f}s with a 0.5 s timeout and one retry"
        await rt.close()

    run(body)


def test_a_source_used_without_the_runtime_keeps_its_deadline(http: FaultServer) -> None:
    async def body() -> None:
        http.mode = "trickle"
        src = HttpSource(url=f"{http.url}/v/{{key}}", value_path="data.value", resilience=fast(timeout=0.4))
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            await src.get("a")
        assert time.perf_counter() - t0 < 1.5
        await src.close()

    run(body)


def test_two_level_cache_is_shared_by_two_runtimes(http: FaultServer, redis_url: str) -> None:
    async def body() -> None:
        ns = f"test-{uuid.uuid4().hex}"
        cfg = HttpSourceConfig(
            url=f"{http.url}/v/{{key}}", value_path="data.value", resilience=fast(),
            cache=CacheConfig(mode="two-level", redis_url=redis_url, namespace=ns, redis_ttl=30),
        )
        en1, rt1 = runtime(cfg)  # two workers (or two daemons): two local caches
        en2, rt2 = runtime(cfg)
        a = events(["p", "q", "missing-z"])
        s1 = await enrich(en1, a)
        assert http.requests == 3 and s1.shared_hits == 0
        b = events(["p", "q", "missing-z"])
        s2 = await enrich(en2, b)
        assert http.requests == 3, "the second runtime found every key in Redis"
        assert s2.shared_hits == 3 and s2.calls == 0 and s2.not_found == 1
        assert [e.out for e in b] == ["v-p", "v-q", None]
        s2 = await enrich(en2, events(["p"]))
        assert s2.hits == 1  # now in its own local level
        await rt1.close()
        await rt2.close()

    run(body)


def test_an_unreachable_shared_cache_falls_back_to_the_source(http: FaultServer) -> None:
    async def body() -> None:
        cfg = HttpSourceConfig(
            url=f"{http.url}/v/{{key}}", value_path="data.value", resilience=fast(),
            cache=CacheConfig(mode="two-level", redis_url=f"redis://127.0.0.1:{free_port()}/0"),
        )
        en, rt = runtime(cfg)
        evs = events(["a", "b"])
        s = await enrich(en, evs)
        assert [e.out for e in evs] == ["v-a", "v-b"] and s.failures == 0 and http.requests == 2
        await rt.close()

    run(body)


# ---------------------------------------------------------------- SQL
@pytest.fixture
def pg_table(pg_dsn: str) -> Iterator[str]:
    import asyncpg

    table = f"players_{uuid.uuid4().hex[:8]}"

    async def setup() -> None:
        c = await asyncpg.connect(pg_dsn)
        await c.execute(f"CREATE TABLE {table} (id bigint primary key, email text, score int)")
        await c.executemany(f"INSERT INTO {table} VALUES ($1, $2, $3)", [(i, f"p{i}@example.com", i) for i in range(10, 310)])
        await c.close()

    run(setup)
    yield table

    async def drop() -> None:
        c = await asyncpg.connect(pg_dsn)
        await c.execute(f"DROP TABLE IF EXISTS {table}")
        await c.close()

    run(drop)


def test_postgres_one_query_per_chunk_uncached_sees_changes_and_reconnects(pg_dsn: str, pg_table: str) -> None:
    import asyncpg

    async def body() -> None:
        src = PostgresSource(dsn=pg_dsn, table=pg_table, key_column="id", columns=("email",), resilience=fast())
        en, rt = runtime(src)
        keys = list(range(5, 320)) * 2  # 300 present, 15 absent, each twice
        evs = events(keys)
        s = await enrich(en, evs)
        assert src.queries == 1 and s.calls == 1 and s.keys_fetched == 315
        assert all(e.out == (f"p{e.k}@example.com" if 10 <= e.k < 310 else None) for e in evs)
        assert s.not_found == 30
        c = await asyncpg.connect(pg_dsn)
        await c.execute(f"UPDATE {pg_table} SET email = 'changed' WHERE id = 10")
        evs = events([10])
        await enrich(en, evs)
        assert evs[0].out == "changed", "uncached: the next chunk sees the changed row"
        # a connection dropped under a running query: the query goes again on a fresh one
        slow = PostgresSource(dsn=pg_dsn, resilience=fast(timeout=5),
                              query=f"SELECT id, email FROM {pg_table}, pg_sleep(0.5) WHERE id = ANY($1)")
        en3, rt3 = runtime(slow)
        evs = events([11])
        task = asyncio.ensure_future(enrich(en3, evs))
        kill = "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query = $1 AND state = 'active'"
        while not await c.fetchval(kill, slow.sql):  # bounded by run()'s timeout
            await asyncio.sleep(0.01)
        s = await task
        assert evs[0].out == "p11@example.com" and s.failures == 0 and s.errors == 0
        assert slow.reconnects == 1 and slow.queries == 2
        await c.close()
        await rt3.close()
        (h,) = await en.health()
        assert h["ok"] and h["breaker"] == "closed" and h["kind"] == "postgres"
        down = PostgresSource(dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/test", table=pg_table,
                              columns=("email",), resilience=fast())
        en_down, rt_down = runtime(down)
        (h,) = await en_down.health()
        assert not h["ok"] and h["error"]
        await rt_down.close()
        multi = PostgresSource(dsn=pg_dsn, table=pg_table, columns=("email", "score"), resilience=fast())
        en2, rt2 = runtime(multi)
        evs = events([12])
        await enrich(en2, evs)
        assert evs[0].out == {"email": "p12@example.com", "score": 12}
        await rt.close()
        await rt2.close()

    run(body)


def test_sqlite_one_query_per_chunk_read_only_and_uncached_sees_changes(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "players.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE players (id INTEGER PRIMARY KEY, email TEXT, score INTEGER)")
        db.executemany("INSERT INTO players VALUES (?, ?, ?)", [(i, f"s{i}@example.com", i) for i in range(10, 1510)])

    async def body() -> None:
        src = SqliteSource(dsn=f"sqlite://{path}", table="players", columns=("email",), resilience=fast())
        en, rt = runtime(src)
        keys = list(range(5, 1520)) * 2  # 1500 present, 15 absent, each twice: 2 queries of max_keys 1000
        evs = events(keys)
        s = await enrich(en, evs)
        assert src.queries == 2 and s.keys_fetched == 1515 and s.not_found == 30
        assert all(e.out == (f"s{e.k}@example.com" if 10 <= e.k < 1510 else None) for e in evs)
        with contextlib.closing(sqlite3.connect(path)) as db, db:  # the owner writes on while workers read
            db.execute("UPDATE players SET email = 'changed' WHERE id = 10")
        evs = events([10])
        await enrich(en, evs)
        assert evs[0].out == "changed", "uncached: the next chunk sees the changed row"
        (h,) = await en.health()
        assert h["ok"] and h["kind"] == "sqlite"
        multi = SqliteSource(dsn=str(path), table="players", columns=("email", "score"), resilience=fast())
        en2, rt2 = runtime(multi)
        evs = events([12])
        await enrich(en2, evs)
        assert evs[0].out == {"email": "s12@example.com", "score": 12}
        # read-only: a missing file is a counted failure, never created
        gone = SqliteSource(dsn=f"sqlite://{tmp_path / 'none.db'}", table="players", columns=("email",),
                            resilience=fast())
        en3, rt3 = runtime(gone)
        evs = events([10])
        s = await enrich(en3, evs)
        assert evs[0].out is None and s.failures == 1 and not (tmp_path / "none.db").exists()
        for r in (rt, rt2, rt3):
            await r.close()

    run(body)


def test_mysql_one_query_per_chunk_and_uncached_sees_changes(mysql_dsn: str) -> None:
    import aiomysql

    table = f"players_{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        from urllib.parse import urlsplit

        u = urlsplit(mysql_dsn)
        conn = await aiomysql.connect(host=u.hostname, port=u.port or 3306, user=u.username or "root",
                                      password=u.password or "", db=u.path.lstrip("/"), autocommit=True)
        cur = await conn.cursor()
        await cur.execute(f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, email TEXT)")
        await cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"m{i}@example.com") for i in range(100)])
        try:
            src = MysqlSource(dsn=mysql_dsn, table=table, columns=("email",), resilience=fast())
            en, rt = runtime(src)
            evs = events([1, 2, 2, 99, 500])
            s = await enrich(en, evs)
            assert [e.out for e in evs] == ["m1@example.com", "m2@example.com", "m2@example.com", "m99@example.com", None]
            assert src.queries == 1 and s.not_found == 1
            await cur.execute(f"UPDATE {table} SET email = 'changed' WHERE id = 1")
            evs = events([1])
            await enrich(en, evs)
            assert evs[0].out == "changed"
            (h,) = await en.health()
            assert h["ok"] and h["queries"] == 3
            await rt.close()
        finally:
            await cur.execute(f"DROP TABLE IF EXISTS {table}")
            conn.close()

    run(body)


# ---------------------------------------------------------------- redis, map, rates
def test_redis_get_and_hgetall_one_round_trip_per_chunk(redis_url: str) -> None:
    import redis.asyncio as aioredis

    async def body() -> None:
        p = f"t{uuid.uuid4().hex[:8]}"
        r = aioredis.from_url(redis_url)
        await r.set(f"{p}:seg:1", "gold")
        await r.set(f"{p}:seg:2", '{"tier": 2}')
        await r.hset(f"{p}:h:1", mapping={"email": "a@x", "tier": "3"})
        try:
            src = RedisSource(url=redis_url, key_template=f"{p}:seg:{{key}}", resilience=fast())
            en, rt = runtime(src)
            evs = events([1, 2, 3, 1])
            s = await enrich(en, evs)
            assert [e.out for e in evs] == ["gold", '{"tier": 2}', None, "gold"]
            assert src.round_trips == 1 and s.not_found == 1
            assert (await en.health())[0]["ok"]
            hsrc = RedisSource(url=redis_url, key_template=f"{p}:h:{{key}}", command="hgetall", resilience=fast())
            en2, rt2 = runtime(hsrc)
            evs = events([1, 2])
            await enrich(en2, evs)
            assert evs[0].out == {"email": "a@x", "tier": "3"} and evs[1].out is None and hsrc.round_trips == 1
            await rt.close()
            await rt2.close()
        finally:
            await r.delete(f"{p}:seg:1", f"{p}:seg:2", f"{p}:h:1")
            await r.aclose()

    run(body)


def test_map_source_python_mapping_and_files_reread_on_change(tmp_path: Path) -> None:
    async def body() -> None:
        en, _ = runtime(MapSource(data={"a": 1, "5": "five"}))
        evs = events(["a", 5, "nope"])
        await enrich(en, evs)
        assert [e.out for e in evs] == [1, "five", None]
        f = tmp_path / "regions.csv"
        f.write_text("key,region\nu1,eu\nu2,us\n")
        src = MapSource(path=str(f), value_column="region", check_interval=0)
        en, _ = runtime(src)
        evs = events(["u1", "u2"])
        await enrich(en, evs)
        assert [e.out for e in evs] == ["eu", "us"]
        f.write_text("key,region\nu1,apac\n")
        os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
        evs = events(["u1", "u2"])
        await enrich(en, evs)
        assert [e.out for e in evs] == ["apac", None] and src.loads == 2
        j = tmp_path / "m.json"
        j.write_text('{"x": {"deep": true}}')
        en, _ = runtime(MapSource(path=str(j)))
        evs = events(["x"])
        await enrich(en, evs)
        assert evs[0].out == {"deep": True}

    run(body)


def test_rates_source_converts_with_the_builtin_service_and_counts_a_missing_currency() -> None:
    async def body(svc: RatesService) -> None:
        src = RatesSource(url=svc.url, max_age=60, resilience=fast())
        spec = Lookup(name="x", key="k", key_fields=("amount",), target="out", source=src)
        rt = SourceRuntime(spec, src)
        en = Enricher([rt])
        evs = [Ev(0, "USD", amount=500), Ev(1, "EUR", amount=10000), Ev(2, "BTC", amount=100_000),
               Ev(3, "XYZ", amount=5), Ev(4, "USD", amount=500)]
        s = (await en.enrich(evs))["x"]
        assert [e.out for e in evs] == [462, 10000, 6211, None, 462]
        assert s.failures == 1 and s.errors == 1
        await en.enrich([Ev(5, "GBP", amount=100)])
        assert src.fetches == 1 and svc.requests == 1, "rates are reused for max_age"
        src.fetched_at -= 61
        await en.enrich([Ev(6, "NZD", amount=100)])
        assert src.fetches == 2
        rates = RatesSource(url=svc.url)
        assert await rates.get("USD") == Decimal("1.0832")

    svc = RatesService()
    with svc.running():
        run(lambda: body(svc))


# ---------------------------------------------------------------- through a real Collector
def playback(n: int, users: int) -> list[PlaybackEvent]:
    return [
        PlaybackEvent(id=i, user_id=f"u{i % users}", video_id="v", start_at=1, stop_at=2,
                      bitrate_kbps=1, device_type="tv")
        for i in range(n)
    ]


def region_pipeline(source: Any) -> Pipeline:
    return Pipeline(name="src-e2e", event_type=PlaybackEvent, key="user_id",
                    lookups=(Lookup(name="region", key="user_id", target="region", source=source),))


def test_two_collectors_share_the_two_level_cache(http: FaultServer, redis_url: str, no_leaks: None) -> None:
    src = HttpSourceConfig(
        url=f"{http.url}/v/{{key}}", value_path="data.value", resilience=fast(timeout=5),
        cache=CacheConfig(mode="two-level", redis_url=redis_url, namespace=f"e2e-{uuid.uuid4().hex}", redis_ttl=30),
    )
    evs = playback(300, 60)
    with Collector(region_pipeline(src), workers=1) as a:
        first = a.handle(evs, return_events=True).wait(timeout=60)
    assert http.requests == 60 and first.batch.lookups["region"].shared_hits == 0
    with Collector(region_pipeline(src), workers=2) as b:
        second = b.handle(evs, return_events=True).wait(timeout=60)
    assert http.requests == 60, "every key fetched by the first collector was a Redis hit for the second"
    lk = second.batch.lookups["region"]
    assert lk.shared_hits == 60 and lk.calls == 0
    assert all(e.region == f"v-{e.user_id}" for e in second.events)


def test_a_dead_source_costs_its_timeout_not_more(no_leaks: None) -> None:
    src = HttpSourceConfig(
        url=f"http://127.0.0.1:{free_port()}/v/{{key}}",
        resilience=fast(timeout=0.5, retries=1, breaker_failures=2, breaker_reset=60),
    )
    with Collector(region_pipeline(src), workers=2, chunk_size=100) as c:
        t0 = time.monotonic()
        res = c.handle(playback(2000, 500), return_events=True).wait(timeout=30)
        took = time.monotonic() - t0
    assert res.handled_events == 2000 and all(e.region == "" for e in res.events)
    lk = res.batch.lookups["region"]
    assert lk.failures == 2000 and lk.breaker_opens >= 1 and lk.short_circuited >= 1
    assert took < 5.0, f"a refused source held the batch {took:.1f}s"


def test_collector_end_to_end_with_a_batched_http_source(http: FaultServer, no_leaks: None) -> None:
    src = HttpSourceConfig(
        url=f"{http.url}/batch", value_path="value",
        batch=HttpBatch(response_path="data", max_keys=50), resilience=fast(timeout=5),
    )
    evs = playback(2000, 200)
    with Collector(region_pipeline(src), workers=2, chunk_size=500) as c:
        res = c.handle(evs, return_events=True).wait(timeout=60)
    assert res.handled_events == 2000 and res.failed_events == 0
    assert all(e.region == f"v-{e.user_id}" for e in res.events)
    lk = res.batch.lookups["region"]
    assert lk.keys_fetched == 200 and lk.failures == 0
    assert lk.calls == http.requests <= 200 // 50 + 4 * 2, "batched: a few requests, not one per key"
    assert lk.cache_hits + lk.misses == 2000
