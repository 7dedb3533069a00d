"""The ``collector bench`` scenarios as pytest-benchmark benchmarks.

Run with ``tox -e bench`` (``pytest bench --benchmark-disable-gc ...``). Each benchmark
reports a number and asserts only that the work was done (every event handled, the
right counts); targets are printed by ``collector bench``, not enforced here.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from itertools import count
from typing import Any

import pytest
from conftest import EVENTS, NCPU

from collector import Collector
from collector.benchmarks import peers as P
from collector.benchmarks.clients import FixedLatencyAsync, FixedLatencyBlocking, HttpEnrichClient
from collector.benchmarks.common import FORMATS, Input, make_input
from collector.benchmarks.scenarios import fake_service
from collector.playback import InMemoryClient, PlaybackEvent, playback_pipeline

WORKERS = list(range(1, NCPU + 1))
ROUNDS = 5


@pytest.fixture(scope="module", params=[(w, s) for w in WORKERS for s in ("key", "chunk")],
                ids=lambda p: f"workers={p[0]}-shard={p[1]}")
def inmem_collector(request: pytest.FixtureRequest, inp: Input, warm: Input) -> Iterator[Collector]:
    """A running collector with an in-memory client, warmed up (both input formats)."""
    workers, shard = request.param
    with Collector(playback_pipeline(InMemoryClient(inp.regions, inp.models), shard=shard), workers=workers) as c:
        c.handle(warm.payload).wait(timeout=120)
        c.handle(warm.body("ndjson")).wait(timeout=120)
        yield c


@pytest.mark.parametrize("fmt", FORMATS)
def test_inmem_collector(benchmark: Any, inmem_collector: Collector, inp: Input, fmt: str) -> None:
    """Full path: handle(JSON array or NDJSON bytes) → result."""
    benchmark.extra_info["events"] = EVENTS
    body = inp.body(fmt)
    res = benchmark.pedantic(lambda: inmem_collector.handle(body).wait(timeout=600), rounds=ROUNDS, iterations=1)
    assert res.handled_events == EVENTS


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("peer", ["a", "b"])
def test_inmem_peer_single(benchmark: Any, peer: str, inp: Input, fmt: str) -> None:
    """Peers (a) asyncio + json and (b) msgspec, one process."""
    fn = P.naive_asyncio if peer == "a" else P.serial_msgspec
    r = benchmark.pedantic(lambda: fn(inp, fmt=fmt), rounds=ROUNDS, iterations=1)
    assert r.events == EVENTS


@pytest.mark.parametrize("procs", WORKERS, ids=lambda w: f"procs={w}")
def test_inmem_peer_pool(benchmark: Any, procs: int, inp: Input) -> None:
    """Peer (c): Pool.imap over pickled batches."""
    pool = P.PoolPeer(inp, procs)
    try:
        r = benchmark.pedantic(pool.run, rounds=ROUNDS, iterations=1)
    finally:
        pool.close()
    assert r.events == EVENTS


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("procs", WORKERS, ids=lambda w: f"procs={w}")
def test_inmem_peer_split(benchmark: Any, procs: int, inp: Input, workdir: str, fmt: str) -> None:
    """Peer (d), the ceiling: N processes, no IPC. The timer includes spawning; ``wall`` in extra_info does not."""
    peer = P.SplitPeer(inp, procs, workdir, fmt=fmt)
    walls: list[float] = []

    def once() -> P.PeerRun:
        r = peer.run()
        walls.append(r.wall)
        return r

    r = benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    benchmark.extra_info["data_path_seconds"] = sorted(walls)
    assert r.events == EVENTS


@pytest.mark.parametrize("procs", WORKERS, ids=lambda w: f"procs={w}")
def test_inmem_peer_bytewax(benchmark: Any, procs: int, inp: Input, workdir: str) -> None:
    """Peer (e): Bytewax 0.21. The timer includes cluster start-up; extra_info has the data path."""
    if why := P.bytewax_missing():
        pytest.skip(why)
    peer = P.BytewaxPeer(inp, procs, workdir)
    walls: list[float] = []

    def once() -> P.PeerRun:
        r = peer.run()
        walls.append(r.wall)
        return r

    r = benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    benchmark.extra_info["data_path_seconds"] = sorted(walls)
    assert r.events == EVENTS


def _renamed(inp: Input, prefix: str) -> bytes:
    """The payload with every user renamed, so a warm cache cannot answer."""
    return inp.payload.replace(b'"user-', b'"' + prefix.encode() + b"-user-")


@pytest.mark.parametrize("concurrency", [256, 32])
def test_slow_service_cold(benchmark: Any, concurrency: int) -> None:
    """50 ms per call, 10000 users, cold cache on every round."""
    data = make_input(100_000, users=10_000, seed=7)
    rounds = count()
    pipeline = playback_pipeline(FixedLatencyAsync(0.05), concurrency=concurrency)
    with Collector(pipeline) as c:
        res = benchmark.pedantic(
            lambda payload: c.handle(payload).wait(timeout=600),
            setup=lambda: ((_renamed(data, f"r{next(rounds)}"),), {}),
            rounds=ROUNDS, iterations=1,
        )
    assert res.handled_events == 100_000 and res.batch.lookup_failures == 0


@pytest.mark.parametrize("client", [FixedLatencyBlocking, FixedLatencyAsync], ids=["blocking", "async"])
def test_seed_000(benchmark: Any, client: type) -> None:
    """Seed 000: 10 events, 5 s per call; the seed's bar is 15 s, ours 5.3 s."""
    rounds = count()

    def events() -> tuple[tuple[list[PlaybackEvent]], dict[str, Any]]:
        r = next(rounds)
        return ([PlaybackEvent(id=i, user_id=f"s{r}-u{i}", video_id="v", start_at=0, stop_at=60,
                               bitrate_kbps=3000, device_type=f"s{r}-d{i % 3}") for i in range(10)],), {}

    with Collector(playback_pipeline(client(5.0))) as c:
        res = benchmark.pedantic(lambda evs: c.handle(evs).wait(timeout=60), setup=events, rounds=2, iterations=1)
    assert res.handled_events == 10


