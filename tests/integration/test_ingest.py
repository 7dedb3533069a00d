"""The coalescer: many concurrent small submissions, few operations, per-caller results."""

from __future__ import annotations

import asyncio
import dataclasses

import msgspec
import pytest
from engine_clients import Immediate, SlowAsync

from collector import Collector, InvalidInput, Overloaded
from collector.ingest import Coalescer
from collector.pipeline import ShardMap
from collector.playback import PlaybackEvent, playback_pipeline

pytestmark = pytest.mark.usefixtures("no_leaks")


def event(i: int) -> dict[str, object]:
    return msgspec.to_builtins(
        PlaybackEvent(id=i, user_id=f"u{i % 13}", video_id="v", start_at=0, stop_at=1, bitrate_kbps=1, device_type="tv")
    )


def test_concurrent_submissions_share_operations_and_get_their_own_results() -> None:
    async def main() -> None:
        async with Collector(playback_pipeline(Immediate()), workers=2) as c:
            co = Coalescer(c)

            async def caller(i: int) -> tuple[int, object]:
                items = [event(i * 3 + j) for j in range(3)]
                if i % 10 == 0:
                    items[1] = {**items[1], "bitrate_kbps": "fast"}  # invalid, at index 1
                return i, await co.submit(items)

            results = await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(500))), 60)
            await co.aclose()
            st = c.stats()
        for i, r in results:
            if i % 10 == 0:
                assert (r.handled_events, r.failed_events) == (2, 1)
                assert [(e.index, e.path) for e in r.errors] == [(1, "$.bitrate_kbps")]
            else:
                assert (r.handled_events, r.failed_events, r.errors) == (3, 0, [])
        assert st.total_events == 1500
        assert st.chunks < 100, f"{st.chunks} chunks for 500 submissions: nothing was coalesced"

    asyncio.run(main())


def test_overload_reaches_every_caller_of_the_batch() -> None:
    async def main() -> None:
        async with Collector(playback_pipeline(SlowAsync(0.5)), workers=1, max_inflight=5) as c:
            co = Coalescer(c)
            first = asyncio.ensure_future(co.submit([event(i) for i in range(5)]))
            await asyncio.sleep(0.05)
            with pytest.raises(Overloaded):
                await co.submit([event(99)])
            assert (await asyncio.wait_for(first, 30)).handled_events == 5

    asyncio.run(main())


def test_raw_items_with_keys_are_sharded_by_the_given_keys_and_reported_per_caller() -> None:
    async def main() -> None:
        async with Collector(playback_pipeline(Immediate()), workers=2) as c:
            co = Coalescer(c)

            async def caller(i: int) -> tuple[int, object]:
                evs = [event(i * 4 + j) for j in range(4)]
                raws = [msgspec.json.encode(e) for e in evs]
                if i % 7 == 0:
                    raws[2] = b'{"id": "not a number"}'  # invalid, at index 2
                keys = [e["user_id"] for e in evs]
                return i, await co.submit(raws, keys)

            results = await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(200))), 60)
            await co.aclose()
            op = await c.ahandle([msgspec.json.encode(event(1))], keys=["u1"], return_events=True)
            res = await op
            st = c.stats()
        for i, r in results:
            if i % 7 == 0:
                assert (r.handled_events, r.failed_events) == (3, 1)
                assert [(e.index, e.path) for e in r.errors] == [(2, "$.id")]
            else:
                assert (r.handled_events, r.failed_events, r.errors) == (4, 0, [])
        assert res.events is not None and res.events[0].user_id == "u1" and res.events[0].region
        # keys decide the worker: both workers got some of the 13 users
        assert all(w.events > 0 for w in st.workers)

    asyncio.run(main())


def test_raw_items_with_keys_in_chunk_mode_go_to_the_workers_as_json_objects() -> None:
    """The HTTP server hands raw JSON objects and their keys; a ``shard="chunk"``
    pipeline has no use for the keys but must still take the items as JSON, not encode
    them again as JSON strings (every event was refused "Expected `object`, got `str`")."""

    async def main() -> None:
        async with Collector(dataclasses.replace(playback_pipeline(Immediate()), shard="chunk"), workers=2) as c:
            co = Coalescer(c)
            raws = [msgspec.json.encode(event(i)) for i in range(6)]
            raws[3] = b'{"id": "not a number"}'
            got = await asyncio.wait_for(co.submit(raws, [None] * 6), 30)
            await co.aclose()
            op = await c.ahandle([msgspec.json.encode(event(1))], keys=["u1"], return_events=True)
            res = await asyncio.wait_for(op, 30)
            with pytest.raises(InvalidInput, match="one key per item"):
                await c.ahandle([msgspec.json.encode(event(1))], keys=[])
        assert (got.handled_events, got.failed_events) == (5, 1)
        assert [(e.index, e.path) for e in got.errors] == [(3, "$.id")]
        assert res.events is not None and res.events[0].user_id == "u1" and res.events[0].region

    asyncio.run(main())


