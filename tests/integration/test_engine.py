"""The core engine through its public API, with real worker processes.

Every wait is bounded (``op.wait(timeout=...)``, pytest-timeout); every test that
starts a collector asks for ``no_leaks``: no child process and no shared-memory
segment may outlive it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import psutil
import pytest
from engine_clients import (
    AlwaysFails,
    Crasher,
    Flaky,
    Immediate,
    KillsOn,
    KillsOnceOn,
    SlowAsync,
    SlowBlocking,
    TooSlow,
    marker_path,
)

from collector import (
    Collector,
    CollectorClosed,
    ConfigError,
    InvalidInput,
    Overloaded,
    WorkerBootError,
)
from collector.pipeline import ShardMap
from collector.playback import (
    PlaybackEvent,
    generate_events,
    model_of,
    playback_pipeline,
    region_of,
)

pytestmark = pytest.mark.usefixtures("no_leaks")


def ten_events() -> list[PlaybackEvent]:
    return [
        PlaybackEvent(
            id=i,
            user_id=f"user-{i}",
            video_id=f"video-{i}",
            start_at=1000 + i,
            stop_at=2000 + i,
            bitrate_kbps=3000,
            device_type=f"device-{i % 3}",
        )
        for i in range(10)
    ]


def timed_progress(op, limit: float = 30.0) -> list[tuple[float, int]]:  # type: ignore[no-untyped-def]
    out = []
    t0 = time.monotonic()
    for pct in op.progress():
        out.append((time.monotonic() - t0, pct))
        assert time.monotonic() - t0 < limit, "progress did not finish in time"
    return out


# ---------------------------------------------------------------- the seed's cases
def test_seed_ten_events_immediate_client() -> None:
    with Collector(playback_pipeline(Immediate()), workers=2) as c:
        op = c.handle(ten_events(), return_events=True)
        reports = [p for _, p in timed_progress(op)]
        res = op.wait(timeout=30)
    assert res.handled_events == 10 and res.failed_events == 0
    assert reports and reports[-1] == 100
    assert reports == sorted(reports)
    assert op.done()
    assert [e.region for e in res.events] == [region_of(f"user-{i}") for i in range(10)]
    assert [e.model for e in res.events] == [model_of(f"device-{i % 3}") for i in range(10)]


@pytest.mark.parametrize("client", [SlowAsync(5.0), SlowBlocking(5.0)], ids=["async", "blocking"])
def test_seed_ten_events_slow_service_costs_one_call(client: object) -> None:
    """Region and model lookups of all events run concurrently: ~5 s, not 10 or 100."""
    with Collector(playback_pipeline(client, timeout=20), workers=2) as c:
        t0 = time.monotonic()
        op = c.handle(ten_events(), return_events=True)
        reports = timed_progress(op, limit=20)
        res = op.wait(timeout=20)
        wall = time.monotonic() - t0
    assert res.handled_events == 10
    assert wall < 8.0, f"took {wall:.1f}s; a 5 s service must cost about one call"
    assert reports[-1][1] == 100
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(reports)]
    assert max(gaps) <= 1.1, f"progress went silent for {max(gaps):.2f}s"
    assert all(e.region == region_of(e.user_id) and e.model == model_of(e.device_type) for e in res.events)
    lk = res.batch.lookups["region"]
    assert lk.calls == 10 and lk.reported_sum == pytest.approx(50.0)
    assert 3 <= res.batch.lookups["model"].calls <= 6  # each worker caches its own device types


def test_large_batch_every_event_enriched_with_its_keys_answer() -> None:
    events = generate_events(20_000, users=2000, device_types=20, seed=7)
    with Collector(playback_pipeline(SlowAsync(0.02)), workers=2, chunk_size=1024) as c:
        res = c.handle(events, return_events=True).wait(timeout=120)
        st = c.stats()
    assert res.handled_events == 20_000 and res.failed_events == 0
    assert len(res.events) == 20_000
    for src, out in zip(events, res.events, strict=True):
        assert out.id == src.id
        assert out.region == region_of(src.user_id)
        assert out.model == model_of(src.device_type)
    b = res.batch
    assert b.distinct_keys == len({e.user_id for e in events})
    assert b.counts["device_type"] == dict(collections.Counter(e.device_type for e in events))
    assert sum(b.counts["region"].values()) == 20_000
    # one call per distinct key: users are sharded, so no user is fetched twice
    assert b.lookups["region"].calls == b.distinct_keys
    assert b.lookups["model"].calls <= 2 * 20  # each worker fetches each device type once
    lk = b.lookups["region"]
    assert lk.cache_hits + lk.misses == 20_000
    assert lk.latency_p50 >= 0.02 and lk.latency_p99 >= lk.latency_p50
    assert st.total_events == 20_000
    assert sum(w.events for w in st.workers) == 20_000
    assert all(w.events > 0 for w in st.workers)


def test_accepts_dicts_json_array_and_ndjson() -> None:
    evs = ten_events()
    dicts = [msgspec.to_builtins(e) for e in evs]
    array = msgspec.json.encode(evs)
    ndjson = b"\n".join(msgspec.json.encode(e) for e in evs) + b"\n"
    with Collector(playback_pipeline(Immediate()), workers=2) as c:
        for batch in (dicts, array, ndjson):
            res = c.handle(batch, return_events=True).wait(timeout=30)
            assert res.handled_events == 10, batch
            assert [e.id for e in res.events] == list(range(10))
            assert all(e.region == region_of(e.user_id) for e in res.events)


def test_empty_batch_completes_at_once() -> None:
    with Collector(playback_pipeline(Immediate()), workers=1) as c:
        op = c.handle([])
        assert op.done()
        assert list(op.progress()) == [100]
        res = op.wait(timeout=1)
        assert res.handled_events == 0 and res.failed_events == 0 and res.errors == []


# ---------------------------------------------------------------- bad input
def test_bad_events_are_reported_and_the_rest_goes_on() -> None:
    good = [msgspec.to_builtins(e) for e in ten_events()]
    batch: list[object] = list(good)
    batch[2] = {**good[2], "start_at": "yesterday"}  # wrong type
    del batch[5]["device_type"]  # type: ignore[attr-defined]  # missing field
    batch[7] = 42  # not an object
    batch[8] = {**good[8], "bitrate_kbps": None}
    with Collector(playback_pipeline(Immediate()), workers=2) as c:
        res = c.handle(batch, return_events=True).wait(timeout=30)
        assert c.workers_alive() == [True, True]
    assert res.handled_events == 6 and res.failed_events == 4
    assert res.handled_events + res.failed_events == len(batch)
    by_index = {e.index: e for e in res.errors}
    assert set(by_index) == {2, 5, 7, 8}
    assert by_index[2].path == "$.start_at" and "int" in by_index[2].reason
    assert "device_type" in by_index[5].reason
    assert by_index[7].path == "$" and "object" in by_index[7].reason
    assert by_index[8].path == "$.bitrate_kbps"
    assert res.events is not None
    assert [i for i, e in enumerate(res.events) if e is None] == [2, 5, 7, 8]
    assert all(e.region for e in res.events if e is not None)


def test_malformed_ndjson_lines_are_reported_one_by_one() -> None:
    lines = [msgspec.json.encode(e) for e in ten_events()]
    lines[3] = b'{"id": 3, "user_id": "user-3", '  # cut short
    lines[6] = b"not json at all"
    with Collector(playback_pipeline(Immediate()), workers=2) as c:
        res = c.handle(b"\n".join(lines)).wait(timeout=30)
        # a malformed JSON array is one failed input, reported with the position, not raised
        bad = c.handle(b'[{"id": 1}, {"id": ').wait(timeout=30)
        assert (bad.handled_events, bad.failed_events) == (0, 1)
        assert bad.errors[0].index == 0 and bad.errors[0].kind == "invalid"
        assert "not a valid JSON array" in bad.errors[0].reason and "byte" in bad.errors[0].reason
        with pytest.raises(InvalidInput, match="takes a list"):
            c.handle(12345)
        assert c.workers_alive() == [True, True]
    assert res.handled_events == 8 and res.failed_events == 2
    assert sorted(e.index for e in res.errors) == [3, 6]
    assert all("malformed JSON" in e.reason for e in res.errors)


# ---------------------------------------------------------------- enrichment policy
def test_retries_recover_a_flaky_service() -> None:
    with Collector(playback_pipeline(Flaky(2), retries=2, backoff=0.01), workers=1) as c:
        res = c.handle(ten_events(), return_events=True).wait(timeout=30)
    assert all(e.region == region_of(e.user_id) for e in res.events)
    lk = res.batch.lookups["region"]
    assert lk.calls == 30 and lk.failures == 0  # 3 tries per key


@pytest.mark.parametrize("client", [AlwaysFails(), TooSlow()], ids=["errors", "timeouts"])
def test_a_failed_lookup_leaves_the_field_empty_and_is_counted(client: object) -> None:
    with Collector(playback_pipeline(client, retries=1, backoff=0.01, timeout=0.2), workers=2) as c:
        res = c.handle(ten_events(), return_events=True).wait(timeout=30)
        st = c.stats()
    assert res.handled_events == 10 and res.failed_events == 0
    assert all(e.region == "" and e.model == model_of(e.device_type) for e in res.events)
    assert res.batch.lookups["region"].failures == 10
    assert res.batch.lookups["region"].calls == 20
    assert res.batch.lookup_failures == 10
    assert st.lookup_failures == 10


def test_cache_and_single_flight() -> None:
    """Concurrent misses for one key share one call; later batches hit the cache."""
    events = [
        PlaybackEvent(id=i, user_id="same-user", video_id="v", start_at=0, stop_at=1, bitrate_kbps=1, device_type="tv")
        for i in range(500)
    ]
    with Collector(playback_pipeline(SlowAsync(0.2)), workers=2, chunk_size=50, window=10) as c:
        res = c.handle(events).wait(timeout=30)
        again = c.handle(events).wait(timeout=30)
    lk = res.batch.lookups["region"]
    assert lk.calls == 1
    assert lk.coalesced > 0 and lk.misses == 500
    assert again.batch.lookups["region"].calls == 0
    assert again.batch.lookups["region"].cache_hits == 500


def test_client_by_import_string_and_pickled() -> None:
    for client in ("engine_clients:immediate_factory", Immediate()):
        with Collector(playback_pipeline(client), workers=1) as c:
            res = c.handle(ten_events(), return_events=True).wait(timeout=30)
        assert all(e.region == region_of(e.user_id) for e in res.events)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_workers_are_pinned_one_cpu_each_unless_cpus_is_empty() -> None:
    allowed = os.sched_getaffinity(0)
    first = sorted(allowed)[0]
    with Collector(playback_pipeline(Immediate()), workers=2, cpus=[first]) as c:
        assert [os.sched_getaffinity(p) for p in c.worker_pids()] == [{first}, {first}]
        assert c.handle(ten_events()).wait(timeout=30).handled_events == 10
    with Collector(playback_pipeline(Immediate()), workers=2, cpus=[]) as c:
        # left to the kernel: each worker may run wherever the caller may
        assert [os.sched_getaffinity(p) for p in c.worker_pids()] == [allowed, allowed]
        assert c.handle(ten_events()).wait(timeout=30).handled_events == 10
    outside = max(allowed) + 1
    with pytest.raises(ConfigError, match=rf"cpus \[{outside}\] are not among the CPUs"):
        Collector(playback_pipeline(Immediate()), workers=1, cpus=[outside])


# ---------------------------------------------------------------- worker deaths
@pytest.mark.parametrize("mode", ["sigkill", "segfault", "exit", "hang"])
def test_worker_death_is_survived(mode: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    events = generate_events(3000, users=300, seed=3)
    client = Crasher(mode, marker_path(tmp_path, mode))
    caplog.set_level(logging.ERROR, logger="collector")
    with Collector(
        playback_pipeline(client), workers=2, chunk_size=500, heartbeat_timeout=1.5
    ) as c:
        pids = c.worker_pids()
        res = c.handle(events, return_events=True).wait(timeout=60)
        st = c.stats()
        new_pids = c.worker_pids()
    assert os.path.exists(marker_path(tmp_path, mode)), "the crash did not happen"
    assert res.handled_events == 3000 and res.failed_events == 0
    ids = [e.id for e in res.events]
    assert ids == [e.id for e in events], "lost, duplicated or reordered events"
    assert all(e.region == region_of(e.user_id) for e in res.events)
    assert st.worker_restarts == 1
    assert st.redelivered_chunks >= 1
    assert res.batch.redelivered_chunks >= 1
    assert len(set(pids) & set(new_pids)) == 1  # exactly one slot got a new process
    expected = {"sigkill": "SIGKILL", "segfault": "SIGSEGV", "exit": "exit code 7", "hang": "SIGABRT"}[mode]
    deaths = [r.getMessage() for r in caplog.records if "died" in r.getMessage()]
    assert len(deaths) == 1 and expected in deaths[0], deaths


def test_raise_while_enriching_fails_the_lookup_not_the_worker(tmp_path: Path) -> None:
    client = Crasher("raise", marker_path(tmp_path, "raise"))
    with Collector(playback_pipeline(client, retries=0), workers=2) as c:
        pids = c.worker_pids()
        res = c.handle(ten_events(), return_events=True).wait(timeout=30)
        assert c.worker_pids() == pids
        assert c.stats().worker_restarts == 0
    assert res.handled_events == 10
    assert res.batch.lookups["region"].failures == 1
    assert sum(1 for e in res.events if e.region == "") == 1


def test_worker_death_is_noticed_within_a_second() -> None:
    with Collector(playback_pipeline(Immediate()), workers=2) as c:
        victim = c.worker_pids()[0]
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        while c.stats().worker_restarts == 0:
            assert time.monotonic() - t0 < 1.0, "death not noticed within 1 s"
            time.sleep(0.01)
        deadline = time.monotonic() + 30
        while not all(c.workers_alive()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.worker_pids()[0] != victim
        assert c.handle(ten_events()).wait(timeout=30).handled_events == 10


def test_boot_failure_stops_the_collector_with_the_workers_traceback() -> None:
    with pytest.raises(WorkerBootError) as ei:
        Collector(playback_pipeline("engine_clients:broken_factory"), workers=2).start()
    assert "cannot connect to the enrichment service at boot" in str(ei.value)
    assert "broken_factory" in str(ei.value.__cause__)  # the worker's traceback


def test_bad_pipeline_import_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no_such_module"):
        Collector("no_such_module:pipeline")
    with pytest.raises(ConfigError, match="has no method 'get_region'"):
        playback_pipeline(object())


# ---------------------------------------------------------------- backpressure
def test_backpressure_blocks_or_raises_overloaded() -> None:
    with Collector(playback_pipeline(SlowAsync(1.0)), workers=1, max_inflight=15) as c:
        first = c.handle(ten_events())
        with pytest.raises(Overloaded) as ei:
            c.handle(ten_events(), block=False)
        assert ei.value.retry_after > 0
        t0 = time.monotonic()
        with pytest.raises(Overloaded):
            c.handle(ten_events(), timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 1.0
        second = c.handle(ten_events())  # blocks until the first is done
        assert first.done()
        assert second.wait(timeout=30).handled_events == 10
        assert c.stats().received_events == 20


def test_closed_collector_refuses_work() -> None:
    c = Collector(playback_pipeline(Immediate()), workers=1)
    c.start()
    c.close()
    with pytest.raises(CollectorClosed):
        c.handle(ten_events())


# ---------------------------------------------------------------- statistics
def test_stats_never_wait_for_busy_workers() -> None:
    with Collector(playback_pipeline(SlowBlocking(2.0)), workers=2) as c:
        op = c.handle(ten_events())
        costs = []
        while not op.done():
            t0 = time.perf_counter()
            c.stats()
            costs.append(time.perf_counter() - t0)
            time.sleep(0.01)
        costs.sort()
        assert costs[len(costs) // 2] < 0.005, f"median stats() cost {costs[len(costs) // 2] * 1e6:.0f} µs"
        assert costs[-1] < 0.05
        st = c.stats()
        assert st.total_events == 10
        assert st.processed_per_sec > 0
        assert st.avg_per_sec > 0
        assert [w.index for w in st.workers] == [0, 1]
        assert all(w.alive and w.heartbeat_age < 2 for w in st.workers)


def test_operation_stats_and_progress_fields() -> None:
    with Collector(playback_pipeline(Immediate()), workers=2) as c:
        op = c.handle(generate_events(5000))
        op.wait(timeout=30)
        s = op.stats()
    assert s["handled_events"] == 5000 and s["percent"] == 100 and s["done"]
    assert s["events_per_sec"] > 0


# ---------------------------------------------------------------- asyncio hosts
def test_async_api_does_not_block_the_loop() -> None:
    async def main() -> None:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        async with Collector(playback_pipeline(SlowAsync(0.01)), workers=2) as c:
            t = asyncio.create_task(ticker())
            op = await c.ahandle(generate_events(100_000), return_events=False)
            seen = [p async for p in op.progress()]
            res = await op
            stop.set()
            await t
            assert res.handled_events == 100_000
            assert seen[-1] == 100
            assert seen == sorted(seen)
            with pytest.raises(RuntimeError, match="await op"):
                (await c.ahandle(ten_events())).wait()
        assert max(gaps) < 0.5, f"the host loop stalled for {max(gaps):.2f}s"

    asyncio.run(main())


def test_async_backpressure_awaits() -> None:
    async def main() -> None:
        async with Collector(playback_pipeline(SlowAsync(0.5)), workers=1, max_inflight=10) as c:
            a = await c.ahandle(ten_events())
            with pytest.raises(Overloaded):
                await c.ahandle(ten_events(), block=False)
            b = await c.ahandle(ten_events())  # awaits until a is done
            assert a.done()
            assert (await b).handled_events == 10

    asyncio.run(main())


def test_sync_collector_awaited_from_asyncio() -> None:
    with Collector(playback_pipeline(Immediate()), workers=1) as c:
        async def main() -> int:
            op = c.handle(ten_events())
            return (await op).handled_events

        assert asyncio.run(main()) == 10


# ---------------------------------------------------------------- caller death
def test_workers_and_shared_memory_go_when_the_caller_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "host.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from collector import Collector
            from collector.playback import playback_pipeline, SimulatedClient
            if __name__ == "__main__":
                c = Collector(playback_pipeline(SimulatedClient(latency=1.0)), workers=2)
                c.start()
                print(c.stats_block_name, *c.worker_pids(), flush=True)
                time.sleep(60)
            """
        )
    )
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline().split()
        shm, pids = line[0], [int(x) for x in line[1:]]
        assert len(pids) == 2 and os.path.exists(f"/dev/shm/{shm}")
        p.kill()
        p.wait(10)
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids) or os.path.exists(f"/dev/shm/{shm}"):
            assert time.monotonic() < deadline, "workers or shared memory outlived their caller"
            time.sleep(0.05)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        if p.stdout is not None:
            p.stdout.close()


