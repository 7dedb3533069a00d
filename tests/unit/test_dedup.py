"""Dedup remembers an id only once the sinks committed the chunk carrying it.

The window is driven as the worker drives it: ``window(events)`` gives the drops (or
a coroutine giving them, when an id is claimed by a chunk still in flight), and
``window.settle(events, ok)`` tells it the chunk's fate after the sinks.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from collector.engine.materialize import is_stateful
from collector.stages import Dedup


class Ev(msgspec.Struct):
    id: str
    type: str = "click"


async def drops(window: Any, events: list[Ev]) -> list[tuple[int, str]]:
    got = window(events)
    if type(got) is not list:
        got = await got
    return [(d.pos, d.kind) for d in got]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_an_id_is_seen_only_after_its_chunk_was_committed() -> None:
    async def main() -> None:
        w = Dedup(ttl=60).build()
        first = [Ev("a"), Ev("b")]
        assert await drops(w, first) == []
        w.settle(first, True)
        again = [Ev("a"), Ev("c")]
        assert await drops(w, again) == [(0, "duplicate")]
        w.settle(again, True)

    run(main())


def test_a_failed_chunk_releases_its_ids_so_a_retry_is_stored() -> None:
    async def main() -> None:
        w = Dedup(ttl=60).build()
        first = [Ev("a"), Ev("b")]
        assert await drops(w, first) == []
        w.settle(first, False)  # the sinks failed: nothing was stored
        retry = [Ev("a"), Ev("b")]
        assert await drops(w, retry) == []

    run(main())


def test_events_a_sink_dead_lettered_are_released_and_the_rest_remembered() -> None:
    async def main() -> None:
        for w in (Dedup(ttl=60).build(), Dedup(ttl=60, type_field="type", ttl_by_type={"buy": 600}).build()):
            first = [Ev("a"), Ev("b", "buy"), Ev("c")]
            assert await drops(w, first) == []
            w.settle(first, True, [first[1]])  # a sink refused "b": the dead-letter sink holds it
            retry = [Ev("a"), Ev("b", "buy"), Ev("c")]
            assert await drops(w, retry) == [(0, "duplicate"), (2, "duplicate")]
            w.settle(retry, True)

    run(main())


def test_a_copy_waits_for_its_original_and_is_a_duplicate_once_that_is_stored() -> None:
    async def main() -> None:
        w = Dedup(ttl=60, wait=5).build()
        original = [Ev("a"), Ev("b")]
        assert await drops(w, original) == []
        copy = [Ev("x"), Ev("a")]
        waiting = asyncio.ensure_future(drops(w, copy))
        await asyncio.sleep(0.05)
        assert not waiting.done(), "a copy of an id still in flight was answered before the original was stored"
        w.settle(original, True)
        assert await asyncio.wait_for(waiting, 2) == [(1, "duplicate")]

    run(main())


@pytest.mark.parametrize("how", ["chunk failed", "a sink dead-lettered it"])
def test_a_copy_is_stored_in_place_of_an_original_that_failed(how: str) -> None:
    async def main() -> None:
        w = Dedup(ttl=60, wait=5).build()
        original = [Ev("a")]
        assert await drops(w, original) == []
        copy = [Ev("a")]
        waiting = asyncio.ensure_future(drops(w, copy))
        await asyncio.sleep(0.05)
        if how == "chunk failed":
            w.settle(original, False)
        else:  # the chunk was committed, but a sink dead-lettered this event
            w.settle(original, True, original)
        assert await asyncio.wait_for(waiting, 2) == []  # claimed by the copy now
        third = [Ev("a")]
        pending = asyncio.ensure_future(drops(w, third))
        await asyncio.sleep(0.05)
        assert not pending.done()
        w.settle(copy, True)
        assert await asyncio.wait_for(pending, 2) == [(0, "duplicate")]

    run(main())


def test_a_copy_whose_original_is_still_in_flight_after_the_wait_is_told_to_retry() -> None:
    async def main() -> None:
        w = Dedup(ttl=60, wait=0.2).build()
        original = [Ev("a")]
        assert await drops(w, original) == []
        assert await drops(w, [Ev("a"), Ev("b")]) == [(0, "retry")]
        w.settle(original, True)

    run(main())


def test_repeats_within_one_chunk_and_per_type_ttls() -> None:
    async def main() -> None:
        w = Dedup(ttl=60, type_field="type", ttl_by_type={"click": 0.05}).build()
        chunk = [Ev("a"), Ev("a", "purchase"), Ev("p", "purchase")]
        assert await drops(w, chunk) == [(1, "duplicate")]
        w.settle(chunk, True)
        await asyncio.sleep(0.1)  # the click's 50 ms have passed, the purchase's 60 s have not
        later = [Ev("a"), Ev("p", "purchase")]
        assert await drops(w, later) == [(1, "duplicate")]
        w.settle(later, True)

    run(main())


# ------------------------------------------------------------------ count_by
class Tagged(msgspec.Struct, tag_field="event"):
    """A tagged-union member whose tag is readable as the property ``event``."""

    id: str

    @property
    def event(self) -> str:
        return str(self.__struct_config__.tag)


class Start(Tagged, tag="page_view_start"):
    pass


class Stop(Tagged, tag="page_view_stop"):
    pass


def test_count_by_counts_duplicates_per_value_and_merges_workers() -> None:
    """A tagged-union tag (``event``) is the value counted; two workers' partials sum."""
    spec = Dedup(ttl=60, count_by="event")
    assert spec.stateful and spec.integrity == "duplicates"
    assert is_stateful(spec) and not is_stateful(Dedup())  # without count_by: not an aggregate
    assert not hasattr(Dedup().build(), "snapshot")  # no counts, no partial for the worker to publish

    async def worker(batches: list[list[Any]]) -> bytes:
        w = spec.build()
        for evs in batches:
            await drops(w, evs)
            w.settle(evs, True)
        return bytes(w.snapshot())

    async def main() -> list[bytes]:
        one = await worker([[Start("a"), Stop("b")], [Start("a"), Start("a"), Stop("b"), Stop("c")]])
        two = await worker([[Stop("x")], [Stop("x")]])
        return [one, two]

    parts = run(main())
    result = spec.merge(parts)
    assert spec.read(result) == {"page_view_start": 2, "page_view_stop": 2}
    assert spec.read(result, "page_view_stop") == 2 and spec.read(result, "other") == 0
    assert spec.merge([]) == {}