def test_max_ops_holds_submissions_until_an_operation_finishes() -> None:
    async def main() -> None:
        async with Collector(playback_pipeline(SlowAsync(0.3)), workers=1) as c:
            co = Coalescer(c, max_ops=1)
            first = asyncio.ensure_future(co.submit([event(0)]))
            await asyncio.sleep(0.05)  # the first operation is running (0.3 s per call)
            rest = [asyncio.ensure_future(co.submit([event(i)])) for i in range(1, 40)]
            done = await asyncio.wait_for(asyncio.gather(first, *rest), 30)
            assert all(r.handled_events == 1 for r in done)
            assert co.operations == 2  # the 39 waiting submissions went together
            await co.aclose()

    asyncio.run(main())


def test_max_ops_starts_the_next_operation_after_max_wait_when_one_stalls() -> None:
    # an operation that waits long (here a 2 s lookup) holds the others back by
    # max_wait at most, not by its own wait
    async def main() -> None:
        async with Collector(playback_pipeline(SlowAsync(2.0)), workers=1) as c:
            co = Coalescer(c, max_ops=1, max_wait=0.3)
            first = asyncio.ensure_future(co.submit([event(0)]))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(co.submit([event(1)]))
            await asyncio.sleep(0.8)
            assert co.operations == 2 and not first.done(), "the second operation waited for the first"
            done = await asyncio.wait_for(asyncio.gather(first, second), 30)
            assert [r.handled_events for r in done] == [1, 1]
            await co.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("hinted", [False, True], ids=["hashed", "owner-given"])
def test_ids_made_for_the_coalescers_owner_keep_small_operations_on_one_worker_and_spread_large_ones(
    hinted: bool,
) -> None:
    """What the HTTP server does for events sent without ids: ids made for
    ``co.owner()``. Submissions of one loop turn share an owner, the next operation
    goes to the other (idle) worker, and a large operation turns to another worker
    after a chunk's worth, so both work on it. Each worker stores exactly what was
    given to it, whether the engine hashes the ids or takes the owner the server
    gives (``hinted``); copies sent later with their ids, hashed, meet the same
    workers' dedup windows."""
    from collector.http.routes.ingest import IdReader
    from collector.packs.generic import generic_pipeline

    async def main() -> None:
        async with Collector(generic_pipeline(enrich_latency=0), workers=2, chunk_size=2048) as c:
            co = Coalescer(c, max_batch=1 << 20)
            rd = IdReader(c.pipeline)
            given = [0, 0]
            made: list[str] = []

            def submit(n: int) -> tuple[int, asyncio.Future[object]]:
                worker, workers = co.owner()
                assert workers == 2
                ids = rd.new_ids(n, (worker, workers))
                raws = [msgspec.json.encode({"id": i, "type": "user_action", "source": "web"}) for i in ids]
                given[worker] += n
                made.extend(ids)
                return worker, co.submit(raws, ids, worker if hinted else None)

            small = [submit(10) for _ in range(3)]  # one loop turn: one operation
            assert len({w for w, _ in small}) == 1
            await asyncio.wait_for(asyncio.gather(*(f for _, f in small)), 30)
            nxt, fut = submit(10)
            assert nxt != small[0][0], "idle workers take turns"
            await asyncio.wait_for(fut, 30)
            big = [submit(1000) for _ in range(5)]  # one operation of 5,000 events
            owners = [w for w, _ in big]
            assert owners[:3] == [owners[0]] * 3 and owners[3:] == [1 - owners[0]] * 2, owners
            done = await asyncio.wait_for(asyncio.gather(*(f for _, f in big)), 60)
            assert all(r.handled_events == 1000 and not r.errors for r in done)
            copies = made[::50]
            again = await asyncio.wait_for(co.submit(
                [msgspec.json.encode({"id": i, "type": "user_action", "source": "web"}) for i in copies], copies), 30)
            await co.aclose()
            st = c.stats()
        assert [e.kind for e in again.errors] == ["duplicate"] * len(copies)
        of = ShardMap(2).of_many(copies)
        assert [w.events for w in st.workers] == [given[k] + of.count(k) for k in (0, 1)]

    asyncio.run(main())