def test_a_worker_dying_while_the_collector_drains_is_replaced(tmp_path: Path) -> None:
    client = Crasher("sigkill", marker_path(tmp_path, "drain"))
    c = Collector(playback_pipeline(client), workers=2)
    c.start()
    op = c.handle(generate_events(2000, users=100, seed=5), return_events=True)
    c.close(timeout=30)  # the crash happens during the drain
    res = op.wait(timeout=1)
    assert res.handled_events == 2000
    assert sorted(e.id for e in res.events) == list(range(2000))


# ---------------------------------------------------------------- shard="chunk"
@pytest.mark.parametrize("form", ["ndjson", "array", "structs"])
def test_chunk_sharding_handles_every_form(form: str) -> None:
    events = generate_events(12_345, users=300, seed=11)
    batch: object = {
        "ndjson": b"\n".join(msgspec.json.encode(e) for e in events) + b"\n",
        "array": msgspec.json.encode(events),
        "structs": events,
    }[form]
    with Collector(playback_pipeline(Immediate(), shard="chunk"), workers=2, chunk_size=1000) as c:
        res = c.handle(batch, return_events=True).wait(timeout=60)
        st = c.stats()
    assert res.handled_events == 12_345 and res.failed_events == 0
    assert [e.id for e in res.events] == [e.id for e in events]
    assert all(e.region == region_of(e.user_id) for e in res.events)
    assert res.batch.distinct_keys == len({e.user_id for e in events})
    assert all(w.events > 0 for w in st.workers)


