"""Unit tier: pure functions and per-worker pieces called directly, clocks patched."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import msgspec
import pytest

from collector import stats as S
from collector.engine import describe_exit
from collector.enrich import LookupRuntime
from collector.pipeline import Lookup
from collector.playback import PlaybackEvent
from collector.stages import Dedup, Filter
from collector.worker.decoding import error_path


def test_stats_block_sums_slots_and_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.25]
    monkeypatch.setattr(S.time, "monotonic", lambda: now[0])
    with S.StatsBlock(2) as block:
        block.started = 990.0
        a, b = block.slots[0], block.slots[1]
        a.count_processed(100, 2, 0.004)  # second 1000
        now[0] = 1001.5
        b.count_processed(50, 0, 0.3)  # second 1001
        a.sink_add(0, rows=98, batches=1, latency_s=0.002)
        st = block.read([True, True])
        assert st.total_events == 150 and st.failed_events == 2 and st.chunks == 2
        # 150 events over [996, 1001.5]: 5 whole seconds plus half of the running one
        assert st.processed_per_sec == pytest.approx(150 / 5.5)
        assert [w.events for w in st.workers] == [100, 50]
        # each worker's rate over the same span as the total: they add up to it
        assert [w.processed_per_sec for w in st.workers] == pytest.approx([100 / 5.5, 50 / 5.5])
        assert dict(st.latency_buckets_ms)[5] == 1 and dict(st.latency_buckets_ms)[500] == 1
        assert st.sinks[0].rows == 98 and st.sinks[0].last_commit_ms == pytest.approx(2.0)
        now[0] = 1010.0  # both seconds left the window
        assert block.read().processed_per_sec == 0.0
        # right after start the span is the uptime, for the total and for each worker
        block.started = 1009.5
        a.count_processed(30, 0, 0.001)
        st = block.read()
        assert st.processed_per_sec == pytest.approx(60.0)
        assert [w.processed_per_sec for w in st.workers] == pytest.approx([60.0, 0.0])
        name = block.name
    import os

    assert not os.path.exists(f"/dev/shm/{name}")


def test_slots_are_64_byte_aligned_and_single_writer_sized() -> None:
    assert S.SLOT_BYTES % 64 == 0
    with S.StatsBlock(3) as block:
        for s in block.slots:
            s.add(S.EVENTS, 1)
        assert [s.get(S.EVENTS) for s in block.slots] == [1, 1, 1, 1]


def test_describe_exit_names_the_cause() -> None:
    assert "SIGKILL" in describe_exit(-signal.SIGKILL) and "out of memory" in describe_exit(-signal.SIGKILL)
    assert "SIGSEGV" in describe_exit(-signal.SIGSEGV)
    assert "exit code 7" in describe_exit(7)
    assert "could not build" in describe_exit(3)


def test_error_path_splits_msgspec_messages() -> None:
    try:
        msgspec.json.decode(b'{"id": "x"}', type=PlaybackEvent)
    except msgspec.ValidationError as e:
        assert error_path(str(e)) == ("$.id", "Expected `int`, got `str`")
    assert error_path("Object missing required field `user_id`") == ("$", "Object missing required field `user_id`")


def committed(run: Any, events: list[Any]) -> list[Any]:
    """One chunk through a dedup window as the worker runs it: drops, then stored."""

    async def go() -> list[Any]:
        got = run(events)
        if type(got) is not list:
            got = await got
        run.settle(events, True)
        return got

    return asyncio.run(go())


def test_dedup_window_with_per_type_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("collector.stages.dedup.time.monotonic", lambda: now[0])

    class E(msgspec.Struct):
        id: str
        type: str

    run = Dedup(field="id", ttl=10, type_field="type", ttl_by_type={"click": 1}).build()
    first = committed(run, [E("a", "click"), E("b", "buy"), E("a", "click")])
    assert [(d.pos, d.path, d.kind) for d in first] == [(2, "$.id", "duplicate")]
    now[0] = 102.0  # the click's 1 s window is over, the purchase's 10 s is not
    dropped = committed(run, [E("a", "click"), E("b", "buy")])
    assert [(d.pos, d.kind) for d in dropped] == [(1, "duplicate")]


def test_filter_stage() -> None:
    class E(msgspec.Struct):
        n: int

    run = Filter(predicate=lambda e: e.n % 2 == 0, reason="odd").build()
    assert [(d.pos, d.reason, d.kind) for d in run([E(0), E(1), E(2), E(3)])] == [(1, "odd", "filtered"), (3, "odd", "filtered")]


def test_lookup_cache_ttl_sweep_and_size_bound() -> None:
    from concurrent.futures import ThreadPoolExecutor

    async def fn(k: str) -> str:
        return k

    with ThreadPoolExecutor(1) as ex:
        import asyncio

        async def main() -> None:
            rt = LookupRuntime(Lookup("r", "user_id", "region", "m", ttl=10, max_entries=3), fn, ex)
            t = time.monotonic()
            for i, k in enumerate("abcd"):
                rt.store(k, k.upper(), t + i)
            assert list(rt.cache) == ["b", "c", "d"]  # the oldest went first
            rt.sweep(t + 12.5)  # b (t+1) and c (t+2) are older than 10 s
            assert list(rt.cache) == ["d"]

        asyncio.run(main())


def test_dedup_window_is_bounded_forgets_oldest_first_and_keeps_re_remembered_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("collector.stages.dedup.time.monotonic", lambda: now[0])

    class E(msgspec.Struct):
        id: str

    run = Dedup(field="id", ttl=10, max_entries=1000).build()
    for c in range(50):  # 50 chunks of 100 new ids: only the last 1000 are remembered
        assert committed(run, [E(f"{c}-{i}") for i in range(100)]) == []
    assert [d.pos for d in committed(run, [E("49-0"), E("40-5"), E("0-0")])] == [0, 1]  # "0-0" was forgotten
    now[0] = 111.0  # every id has expired: the same id is new again
    assert committed(run, [E("49-1")]) == []

    class T(msgspec.Struct):
        id: str
        type: str

    now[0] = 200.0
    typed = Dedup(field="id", ttl=100, type_field="type", ttl_by_type={"click": 1}).build()
    assert committed(typed, [T("slow", "buy"), T("k", "click")]) == []
    now[0] = 202.0  # k's window is over but its entry waits behind "slow" (100 s)
    assert committed(typed, [T("k", "click")]) == []  # new again: remembered anew until 203
    now[0] = 202.5
    assert [d.pos for d in committed(typed, [T("k", "click")])] == [0]
    now[0] = 301.0  # "slow" and k's first entry are swept; k's later entry expired at 203 too
    assert committed(typed, [T("k", "click")]) == []


def test_a_replaced_workers_counts_stay_in_the_totals() -> None:
    from collector import stats as S

    block = S.StatsBlock(2)
    try:
        w0 = block.slots[0]
        w0.count_processed(100, 3, 0.002)
        w0.sink_add(0, rows=97, batches=1, latency_s=0.001)
        block.slots[1].count_processed(50, 0, 0.001)
        before = block.read()
        block.supervisor.absorb(w0)  # what the supervisor does before respawning slot 0
        w0.reset()
        after = block.read()
        assert (after.total_events, after.failed_events, after.chunks) == (150, 3, 2) == (
            before.total_events, before.failed_events, before.chunks)
        assert after.sinks[0].rows == 97
        assert sum(n for _, n in after.latency_buckets_ms) == 2
        assert after.workers[0].events == 0  # the new worker starts from zero
    finally:
        block.close()


def test_generated_ids_are_unique_ordered_uuid7_also_across_the_counter_wrap() -> None:
    import uuid

    from collector import ids

    batch = [*ids.new_ids(5000), ids.new_id(), *ids.new_ids(3)]
    assert len(set(batch)) == len(batch)
    for s in batch:
        u = uuid.UUID(s)
        assert (str(u), u.version, u.variant) == (s, 7, uuid.RFC_4122)
    assert batch == sorted(batch)  # time-ordered, then by counter: keys append to an index
    assert ids.new_ids(0) == []
    # a batch that crosses the 48-bit counter's end takes the slow path and stays valid
    ids._COUNTER[0] = (ids._COUNTER[0] | ids._MASK) - 2
    wrap = ids.new_ids(5)
    assert [s[-12:] for s in wrap] == ["fffffffffffd", "fffffffffffe", "ffffffffffff", "000000000000", "000000000001"]
    assert all(uuid.UUID(s).version == 7 for s in wrap)


def test_group_commit_takes_a_chunk_submitted_as_its_last_round_ends() -> None:
    """A chunk submitted after the round task checked for more work, but before that
    task left the set of running tasks, must still be committed (it used to wait for
    the next submit, or time out: the sink then dead-lettered rows it stored later)."""
    import asyncio

    from collector.sinks.batching import GroupCommit

    async def main() -> list[list[str]]:
        loop = asyncio.get_running_loop()
        committed: list[list[str]] = []
        release: asyncio.Future[None] = loop.create_future()
        go: asyncio.Future[None] = loop.create_future()

        async def commit(rows: list[str]) -> None:
            if rows == ["a"]:
                await release
            committed.append(rows)

        gc = GroupCommit(commit, lambda e: False, max_rows=100)

        async def late() -> None:
            await go
            await gc.submit(["b"])

        first = loop.create_task(gc.submit(["a"]))
        second = loop.create_task(late())
        await asyncio.sleep(0.01)

        def wake() -> None:  # the round resumes first, then `late`, in this order
            release.set_result(None)
            go.set_result(None)

        loop.call_soon(wake)
        await asyncio.wait_for(asyncio.gather(first, second), 2)
        return committed

    assert asyncio.run(main()) == [["a"], ["b"]]


def test_registry_load_resolves_names_lazily_and_lists_the_known_ones() -> None:
    from collector import registry
    from collector.errors import ConfigError

    table = {"decoder": "json:JSONDecoder", "missing": "no_such_module_xyz:Thing"}
    import json

    assert registry.load(table, "decoder", "codec") is json.JSONDecoder
    assert registry.load(table, "json:JSONEncoder", "codec") is json.JSONEncoder  # an import string
    with pytest.raises(ConfigError, match=r"unknown codec 'yaml': known are 'decoder', 'missing'"):
        registry.load(table, "yaml", "codec")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        registry.load(table, "missing", "codec")
    from collector.pipeline import import_string  # the old home still answers

    assert import_string is registry.import_string


def test_packs_are_chosen_by_name_through_the_registry(tmp_path: Any) -> None:
    from collector.config import decode_config
    from collector.daemon.daemon import apply_overrides
    from collector.errors import ConfigError
    from collector.packs import build_pipeline

    cfg = decode_config({"data_dir": str(tmp_path)})
    assert build_pipeline(cfg).name == "generic"  # the default
    p = build_pipeline(apply_overrides(cfg, {"pack": "playback"}))  # collector serve --pack playback
    assert (p.name, p.event_type.__name__, p.key) == ("playback", "PlaybackEvent", "user_id")
    assert p.sinks and p.deadletter is not None  # the config's (default) sinks
    p = build_pipeline(decode_config({"data_dir": str(tmp_path), "pipeline": {"pack": "collector.playback:playback_pipeline"}}))
    assert p.name == "playback"
    with pytest.raises(ConfigError, match=r"unknown pack 'poker': known are 'casino', 'clickstream', 'generic', 'playback'"):
        build_pipeline(decode_config({"pipeline": {"pack": "poker"}}))


@pytest.mark.parametrize("shape", ["GroupCommit", "GroupWriter"])
def test_group_commit_withdraws_a_cancelled_callers_rows(shape: str) -> None:
    """A caller that times out behind a stalled store takes its rows back out of the
    queue, so its retries do not pile up copies: the store, once it wakes, gets each
    row once. (Before the two batchers were merged, GroupCommit kept them queued: the
    stalled store then received the chunk once per attempt.)"""
    import threading

    from collector.sinks.batching import GroupCommit, GroupWriter

    stored: list[Any] = []
    stall = threading.Event()

    async def main() -> None:
        batcher: Any
        if shape == "GroupCommit":
            async def commit(rows: list[str]) -> None:
                if rows == ["a"]:
                    await asyncio.get_running_loop().run_in_executor(None, stall.wait, 5)
                stored.extend(rows)

            batcher = GroupCommit(commit, lambda e: False, max_rows=100)
            a, b = ["a"], ["b"]
        else:
            def write(blob: bytes) -> None:
                if blob == b"a\n":
                    stall.wait(5)
                stored.extend(blob.decode().splitlines())

            batcher = GroupWriter(write, "test")
            a, b = b"a\n", b"b\n"
        first = asyncio.ensure_future(batcher.submit(a))
        await asyncio.sleep(0.01)  # the round holding "a" runs and stalls
        for _ in range(3):  # the sink's attempts for "b" time out while the store is stalled
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(batcher.submit(b), 0.02)
        assert not batcher._pending  # withdrawn, not left for the next round
        stall.set()
        await asyncio.wait_for(asyncio.gather(first, batcher.submit(b)), 5)  # the retry that succeeds
        await batcher.drain()
        if isinstance(batcher, GroupWriter):
            batcher.shutdown()

    try:
        asyncio.run(main())
    finally:
        stall.set()
    assert stored == ["a", "b"]


def test_sink_thread_runs_calls_in_order_and_hands_back_results_and_errors() -> None:
    """The JSONL sink's thread: every call (writes, syncs, open, close) goes through one
    queue, so a sync never overtakes the write before it."""
    from collector.sinks.batching import SinkThread

    done: list[str] = []

    def step(name: str) -> str:
        if name == "bad":
            raise ValueError("refused")
        done.append(name)
        return name.upper()

    async def main() -> None:
        t = SinkThread("test-sink")
        got = await asyncio.wait_for(asyncio.gather(t.run(step, "a"), t.run(step, "b"), t.run(step, "c")), 5)
        assert got == ["A", "B", "C"] and done == ["a", "b", "c"]
        with pytest.raises(ValueError, match="refused"):
            await asyncio.wait_for(t.run(step, "bad"), 5)
        waiter = t.run(step, "d")
        waiter.cancel()  # the caller gave up: the call still runs, its result is dropped
        assert await asyncio.wait_for(t.run(step, "e"), 5) == "E" and done[-2:] == ["d", "e"]
        t.shutdown(wait=True)
        with pytest.raises(RuntimeError, match="after shutdown"):
            t.run(step, "f")

    asyncio.run(main())