def test_owners_out_of_range_or_without_keys_are_refused() -> None:
    """A wrong owner would match no worker's part and lose its events: refused."""

    async def main() -> None:
        async with Collector(playback_pipeline(Immediate()), workers=2) as c:
            raws = [msgspec.json.encode(event(i)) for i in range(3)]
            for owners, keys in (([0, 2, 1], ["a", "b", "c"]), ([0, -1, 1], ["a", "b", "c"]),
                                 ([0, 1], ["a", "b", "c"]), ([0, 1, 1], None)):
                with pytest.raises(InvalidInput, match="owners="):
                    c.handle(raws, keys=keys, owners=owners)
            res = await c.handle(raws, keys=["a", "b", "c"], owners=[1, 1, 0])
            assert (res.handled_events, res.failed_events) == (3, 0)
            assert sorted(w.events for w in c.stats().workers) == [1, 2]

    asyncio.run(main())


def test_submissions_of_one_turn_keep_their_owners_whether_one_worker_or_one_per_key() -> None:
    """One operation merges what one loop turn submitted: a submission whose keys were
    all made for one worker (``owner=0``) and one with each key's worker (a list, as the
    server reads for ids clients send) keep their workers; a submission without owners
    makes the engine hash every key of the operation."""

    async def counts(c: Collector) -> list[int]:
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # the counters trail the results a little
            per = [w.events for w in c.stats().workers]
            if sum(per) >= want or asyncio.get_running_loop().time() > deadline:
                return per
            await asyncio.sleep(0.01)

    want = 0

    async def main() -> None:
        nonlocal want
        async with Collector(playback_pipeline(Immediate()), workers=2) as c:
            co = Coalescer(c)
            raws = [msgspec.json.encode(event(i)) for i in range(9)]
            a = co.submit(raws[:4], ["a1", "a2", "a3", "a4"], 0)
            b = co.submit(raws[4:], ["b1", "b2", "b3", "b4", "b5"], [1, 1, 1, 1, 0])
            res = await asyncio.wait_for(asyncio.gather(a, b), 30)
            assert [(r.handled_events, r.failed_events) for r in res] == [(4, 0), (5, 0)]
            want = 9
            assert await counts(c) == [5, 4]
            keys = [f"k{i}" for i in range(9)]
            d = co.submit(raws[:4], keys[:4], [0, 0, 0, 0])  # not where the shard function puts them
            e = co.submit(raws[4:], keys[4:])  # keys of their own: the engine hashes them all
            res = await asyncio.wait_for(asyncio.gather(d, e), 30)
            assert [(r.handled_events, r.failed_events) for r in res] == [(4, 0), (5, 0)]
            hashed = ShardMap(2).of_many(keys)
            want = 18
            assert await counts(c) == [5 + hashed.count(0), 4 + hashed.count(1)]
            await co.aclose()

    asyncio.run(main())


def test_the_daemons_dedup_max_bounds_each_workers_window(tmp_path: object) -> None:
    """``[pipeline] dedup_max``: each worker remembers at most that many ids, the
    oldest forgotten first (a copy of a forgotten id is stored again)."""
    from collector.config import decode_config
    from collector.packs import build_pipeline

    cfg = decode_config({"pipeline": {"enrich_latency": 0, "dedup_max": 3}, "data_dir": str(tmp_path)})
    ids = [f"e{i}" for i in range(5)]

    def batch(which: list[str]) -> list[bytes]:
        return [msgspec.json.encode({"id": i, "type": "user_action", "source": "web"}) for i in which]

    async def main() -> None:
        async with Collector(build_pipeline(cfg), workers=1) as c:
            for i in ids:  # one operation each: remembered in order
                assert (await c.handle(batch([i]), keys=[i])).failed_events == 0
            res = await c.handle(batch(["e0", "e1", "e2", "e3", "e4"]), keys=ids)
        # e0 and e1 were forgotten (3 kept: e2, e3, e4): stored again; the rest duplicates
        assert [(e.index, e.kind) for e in res.errors] == [(2, "duplicate"), (3, "duplicate"), (4, "duplicate")]

    asyncio.run(main())