def test_chunk_sharding_reports_bad_ndjson_lines_by_index() -> None:
    lines = [msgspec.json.encode(e) for e in generate_events(5000, seed=2)]
    lines[10] = b'{"id": 10, "user_id": '  # malformed
    lines[4321] = lines[4321].replace(b'"bitrate_kbps":', b'"bitrate_kbps":"x","b":')
    with Collector(playback_pipeline(Immediate(), shard="chunk"), workers=2, chunk_size=700) as c:
        res = c.handle(b"\n".join(lines)).wait(timeout=60)
        assert c.workers_alive() == [True, True]
    assert res.handled_events == 4998 and res.failed_events == 2
    assert [(e.index, e.path) for e in res.errors] == [(10, "$"), (4321, "$.bitrate_kbps")]
    assert "malformed JSON" in res.errors[0].reason


@pytest.mark.parametrize("shard", ["key", "chunk"])
def test_ndjson_skips_blank_lines_and_counts_from_the_workers(shard: str) -> None:
    events = generate_events(6000, users=300, seed=5)
    lines = [msgspec.json.encode(e) for e in events]
    lines[2500] = b'{"id": 2500, "user_id": '  # malformed
    # blank lines anywhere (also CRLF and blanks-only lines) are not events, and not errors
    body = b"\n \r\n" + b"\n\n".join(lines[:3000]) + b"\r\n\t\r\n" + b"\r\n".join(lines[3000:]) + b"\n\n"
    with Collector(playback_pipeline(Immediate(), shard=shard), workers=2, chunk_size=400) as c:
        res = c.handle(body, return_events=True).wait(timeout=60)
        st = c.stats()
    assert res.handled_events == 5999 and res.failed_events == 1
    assert [(e.index, e.kind) for e in res.errors] == [(2500, "invalid")]
    assert res.batch.events == 6000  # the count, not the supervisor's estimate
    assert len(res.events) == 6000 and res.events[2500] is None
    assert [e.id for e in res.events if e is not None] == [e.id for e in events if e.id != 2500]
    # the estimate the supervisor admitted is corrected by the workers' counts
    assert st.received_events == 6000 and st.inflight_events == 0