def test_count_by_counts_a_copy_that_waited_and_reuses_its_snapshot_while_idle() -> None:
    async def main() -> None:
        w = Dedup(ttl=60, count_by="type", wait=5).build()
        idle = w.snapshot()
        assert w.snapshot() is idle  # the worker publishes only changed bytes
        first = [Ev("a", "purchase")]
        assert await drops(w, first) == []
        copy = [Ev("a", "purchase")]
        pending = w(copy)  # claimed by `first`, still in flight: a coroutine
        assert type(pending) is not list
        w.settle(first, True)
        assert [(d.pos, d.kind) for d in await pending] == [(0, "duplicate")]
        w.settle(copy, True)
        assert w.snapshot() is not idle
        assert Dedup(count_by="type").merge([w.snapshot()]) == {"purchase": 1}

    run(main())


# ------------------------------------------------------------------ key per type, missing keys
class Seed3(msgspec.Struct):
    id: str
    type: str
    client_attempt_id: str | None = None
    session_id: str | None = None


def test_key_by_type_keys_each_type_by_its_field_and_missing_keys_pass_counted() -> None:
    spec = Dedup(ttl=60, type_field="type", key_by_type={"attempt": "client_attempt_id", "session": "session_id"})
    assert spec.stateful and spec.integrity is None  # publishes its counters, not duplicates per type

    async def main() -> bytes:
        w = spec.build()
        chunk = [
            Seed3("e1", "attempt", client_attempt_id="k"),
            Seed3("e2", "session", session_id="k"),  # the same value, another type: not a copy
            Seed3("e3", "attempt", client_attempt_id="k"),  # a copy within the chunk
            Seed3("e4", "attempt"),  # no key: passes
            Seed3("e5", "attempt"),
            Seed3("k", "other"),  # not listed: keyed by `field`, apart from ("attempt", "k")
        ]
        assert await drops(w, chunk) == [(2, "duplicate")]
        w.settle(chunk, True)
        again = [Seed3("x", "session", session_id="k"), Seed3("e4", "attempt"), Seed3("k", "other")]
        assert await drops(w, again) == [(0, "duplicate"), (2, "duplicate")]
        w.settle(again, True)
        return bytes(w.snapshot())

    result = spec.merge([run(main())])
    assert result == {} and spec.read(result, counters=True)["missing_key"] == 3
    assert spec.read(result, "missing_key", counters=True) == 3 and spec.read(spec.merge([]), counters=True)["unavailable"] == 0


