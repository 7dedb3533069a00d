"""Unit tier for the engine's parts, without processes (as gunicorn's test_arbiter does):
the Planner on real inputs, Admission with threads and loops, the Ledger with fake
channels, the WorkerPool's verdicts with fake processes and a recording owner.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from collector import Overloaded, Pipeline
from collector.arena import PayloadArena
from collector.engine.admission import Admission
from collector.engine.ledger import Ledger, events_decoder
from collector.engine.plan import Planner
from collector.engine.pool import WorkerPool, describe_exit
from collector.errors import CollectorClosed, WorkerBootError, WorkerError
from collector.protocol import Ack, BootFailed, ChunkSummary, ErrorRecord


class Ev(msgspec.Struct):
    id: int
    user: str


PIPE = Pipeline(name="t", event_type=Ev, key="user", id_field="id")


def events(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "user": f"u{i % 7}"} for i in range(n)]


def cut(planner: Planner, op: Any) -> list[tuple[Any, Any]]:
    return list(planner.cut(op))


# ---------------------------------------------------------------- Planner
def test_planner_shards_by_a_stable_hash_and_cuts_chunks_per_worker() -> None:
    p = Planner(PIPE, nworkers=2, chunk_size=4)
    op = p.prepare(events(20), False)
    assert op.total == 20 and op.distinct_keys == 7 and not op.errors
    parts = cut(p, op)
    assert parts[-1] == (None, None)  # the seal
    per_worker = parts[0][0]
    seen = []
    for w, entries in enumerate(per_worker):
        assert all(e.n <= 4 for e in entries)
        for e in entries:
            for pos in e.positions:
                assert zlib.crc32(f"u{pos % 7}".encode()) % 2 == w  # the key's worker
                seen.append(pos)
    assert sorted(seen) == list(range(20))


def test_planner_reports_bad_input_instead_of_raising() -> None:
    p = Planner(PIPE, nworkers=2, chunk_size=4)
    op = p.prepare(b'[{"id": 1, "user": "a"}, {"id": ', False)
    assert op.failed == 1 and op.plan is not None and op.plan.empty()
    assert "not a valid JSON array" in op.errors[0].reason and "byte" in op.errors[0].reason
    lines = b'{"id": 1, "user": "a"}\nnot json\n[1]\n{"id": 2, "user": "b"}'
    op = p.prepare(lines, False)
    # NDJSON is not read here: the workers that route its ranges report bad lines
    assert not op.errors and op.plan is not None and op.plan.route == 2 and op.plan.slices
    op = p.prepare([{"id": 1, "user": "a"}, 7, {"id": 2, "user": "b"}], False)
    assert [e.index for e in op.errors] == [1] and "Expected `object`" in op.errors[0].reason


def test_planner_chunk_mode_cuts_ndjson_at_newlines_covering_every_line() -> None:
    p = Planner(Pipeline(name="t", event_type=Ev, key="user", shard="chunk"), nworkers=2, chunk_size=10)
    body = b"\n".join(msgspec.json.encode(e) for e in events(95))
    op = p.prepare(body, False)
    parts = cut(p, op)
    entries = parts[0][1]
    assert parts[-1] == (None, None)
    assert b"\n".join(bytes(e.payload) for e in entries) == body  # views of the caller's bytes
    # the supervisor cuts ranges and counts nothing: each worker counts its chunk's lines
    assert [e.lo for e in entries] == list(range(len(entries)))
    assert all(8 <= bytes(e.payload).count(b"\n") + 1 <= 12 for e in entries[:-1])
    assert 80 <= op.total <= 110  # an estimate until the acks give the count


def test_planner_chunk_mode_leaves_blank_lines_to_the_workers() -> None:
    p = Planner(Pipeline(name="t", event_type=Ev, key="user", shard="chunk"), nworkers=2, chunk_size=4)
    lines = [msgspec.json.encode(e) for e in events(20)]
    body = b"\r\n \n" + b"\n\n".join(lines[:10]) + b"\r\n" + b"\r\n".join(lines[10:]) + b"\n\n  \n"
    op = p.prepare(body, False)
    entries = cut(p, op)[0][1]
    got = [ln.strip() for e in entries for ln in bytes(e.payload).split(b"\n") if ln.strip()]
    assert got == lines  # every event in exactly one range, in order
    assert not bytes(entries[-1].payload).endswith((b"\n", b" "))  # trailing blanks trimmed


# ---------------------------------------------------------------- Admission
def test_admission_bounds_and_admits_a_big_batch_alone() -> None:
    a = Admission(100, lambda: None)
    assert a.try_admit(60) and not a.try_admit(60)
    with pytest.raises(Overloaded, match="max_inflight=100"):
        a.admit_sync(60, block=False, timeout=None, on_loop=False)
    t0 = time.monotonic()
    with pytest.raises(Overloaded):
        a.admit_sync(60, block=True, timeout=0.1, on_loop=False)
    assert 0.09 < time.monotonic() - t0 < 5
    a.release(60)
    assert a.try_admit(1000)  # larger than the bound, admitted alone
    assert not a.try_admit(1)


def test_admission_wakes_blocked_threads_and_awaiting_loops_on_release() -> None:
    a = Admission(10, lambda: None)
    assert a.try_admit(10)
    done = threading.Event()

    def blocked() -> None:
        a.admit_sync(5, block=True, timeout=10, on_loop=False)
        done.set()

    t = threading.Thread(target=blocked)
    t.start()

    async def awaiting() -> float:
        t0 = time.monotonic()
        await a.admit(5, block=True)
        return time.monotonic() - t0

    threading.Timer(0.2, a.release, (10,)).start()
    waited = asyncio.run(asyncio.wait_for(awaiting(), 10))
    assert done.wait(10) and waited >= 0.15
    t.join(10)
    assert a.inflight == 10


def test_admission_asks_the_engine_whether_it_is_open() -> None:
    state = {"open": True}

    def check() -> None:
        if not state["open"]:
            raise CollectorClosed("closed")

    a = Admission(10, check)
    assert a.try_admit(10)
    result: list[BaseException] = []

    def blocked() -> None:
        try:
            a.admit_sync(5, block=True, timeout=10, on_loop=False)
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.05)
    state["open"] = False
    a.wake()  # a shutdown wakes waiters, which then see the engine closed
    t.join(10)
    assert result and isinstance(result[0], CollectorClosed)


# ---------------------------------------------------------------- Ledger
class FakeChannel:
    """A worker slot without a process: what is sent is kept; payloads go through a real
    shared-memory arena (closed with the test)."""

    def __init__(self, window: int) -> None:
        self.ready = True
        self.sent: list[Any] = []
        self.arena = PayloadArena(window, 64 << 10)
        ARENAS.append(self.arena)

    def send(self, msg: Any) -> bool:
        self.sent.append(msg)
        return True

    def place(self, payload: bytes | memoryview) -> int:
        return self.arena.put(payload)

    def release(self, k: int) -> None:
        self.arena.free(k)

    def reserve(self) -> int:
        return self.arena.take()

    def read(self, k: int, size: int) -> bytes:
        return bytes(self.arena.view(k, size))

    def payload(self, msg: Any) -> bytes:
        """What the worker reads for ``msg``: inline, or its arena slot."""
        return msg.payload if msg.slot < 0 else bytes(self.arena.view(msg.slot, msg.size))


ARENAS: list[PayloadArena] = []


@pytest.fixture(autouse=True)
def _close_arenas() -> Any:
    yield
    while ARENAS:
        ARENAS.pop().close()


def ack(chunk: Any, n: int, errors: list[ErrorRecord] | None = None) -> Ack:
    errs = errors or []
    return Ack(chunk.id, n - len(errs), len(errs), errs, ChunkSummary(counts={}, lookups={}))


def ledger_with(window: int, max_attempts: int = 3,
                chunk_size: int = 2) -> tuple[Ledger, list[FakeChannel], Admission, Planner]:
    chans = [FakeChannel(window), FakeChannel(window)]
    adm = Admission(1_000_000, lambda: None)
    planner = Planner(PIPE, 2, chunk_size)
    return Ledger(chans, window, max_attempts, adm, events_decoder(Ev), planner), chans, adm, planner


def ack_all(ledger: Ledger, chans: list[FakeChannel], op: Any, handled: Callable[[Any], int] | None = None) -> Any:
    """Acknowledge every chunk sent, and those the acks free, until ``op`` is done (bounded);
    ``handled(entry)``: the events each ack counts (default: the entry's)."""
    for _ in range(100):
        if op.done():
            break
        for i, c in enumerate(chans):
            for msg in list(c.sent):
                e = ledger.inflight[i].get(msg.id)
                if e is not None:
                    ledger.on_ack(i, ack(msg, handled(e) if handled else e.n))
    return op.result()


def feed(ledger: Ledger, planner: Planner, adm: Admission, n: int) -> Any:
    op = planner.prepare(events(n), False)
    assert adm.try_admit(op.total)
    for per_worker, shared in planner.cut(op):
        ledger.enqueue(op, per_worker, shared)
    return op


def test_ledger_keeps_the_window_maps_errors_to_input_positions_and_releases_room() -> None:
    ledger, chans, adm, planner = ledger_with(window=2)
    op = feed(ledger, planner, adm, 20)
    assert [len(c.sent) for c in chans] == [2, 2]  # the window, not everything
    first = chans[0].sent[0]
    entry = ledger.inflight[0][first.id]
    bad_input_index = entry.positions[1]
    ledger.on_ack(0, ack(first, entry.n, [ErrorRecord(1, "$.user", "nope", "invalid")]))
    assert len(chans[0].sent) == 3  # room freed, the next chunk went out
    res = ack_all(ledger, chans, op)
    assert res.handled_events == 19 and res.failed_events == 1
    assert [(e.index, e.path) for e in res.errors] == [(bad_input_index, "$.user")]
    assert adm.inflight == 0
    # every payload went through its worker's arena, and every slot came back with its ack
    assert all(m.slot >= 0 and m.payload == b"" for c in chans for m in c.sent)
    assert [c.arena.free_count() for c in chans] == [2, 2]


def test_ledger_redelivers_a_dead_workers_chunks_first_one_at_a_time_then_fails_the_killer_as_lost() -> None:
    ledger, chans, adm, planner = ledger_with(window=2, max_attempts=2)
    op = feed(ledger, planner, adm, 12)
    held = sorted(ledger.inflight[0])
    queued_before = len(ledger.queues[0])
    assert chans[0].arena.free_count() == 0  # the window's two chunks are in the arena
    ledger.requeue(0, ledger.take_back(0), "killed by SIGKILL")
    assert chans[0].arena.free_count() == 2  # the dead worker's slots are free again
    assert [e.id for e in list(ledger.queues[0])[:2]] == held  # first, in order
    assert len(ledger.queues[0]) == queued_before + 2 and op.acc.redelivered == 2
    chans[0].sent.clear()
    ledger.pump(0)
    # a redelivered chunk goes alone: a second death blames it, not its window-mates
    assert [(m.id, m.attempt) for m in chans[0].sent] == [(held[0], 1)]
    ledger.requeue(0, ledger.take_back(0), "killed by SIGKILL")  # second death: lost
    lost = [e for e in op.errors if e.kind == "lost"]
    assert len(lost) == 2 and "killed its worker 2 times" in lost[0].reason
    chans[0].sent.clear()
    ledger.pump(0)
    assert [(m.id, m.attempt) for m in chans[0].sent] == [(held[1], 1)]  # the other one, alone again


def test_ledger_takes_a_killer_chunks_last_chance_one_event_at_a_time() -> None:
    ledger, chans, adm, planner = ledger_with(window=2, max_attempts=3)
    op = feed(ledger, planner, adm, 12)
    killer = min(ledger.inflight[0])
    clean_pos, poison_pos = ledger.inflight[0][killer].positions
    ledger.requeue(0, ledger.take_back(0), "killed by SIGKILL")  # its window: redelivered
    chans[0].sent.clear()
    ledger.pump(0)
    assert [(m.id, m.attempt) for m in chans[0].sent] == [(killer, 1)]  # alone
    ledger.requeue(0, ledger.take_back(0), "killed by SIGKILL")  # alone, and killed again
    chans[0].sent.clear()
    ledger.pump(0)
    (one,) = chans[0].sent  # its last chance: one event per chunk, each alone
    assert one.attempt == 2 and msgspec.json.decode(chans[0].payload(one)) == [events(12)[clean_pos]]
    ledger.on_ack(0, ack(one, 1))
    (two,) = chans[0].sent[1:]
    assert two.attempt == 2 and msgspec.json.decode(chans[0].payload(two)) == [events(12)[poison_pos]]
    ledger.requeue(0, ledger.take_back(0), "killed by SIGKILL")  # the poison, third death
    ledger.pump(0)  # the replacement is ready
    res = ack_all(ledger, chans, op)
    # only the poison failed; the event that shared its chunk was stored
    assert res.handled_events == 11 and res.failed_events == 1
    assert [(e.index, e.kind) for e in res.errors] == [(poison_pos, "lost")]
    assert "killed its worker 3 times" in res.errors[0].reason
    assert adm.inflight == 0


def test_ledger_fails_every_open_operation_on_a_fatal_error() -> None:
    ledger, _, adm, planner = ledger_with(window=2)
    op = feed(ledger, planner, adm, 10)
    ledger.fail_all(WorkerBootError("boom"))
    with pytest.raises(WorkerBootError):
        op.result()


# ---------------------------------------------------------------- WorkerPool
class FakeProcess:
    def __init__(self, exitcode: int | None) -> None:
        self.exitcode = exitcode
        self.sentinel = -1
        self.pid = 4242

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return self.exitcode is None

    def close(self) -> None:
        pass

    def kill(self) -> None:
        self.exitcode = -9


class Owner:
    def __init__(self, running: bool = True) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.running = running

    def stopping(self) -> bool:
        return not self.running

    def wants_replacement(self) -> bool:
        return self.running

    def worker_ready(self, i: int) -> None:
        self.calls.append(("ready", i))

    def worker_acked(self, i: int, a: Ack) -> None:
        self.calls.append(("acked", i))

    def worker_lost(self, i: int, cause: str) -> None:
        self.calls.append(("lost", cause))

    def fatal(self, exc: BaseException) -> None:
        self.calls.append(("fatal", exc))


def pool_with(owner: Owner) -> tuple[WorkerPool, list[int]]:
    pool = WorkerPool(owner, [0, 1], None, PIPE, 0.5, 10.0)
    spawned: list[int] = []
    pool.spawn = lambda w: spawned.append(w.index)  # type: ignore[method-assign]
    return pool, spawned


def test_pool_replaces_a_killed_worker_after_the_owner_took_its_chunks_back() -> None:
    owner = Owner()
    pool, spawned = pool_with(owner)
    w = pool.slots[1]
    w.process, w.ready, w.acked = FakeProcess(-9), True, 5
    pool.on_exit(w)
    assert owner.calls == [("lost", describe_exit(-9))] and spawned == [1]
    assert "SIGKILL" in describe_exit(-9) and "out of memory" in describe_exit(-9)


def test_pool_halts_on_a_boot_failure_and_on_a_crash_loop_instead_of_respawning() -> None:
    owner = Owner()
    pool, spawned = pool_with(owner)
    w = pool.slots[0]
    w.process, w.ready = FakeProcess(3), False
    w.boot_error = BootFailed(1, "ImportError: no module named x", "Traceback ...")
    pool.on_exit(w)
    kind, exc = owner.calls[0]
    assert kind == "fatal" and isinstance(exc, WorkerBootError) and "no module named x" in str(exc)
    assert spawned == []

    owner2 = Owner()
    pool2, spawned2 = pool_with(owner2)
    w2 = pool2.slots[0]
    for _ in range(5):  # dies before acknowledging anything, again and again
        w2.process, w2.ready, w2.acked, w2.exited = FakeProcess(-11), True, 0, False
        pool2.on_exit(w2)
    assert isinstance(owner2.calls[-1][1], WorkerError) and "keeps dying" in str(owner2.calls[-1][1])
    assert len(spawned2) == 4


def test_pool_expects_clean_exits_while_the_owner_stops() -> None:
    owner = Owner(running=False)
    pool, spawned = pool_with(owner)
    w = pool.slots[0]
    w.process, w.ready = FakeProcess(0), True
    pool.on_exit(w)
    assert owner.calls == [] and spawned == []


# ---------------------------------------------------------------- Partials
def test_partials_keep_the_latest_per_worker_and_a_dead_workers_last_one() -> None:
    from collector.engine.materialize import Partials
    from collector.protocol import Snapshot

    p = Partials(2)
    now = time.time()
    p.put(0, Snapshot("agg", b"a0", now - 0.5))
    p.put(1, Snapshot("agg", b"b0", now))
    p.put(0, Snapshot("agg", b"a1", now - 0.2))  # newer replaces older
    assert p.of("agg") == [b"a1", b"b0"] and 0.15 < p.staleness("agg") < 5
    p.retire(0)  # worker 0 died: its last partial stays counted
    p.put(0, Snapshot("agg", b"c0", now))  # its replacement starts from empty
    assert p.of("agg") == [b"a1", b"c0", b"b0"] and p.stages() == ["agg"]  # retired, then live by slot
    assert p.of("other") == [] and p.staleness("other") == 0.0


def test_frame_protocol_hands_over_every_frame_however_the_bytes_arrive() -> None:
    from collector.protocol import FrameProtocol, Ready, Routed, RoutedPart, encode_frame

    msgs: list[Any] = [Ready(1), Ack(2, 3, 0, [], ChunkSummary(counts={}, lookups={})),
                       Routed(5, 10, b"\x00" * 8, [RoutedPart(1, b"x" * 300_000, b"")]), Ready(4)]
    stream = b"".join(encode_frame(m) for m in msgs)

    async def feed(pieces: list[bytes], fail_on: type | None = None) -> list[Any]:
        got: list[Any] = []

        def on_message(m: Any) -> None:
            if type(m) is fail_on:
                raise RuntimeError("accounting bug")
            got.append(m)

        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        p = FrameProtocol(on_message)
        for piece in pieces:
            p.data_received(piece)
        assert not p.buf, "a complete stream leaves nothing pending"
        p.connection_lost(None)
        assert p.closed.done()
        assert len(errors) == (1 if fail_on else 0)
        return got

    whole = asyncio.run(feed([stream]))
    assert whole == msgs
    # one byte at a time, and in uneven pieces that split headers and bodies
    assert asyncio.run(feed([*(stream[i:i + 1] for i in range(2000)), stream[2000:]])) == msgs
    cuts = [0, 3, 7, 50, 70_001, 70_002, 299_999, len(stream) - 5, len(stream)]
    assert asyncio.run(feed([stream[a:b] for a, b in itertools.pairwise(cuts)])) == msgs
    # a frame whose handling raises is reported to the loop; the frames after it still arrive
    assert asyncio.run(feed([stream], fail_on=Ack)) == [msgs[0], msgs[2], msgs[3]]


def test_shard_map_hashes_many_keys_as_one_at_a_time() -> None:
    from collector.pipeline import ShardMap

    for n in (1, 2, 3, 7):
        sm = ShardMap(n)
        texts = [f"id-{i}" for i in range(500)] + ["", "é", "\u2603"]
        assert sm.of_many(texts) == [sm.of(k) for k in texts] == [sm[k] for k in texts]
        mixed = [*texts[:10], 5, None, 2.5, ("t",)]
        assert sm.of_many(mixed) == [sm.of(k) for k in mixed]
        assert sm.of_many([]) == []


# ------------------------------------------- routed parts through the owners' arenas
def ndjson_feed(ledger: Ledger, planner: Planner, adm: Admission, n: int) -> Any:
    body = b"\n".join(msgspec.json.encode(e) for e in events(n))
    op = planner.prepare(body, False)
    assert adm.try_admit(op.total)
    for per_worker, shared in planner.cut(op):
        ledger.enqueue(op, per_worker, shared)
    return op


def route(ledger: Ledger, chans: list[FakeChannel], i: int, msg: Any, into_slot: bool = True) -> dict[int, bytes]:
    """What a worker does with a shard="key" range: the other owner's lines go into the
    slot the range reserved in that owner's arena (or inline), then the Routed."""
    from array import array

    from collector.pipeline import ShardMap
    from collector.protocol import Routed, RoutedPart

    lines = chans[i].payload(msg).split(b"\n")
    owner = [ShardMap(2).of(msgspec.json.decode(ln)["user"]) for ln in lines]
    own = array("I", [p for p, w in enumerate(owner) if w == i]).tobytes()
    parts, written = [], {}
    for j in (0, 1):
        if j == i or j not in owner:
            continue
        pos = [p for p, w in enumerate(owner) if w == j]
        payload = b"\n".join(lines[p] for p in pos)
        k = msg.reserved[j] if msg.reserved else -1
        if into_slot and k >= 0:
            chans[j].arena.write(k, payload)
            parts.append(RoutedPart(j, b"", array("I", pos).tobytes(), k, len(payload)))
        else:
            parts.append(RoutedPart(j, payload, array("I", pos).tobytes()))
        written[j] = payload
    ledger.on_routed(i, Routed(msg.id, len(lines), own, parts))
    return written


def ack_routed(ledger: Ledger, chans: list[FakeChannel], op: Any) -> Any:
    """:func:`ack_all` for routed ranges (their own lines) and parts (their lines)."""
    return ack_all(ledger, chans, op, lambda e: len(e.part_pos if e.part_pos is not None else op.parts[e.lo].own))


def part_ledger() -> tuple[Ledger, list[FakeChannel], Admission, Planner]:
    return ledger_with(window=4, chunk_size=4)  # key mode: ranges of about 4 lines per worker


def range_msgs(chans: list[FakeChannel]) -> list[tuple[int, Any]]:
    return [(i, m) for i, c in enumerate(chans) for m in c.sent if m.route]


def test_a_router_writes_each_part_into_the_slot_its_range_reserved_in_the_owner_s_arena() -> None:
    ledger, chans, adm, planner = part_ledger()
    op = ndjson_feed(ledger, planner, adm, 16)
    ranges = range_msgs(chans)
    assert len(ranges) == 2 and {i for i, _ in ranges} == {0, 1}
    for i, m in ranges:  # each range holds a slot in the other worker's arena
        assert m.slot >= 0 and m.reserved[1 - i] >= 0 and m.reserved[i] == -1
    assert [c.arena.free_count() for c in chans] == [2, 2]  # 1 range + 1 reservation each
    written = {i: route(ledger, chans, i, m) for i, m in ranges}
    for i, m in ranges:
        j = 1 - i
        (child,) = [c for c in chans[j].sent if c.part and c.slot == m.reserved[j]]
        # sent without a copy in the supervisor: the bytes the router wrote, where it wrote them
        assert child.payload == b"" and chans[j].payload(child) == written[i][j]
        assert child.ndjson and not child.route
    res = ack_routed(ledger, chans, op)
    assert res.handled_events == 16 and res.failed_events == 0 and adm.inflight == 0
    assert [c.arena.free_count() for c in chans] == [4, 4]


def test_reservations_without_a_part_are_freed_at_the_routed_and_inline_parts_still_go() -> None:
    ledger, chans, adm, planner = part_ledger()
    op = ndjson_feed(ledger, planner, adm, 16)
    (i, m), (i2, m2) = range_msgs(chans)
    route(ledger, chans, i, m, into_slot=False)  # the Python router may send its parts inline
    assert chans[1 - i].arena.free_count() == 2  # the unused reservation went back, the part took a slot
    route(ledger, chans, i2, m2)
    res = ack_routed(ledger, chans, op)
    assert res.handled_events == 16 and [c.arena.free_count() for c in chans] == [4, 4]


def test_a_router_s_death_frees_its_reservations_and_its_redelivery_does_not_route_twice() -> None:
    ledger, chans, adm, planner = part_ledger()
    op = ndjson_feed(ledger, planner, adm, 16)
    (i, m), (i2, m2) = range_msgs(chans)
    j = 1 - i
    route(ledger, chans, i2, m2)
    # router i dies before its Routed: what it may have written is not a part
    ledger.requeue(i, ledger.take_back(i), "killed by SIGKILL")
    assert chans[j].arena.free_count() == 3  # only j's own range holds a slot there now
    chans[i].sent.clear()
    ledger.pump(i)
    (again,) = [x for x in chans[i].sent if x.route]
    assert again.id == m.id and again.attempt == 1 and again.reserved[j] >= 0
    written = route(ledger, chans, i, again)
    # and it dies after routing: the parts are queued already, the redelivery's Routed is ignored
    ledger.requeue(i, ledger.take_back(i), "killed by SIGKILL")
    chans[i].sent.clear()
    ledger.pump(i)
    (third,) = [x for x in chans[i].sent if x.route]
    before = chans[j].arena.free_count()
    route(ledger, chans, i, third)
    assert chans[j].arena.free_count() == before + 1  # its reservation freed, no second part
    parts = [x for x in chans[j].sent if x.part]
    assert sum(chans[j].payload(x) == written.get(j) for x in parts) == 1
    res = ack_routed(ledger, chans, op)
    assert res.handled_events == 16 and res.failed_events == 0  # each event once
    assert [c.arena.free_count() for c in chans] == [4, 4]


def test_an_owner_s_death_keeps_a_part_that_was_only_in_its_arena() -> None:
    ledger, chans, adm, planner = part_ledger()
    op = ndjson_feed(ledger, planner, adm, 16)
    written = {i: route(ledger, chans, i, m) for i, m in range_msgs(chans)}
    i = next(iter(written))
    j = 1 - i
    assert j in written[i]
    ledger.requeue(j, ledger.take_back(j), "killed by SIGKILL")  # the owner dies holding the part
    assert chans[j].arena.free_count() == 4  # the part's slot too: it was copied out first
    chans[j].arena.write(0, b"x" * 64)  # its slots are reused: the part must not depend on them
    seen: list[bytes] = []  # what the replacement reads for each part, when it is sent
    send = chans[j].send
    chans[j].send = lambda msg: (seen.append(chans[j].payload(msg)) if msg.part else None, send(msg))[1]  # type: ignore[method-assign]
    ledger.pump(j)
    res = ack_routed(ledger, chans, op)
    assert seen == [written[i][j]]
    assert res.handled_events == 16 and res.failed_events == 0
    assert [c.arena.free_count() for c in chans] == [4, 4]