@pytest.mark.parametrize("shard", ["key", "chunk"])
def test_ndjson_survives_a_worker_death_and_fails_a_poison_chunk_alone(shard: str) -> None:
    events = generate_events(4000, users=300, seed=6)
    poison = events[1234].user_id = "poison"  # one event: one chunk kills every worker it meets
    body = b"\n".join(msgspec.json.encode(e) for e in events)
    with Collector(
        playback_pipeline(KillsOn(poison), shard=shard), workers=2, chunk_size=200, heartbeat_timeout=1.5
    ) as c:
        res = c.handle(body, return_events=True).wait(timeout=120)
        st = c.stats()
    bad = [i for i, e in enumerate(events) if e.user_id == poison]
    lost = {e.index for e in res.errors}
    assert all(e.kind == "lost" for e in res.errors)
    assert bad == [1234] and 1234 in lost  # the poison chunk fails, its lines by input index
    assert 0 < len(lost) <= 2 * 200
    if shard == "chunk":  # the poison's range fails whole
        assert sorted(lost) == list(range(min(lost), max(lost) + 1))
    else:  # only the poison owner's part of its range fails: the lines of the users it owns
        of = ShardMap(2).of
        mine = of("poison")
        span = range(min(lost), max(lost) + 1)
        assert lost == {i for i in span if of(events[i].user_id) == mine}
    assert res.handled_events + res.failed_events == 4000 and res.failed_events == len(lost)
    kept = [e.id for e in res.events if e is not None]
    assert kept == [e.id for i, e in enumerate(events) if i not in lost]  # once each, in order
    assert st.worker_restarts >= 3 and st.received_events == 4000