def test_a_null_id_passes_without_key_by_type_too() -> None:
    class Maybe(msgspec.Struct):
        id: str | None

    async def main() -> None:
        w = Dedup(ttl=60).build()
        chunk = [Maybe(None), Maybe(None), Maybe("a")]
        assert await drops(w, chunk) == []
        w.settle(chunk, True)
        assert await drops(w, [Maybe(None), Maybe("a")]) == [(1, "duplicate")]
        assert w.counters["missing_key"] == 3

    run(main())


def test_the_redis_store_without_the_redis_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from collector.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "redis", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "redis.exceptions", None)
    spec = Dedup(store="redis")  # described without it: the workers build it
    with pytest.raises(MissingDependency, match=r"pip install 'collector\[redis\]'"):
        spec.build()


def test_the_remembered_ids_are_not_walked_by_the_cyclic_gc() -> None:
    """A worker remembers up to a million ids; a container the cyclic GC tracks that
    held them made every full collection walk them all (20 ms pauses, the HTTP p99)."""
    import gc

    async def main() -> None:
        w = Dedup(ttl=60).build()
        for c in range(50):
            chunk = [Ev(f"id-{c}-{i}") for i in range(1000)]
            assert await drops(w, chunk) == []
            w.settle(chunk, True)
        # still remembered, each one
        assert await drops(w, [Ev("id-0-0"), Ev("id-49-999")]) == [(0, "duplicate"), (1, "duplicate")]
        gc.collect()
        walked = sum(len(o) for o in gc.get_objects()
                     if type(o) in (list, tuple, set) and len(o) >= 100
                     and all(type(x) is str and x.startswith("id-") for x in list(o)[:3]))
        assert walked == 0

    run(main())


def test_the_c_table_and_the_dict_decide_alike_over_a_long_random_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The window keeps its ids in a C table (idwindow.c) when it has one TTL; the
    dict it replaces stays for per-type TTLs. Over 3,000 chunks of ids drawn from a
    pool (repeats within and across chunks, chunks that fail, ids of every JSON kind,
    time that expires them), both drop exactly the same events and hold as many ids.
    At the cap the table forgets the oldest ids one by one (the dict a chunk at a
    time), and keeps exactly the cap."""
    from collector.stages import dedup_ids as mod

    if mod.IdWindow is None:
        pytest.skip("collector.stages.idwindow is not built (no C compiler at install)")
    import random

    now = [1000.0]
    monkeypatch.setattr("collector.stages.dedup.time.monotonic", lambda: now[0])

    class Anything(msgspec.Struct):
        id: Any

    spec = Dedup(field="id", ttl=5.0)
    table = spec.build()
    with monkeypatch.context() as m:
        m.setattr(mod, "IdWindow", None)
        plain = spec.build()
    assert isinstance(table.ids, mod.IdWindow) and isinstance(plain.ids, mod.DictIds)
    rng = random.Random(17)
    pool: list[Any] = [f"01a2-{i:06x}" for i in range(4_000)] + list(range(-20, 1_500))
    pool += [True, 3.0, 2**70, 2.0**70, "é", None]

    async def run(windows: tuple[Any, ...], chunks: list[list[Any]]) -> list[list[tuple[int, str]]]:
        out = []
        for c, events in enumerate(chunks):
            now[0] += 0.01
            ok = c % 20 != 7  # every 20th chunk fails in its sinks: its ids are released
            got = []
            for w in windows:
                d = w(events)
                if type(d) is not list:
                    d = await d
                got.append([(r.pos, r.kind) for r in d])
                w.settle(events, ok)
            assert all(g == got[0] for g in got), (c, got)
            out.append(got[0])
            assert len(table.ids) == len(plain.ids)
        return out

    chunks = [[Anything(rng.choice(pool)) for _ in range(rng.randint(1, 30))] for _ in range(3_000)]
    decided = asyncio.run(run((table, plain), chunks))
    assert sum(len(d) for d in decided) > 1_000  # duplicates were met, and expiries (30 s of chunks, a 5 s TTL)

    capped = Dedup(field="id", ttl=60.0, max_entries=2_000).build()
    assert isinstance(capped.ids, mod.IdWindow)
    fresh = [[Anything(f"c{c}-{i}") for i in range(10)] for c in range(300)]
    asyncio.run(run((capped,), fresh))
    assert len(capped.ids) == 2_000
    stored = [e.id for c, events in enumerate(fresh) if c % 20 != 7 for e in events]
    forgotten, kept = stored[:-2_000], stored[-2_000:]
    probe = [[Anything(forgotten[-1]), Anything(kept[0]), Anything(kept[-1])]]
    assert asyncio.run(run((capped,), probe)) == [[(1, "duplicate"), (2, "duplicate")]]