def test_stats_while_saturated(benchmark: Any, inp: Input, warm: Input) -> None:
    """c.stats() while a feeder thread keeps the workers busy."""
    stop = threading.Event()
    with Collector(playback_pipeline(InMemoryClient(inp.regions, inp.models))) as c:
        c.handle(warm.payload).wait(timeout=60)

        def feed() -> None:
            while not stop.is_set():
                c.handle(inp.payload).wait(timeout=600)

        t = threading.Thread(target=feed, daemon=True)
        t.start()
        try:
            st = benchmark.pedantic(c.stats, rounds=20_000, iterations=1, warmup_rounds=100)
        finally:
            stop.set()
            t.join(600)
    assert st.total_events > 0


@pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="aiohttp is not installed (the http extra)")
def test_service_loopback(benchmark: Any) -> None:
    """``collector bench service`` against a loopback aiohttp endpoint (5 ms per call, no cache)."""
    data = make_input(20_000, users=2000, seed=3)
    with fake_service(latency=0.005) as url:
        pipeline = playback_pipeline(HttpEnrichClient(url, connections=64), concurrency=64, cache_ttl=0.0, timeout=5.0)
        with Collector(pipeline) as c:
            c.handle(data.payload).wait(timeout=120)
            res = benchmark.pedantic(lambda: c.handle(data.payload).wait(timeout=600), rounds=ROUNDS, iterations=1)
    assert res.handled_events == 20_000 and res.batch.lookup_failures == 0


def test_http_daemon() -> None:
    """The daemon under HTTP load: present once ``collector serve`` and bench/http_load.py exist."""
    from pathlib import Path

    if importlib.util.find_spec("collector.commands.serve") is None or not (Path(__file__).parent / "http_load.py").exists():
        pytest.skip("http scenario absent: `collector serve` or bench/http_load.py does not exist yet")
    pytest.skip("run bench/http_load.py directly (its own benchmark)")