def test_key_sharded_ndjson_is_routed_by_the_workers_keeping_key_affinity(tmp_path: Path) -> None:
    """shard="key": the supervisor cuts ranges, workers route events to their key's owner."""
    events = generate_events(20_000, users=500, seed=8)
    body = b"\n".join(msgspec.json.encode(e) for e in events)
    with Collector(playback_pipeline(Immediate()), workers=2, chunk_size=500) as c:
        res = c.handle(body, return_events=True).wait(timeout=60)
        again = c.handle(body).wait(timeout=60)
        st = c.stats()
    assert res.handled_events == 20_000 and not res.errors
    assert [e.id for e in res.events] == [e.id for e in events]
    assert all(e.region == region_of(e.user_id) for e in res.events)
    assert res.batch.distinct_keys == 500
    # each user's lookup ran in one worker only: one call per user over both workers
    assert res.batch.lookups["region"].calls == 500
    assert again.batch.lookups["region"].calls == 0  # and its cache entry lives there
    assert all(w.events > 0 for w in st.workers)


def test_key_sharded_ndjson_keeps_affinity_when_some_ranges_need_the_python_router() -> None:
    """Ranges the native router declines (an escaped key, an invalid line of its own) are
    routed by decoding: a key written two ways still meets in one worker, and bad lines
    are reported at their input index whichever worker held them."""
    events = generate_events(12_000, users=300, seed=21)
    lines = [msgspec.json.encode(e) for e in events]
    for i in range(0, 12_000, 1500):  # user-N spelled with an escape: decodes to the same key
        e = events[i]
        lines[i] = lines[i].replace(e.user_id.encode(), e.user_id.replace("-", "\\u002d").encode())
    bad = set(range(700, 12_000, 2300))
    for i in bad:
        lines[i] = lines[i][:-5]  # cut short: malformed
    with Collector(playback_pipeline(Immediate()), workers=2, chunk_size=400) as c:
        res = c.handle(b"\n".join(lines), return_events=True).wait(timeout=60)
    assert {e.index for e in res.errors} == bad and res.failed_events == len(bad)
    assert res.handled_events == 12_000 - len(bad)
    assert [e.id for e in res.events if e is not None] == [e.id for i, e in enumerate(events) if i not in bad]
    users = {e.user_id for i, e in enumerate(events) if i not in bad}
    assert res.batch.lookups["region"].calls == len(users)  # one call per user: one owner each


