"""The ``Order`` stage's runtime on its own: sort within a chunk, late across chunks,
the reorder buffer's watermark, processing-time bound, cap and flush, its counters,
config tables and the pipeline's position check (the engine tests run it for real)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from collector import Pipeline
from collector.errors import ConfigError
from collector.stages import build_stage
from collector.stages.base import Enrich
from collector.stages.ordering import Order, OrderRuntime
from collector.stages.rules import Filter


class Ev(msgspec.Struct):
    id: str
    user_id: str
    ts: Any


def evs(*pairs: tuple[str, Any]) -> list[Ev]:
    return [Ev(f"{u}-{i}", u, t) for i, (u, t) in enumerate(pairs)]


def run(rt: OrderRuntime, events: list[Ev]) -> list[Ev]:
    """What leaves the stage without a buffer: the chunk in its new order."""
    assert rt(events) == []
    perm = rt.take_order()
    return [events[i] for i in perm] if perm is not None else events


def test_a_chunk_leaves_in_time_order_per_key_stably() -> None:
    rt = Order(by="ts", key="user_id").build()
    got = run(rt, evs(("a", 3), ("b", 1), ("a", 1), ("a", 2), ("b", 1), ("a", 2)))
    assert [(e.user_id, e.ts, e.id) for e in got if e.user_id == "a"] == [
        ("a", 1, "a-2"), ("a", 2, "a-3"), ("a", 2, "a-5"), ("a", 3, "a-0")]
    assert [e.id for e in got if e.user_id == "b"] == ["b-1", "b-4"]  # ties keep arrival order
    assert rt.stats()["reordered"] == 3 and rt.stats()["late"] == 0
    assert run(rt, evs(("a", 4), ("a", 5))) and rt.take_order() is None  # in order: no permutation


def test_across_chunks_an_older_event_is_late_and_passed_on() -> None:
    rt = Order(by="ts", key="user_id").build()
    run(rt, evs(("a", 10), ("b", 5)))
    got = run(rt, evs(("a", 7), ("a", 12), ("a", 9), ("b", 6)))
    assert [e.ts for e in got if e.user_id == "a"] == [7, 9, 12]  # still sorted within the chunk
    assert rt.stats()["late"] == 2  # 7 and 9 came after 10 was delivered
    run(rt, evs(("a", 11)))
    assert rt.stats()["late"] == 3  # the newest delivered is 12, not 9


def test_times_may_be_iso_strings_or_datetimes_and_untimed_go_last() -> None:
    rt = Order(by="ts", key="user_id").build()
    got = run(rt, evs(("a", "2026-01-01T00:00:02Z"), ("a", None), ("a", datetime(2026, 1, 1, tzinfo=UTC)),
                      ("a", "2026-01-01T00:00:01"), ("a", "not a time")))
    assert [e.id for e in got] == ["a-2", "a-3", "a-0", "a-1", "a-4"]
    assert rt.stats()["untimed"] == 2


def test_the_pipeline_key_is_the_default() -> None:
    p = Pipeline(name="p", event_type=Ev, key="user_id", stages=(Order(by="ts"),))
    rt = p.stages[0].build()
    rt.bind(p)
    assert [e.ts for e in run(rt, evs(("a", 2), ("a", 1)))] == [1, 2]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def buffered(**kw: Any) -> tuple[OrderRuntime, Clock]:
    rt = Order(by="ts", key="user_id", **{"max_delay": 10.0, **kw}).build()
    clock = Clock()
    rt.clock = clock
    return rt, clock


def hold(rt: OrderRuntime, events: list[Ev]) -> Any:
    out = rt(events)
    return out


def test_the_buffer_releases_by_watermark_in_order_and_acks_after_the_commit() -> None:
    async def go() -> None:
        rt, clock = buffered()
        w1 = hold(rt, evs(("a", 5), ("a", 1), ("b", 50)))
        w2 = hold(rt, evs(("a", 3), ("a", 20)))  # 20 - 10 = 10: a's 1, 3, 5 are due
        out = rt.drain()
        assert [(e.user_id, e.ts) for e in out] == [("a", 1), ("a", 3), ("a", 5)]
        assert rt.stats()["held"] == 2 and rt.stats()["reordered"] == 2
        rt.settle_records(out, True)
        t1 = asyncio.ensure_future(w1)
        await asyncio.sleep(0)
        assert not t1.done()  # b's 50 is still held
        clock.now += 10  # processing time: everything waited max_delay
        rt.expire(clock())
        out = rt.drain()
        assert sorted((e.user_id, e.ts) for e in out) == [("a", 20), ("b", 50)]
        rt.settle_records(out, True, [(1, "main", "refused")] if out[1].user_id == "b" else [(0, "main", "x")])
        d1 = await asyncio.wait_for(t1, 1)
        d2 = await asyncio.wait_for(w2, 1)
        assert {d.kind for d in d1} | {d.kind for d in d2} == {"held", "deadlettered"}
        assert len(d1) == 3 and len(d2) == 2
        assert rt.stats()["held"] == 0
        # a later event older than what was released: late, left in the chunk (no drop)
        assert hold(rt, evs(("a", 2))) == [] and rt.stats()["late"] == 1

    asyncio.run(go())


def test_a_failed_commit_fails_the_waiting_chunk() -> None:
    async def go() -> None:
        rt, clock = buffered()
        w = hold(rt, evs(("a", 1)))
        clock.now += 11
        rt.expire(clock())
        rt.settle_records(rt.drain(), False)
        with pytest.raises(RuntimeError, match="commit of this chunk's held events failed"):
            await asyncio.wait_for(w, 1)

    asyncio.run(go())


def test_the_cap_releases_the_oldest_early_and_flush_releases_all_in_order() -> None:
    rt, _ = buffered(max_held=2)
    w = hold(rt, evs(("a", 5), ("b", 1), ("a", 3)))
    assert [(e.user_id, e.ts) for e in rt.drain()] == [("a", 3), ("a", 5)]  # a's 5 arrived first; 3 goes before it
    assert rt.stats()["released_early"] == 2 and rt.stats()["held"] == 1
    rt.flush()
    assert [(e.user_id, e.ts) for e in rt.drain()] == [("b", 1)]
    w.close()


def test_counters_merge_and_snapshot_bytes_are_reused() -> None:
    spec = Order(by="ts", key="user_id")
    rt = spec.build()
    run(rt, evs(("a", 2), ("a", 1)))
    s = rt.snapshot()
    assert rt.snapshot() is s
    merged = spec.merge([s, s])
    assert merged["reordered"] == 2 and merged["ordered"] == 4 and merged["held"] == 0


def test_config_tables_round_trip_and_bad_ones_name_the_path() -> None:
    st = build_stage({"kind": "order", "by": "ts", "max_delay": 2.5, "max_held": 10}, "$.stages[0]")
    assert st == Order(by="ts", max_delay=2.5, max_held=10)
    with pytest.raises(ConfigError, match=r"`\$.stages\[0\]`: .*missing required field `by`"):
        build_stage({"kind": "order"}, "$.stages[0]")
    with pytest.raises(ConfigError, match=r"`\$.stages\[0\]`: .*max_delay must be >= 0"):
        build_stage({"kind": "order", "by": "ts", "max_delay": -1}, "$.stages[0]")


def test_a_buffered_order_must_be_last_with_lookups_before_it() -> None:
    with pytest.raises(ConfigError, match="must be the last stage"):
        Pipeline(name="p", event_type=Ev, key="user_id",
                 stages=(Order(by="ts", max_delay=1.0), Filter(lambda e: True)))
    Pipeline(name="p", event_type=Ev, key="user_id", stages=(Filter(lambda e: True), Order(by="ts", max_delay=1)))
    Pipeline(name="p", event_type=Ev, key="user_id", stages=(Order(by="ts"), Filter(lambda e: True)))  # no buffer
    assert Enrich().is_enrich


def test_a_redelivered_chunk_is_released_at_once_in_order_with_what_is_held() -> None:
    rt, _ = buffered()
    w = hold(rt, evs(("a", 5), ("b", 1)))
    w2 = rt.redelivered(evs(("a", 3), ("a", 4)))
    assert [(e.user_id, e.ts) for e in rt.drain()] == [("a", 3), ("a", 4), ("a", 5)]  # b's 1 still waits
    assert rt.stats()["held"] == 1
    w.close()
    w2.close()


def test_a_dead_workers_partial_keeps_its_counters_not_its_held_gauge() -> None:
    spec = Order(by="ts", key="user_id", max_delay=10.0)
    rt = spec.build()
    hold(rt, evs(("a", 2), ("a", 1))).close()
    assert spec.merge([rt.snapshot()])["held"] == 2
    gone = spec.merge([spec.retired(rt.snapshot())])
    assert gone["held"] == 0 and gone["ordered"] == 2 and gone["reordered"] == 1