def test_key_sharded_ndjson_survives_a_router_death_after_it_routed(tmp_path: Path) -> None:
    """The worker dies on its own part after handing the others theirs: nothing twice, nothing lost."""
    events = generate_events(6000, users=300, seed=9)
    body = b"\n".join(msgspec.json.encode(e) for e in events)
    client = Crasher("sigkill", marker_path(tmp_path, "router"))
    with Collector(playback_pipeline(client), workers=2, chunk_size=300, heartbeat_timeout=1.5) as c:
        res = c.handle(body, return_events=True).wait(timeout=60)
        st = c.stats()
    assert os.path.exists(marker_path(tmp_path, "router")), "the crash did not happen"
    assert res.handled_events == 6000 and res.failed_events == 0
    assert [e.id for e in res.events] == [e.id for e in events]
    assert st.worker_restarts == 1 and st.received_events == 6000


def test_key_sharded_ndjson_survives_an_owner_death_with_parts_in_its_arena(tmp_path: Path) -> None:
    """A worker dies in the middle of a batch while the other keeps routing parts into its
    arena: the parts it held are sent again (from copies the supervisor took before it
    freed their slots), the parts routed to it meanwhile wait in their slots for its
    replacement. Every event is stored once, in order, nothing lost."""
    events = generate_events(60_000, users=400, seed=23)
    late = "user-late"
    for i in range(36_000, 60_000, 977):  # a key first seen well into the batch
        events[i].user_id = late
    body = b"\n".join(msgspec.json.encode(e) for e in events)
    client = KillsOnceOn(late, marker_path(tmp_path, "owner"))
    # a small window: a worker's window holds its parts beside the ranges it routes (with
    # the copy before the free removed, this fails in about 2 runs of 3; the ledger's unit
    # test of the same case fails every time)
    with Collector(playback_pipeline(client), workers=2, chunk_size=500, window=3, heartbeat_timeout=1.5) as c:
        res = c.handle(body, return_events=True).wait(timeout=60)
        again = c.handle(body).wait(timeout=60)
        st = c.stats()
    assert os.path.exists(marker_path(tmp_path, "owner")), "the crash did not happen"
    assert res.handled_events == 60_000 and res.failed_events == 0 and not res.errors
    assert [e.id for e in res.events] == [e.id for e in events]
    assert all(e.region == region_of(e.user_id) for e in res.events)
    assert again.handled_events == 60_000 and again.failed_events == 0
    assert st.worker_restarts == 1 and st.redelivered_chunks >= 1 and st.received_events == 120_000


def test_key_sharded_ndjson_answers_a_routed_part_s_drops_at_their_input_index() -> None:
    """A duplicate found by the owner of a part another worker routed to it is reported
    at its index in the input and left out of the events returned. Two ranges' events
    reach their owner in either order, so which copy is kept is not fixed: one is."""
    import dataclasses

    from collector.stages import Dedup

    events = generate_events(8000, users=400, seed=12)
    lines = [msgspec.json.encode(e) for e in events]
    for i in range(100, 8000, 97):  # a copy of the line 5,000 before it (or of line 0)
        lines[i] = lines[i - 5000 if i >= 5000 else 0]
    copies: dict[bytes, list[int]] = collections.defaultdict(list)
    for i, ln in enumerate(lines):
        copies[ln].append(i)
    groups = [g for g in copies.values() if len(g) > 1]
    base = playback_pipeline(Immediate())
    pipe = dataclasses.replace(base, stages=(Dedup(field="id", wait=30.0), *base.stages))
    with Collector(pipe, workers=2, chunk_size=300) as c:
        res = c.handle(b"\n".join(lines), return_events=True).wait(timeout=60)
    dropped = {e.index for e in res.errors}
    assert {e.kind for e in res.errors} == {"duplicate"} and len(dropped) == len(res.errors)
    assert all(len(set(g) - dropped) == 1 for g in groups)  # each id kept once, wherever it came from
    assert dropped <= {i for g in groups for i in g}
    assert res.handled_events == 8000 and res.failed_events == 0  # a duplicate is handled, not failed
    assert res.events is not None and {i for i, e in enumerate(res.events) if e is None} == dropped
    assert all(e is None or e.id == msgspec.json.decode(lines[i])["id"] for i, e in enumerate(res.events))


@pytest.mark.parametrize("shard", ["key", "chunk"])
def test_payloads_too_big_for_an_arena_slot_go_inline_and_arrive_intact(shard: str) -> None:
    # chunks of 300 events of ~4 KB are over a 1 MiB arena slot: they go in their frames;
    # the small batch goes through the shared-memory arena. Every event comes back whole.
    big = generate_events(900, users=50, seed=8)
    for e in big:
        e.video_id = f"{e.id:06d}" + "v" * 4000
    small = generate_events(900, users=50, seed=9)
    with Collector(playback_pipeline(Immediate(), shard=shard), workers=2, chunk_size=300) as c:
        for batch in (big, small, big):
            for body in (batch, b"\n".join(msgspec.json.encode(e) for e in batch)):
                res = c.handle(body, return_events=True).wait(timeout=60)
                assert res.handled_events == len(batch) and res.failed_events == 0
                assert [(e.id, e.video_id) for e in res.events] == [(e.id, e.video_id) for e in batch]


def test_a_window_wider_than_the_arena_sends_the_rest_inline() -> None:
    # 40 chunks in flight per worker (each waits 0.2 s on its lookups) against 32 arena
    # slots: the 8 others travel in their frames; every event comes back as it was sent
    events = generate_events(4000, users=4000, seed=10)
    with Collector(playback_pipeline(SlowAsync(0.2)), workers=2, chunk_size=25, window=40) as c:
        res = c.handle(events, return_events=True).wait(timeout=60)
    assert res.handled_events == 4000 and res.failed_events == 0
    assert [(e.id, e.user_id, e.region) for e in res.events] == [(e.id, e.user_id, region_of(e.user_id))
                                                                 for e in events]
