"""The in-flight ledger: which worker holds which chunk, until it acknowledges it.

::

    enqueue(op, chunks) ─► queue of worker i (key mode) or the shared queue (chunk mode)
    pump(i) ─► while worker i's window has room: encode the next chunk, send it
    on_ack(i, ack) ─► errors, counts, events → the operation; chunk done; pump(i)
    on_routed(i, msg) ─► a routed NDJSON range's parts, queued to their owners
    take_back(i) ─► a dead worker's chunks, oldest first ─► requeue(i, ...) for the
                    replacement, or failed as ``lost`` after ``max_attempts`` deliveries
    last chunk of an operation done ─► op.finish() ─► admission.release(op.admitted)

The ledger never touches a process: it sends through :class:`Channel` objects that
the worker pool gives it, and the pool tells it when a worker is ready or gone.
"""

from __future__ import annotations

import collections
import time
from array import array
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, Protocol

import msgspec

from .. import stats as S
from ..protocol import Ack, Chunk, ErrorRecord, Routed, ndjson_lines
from ..results import ErrorItem
from .admission import Admission
from .operation import Operation, RangePart
from .plan import Entry, Planner

__all__ = ["Channel", "Ledger"]


class Channel(Protocol):
    """What the ledger needs of a worker slot: is it ready, and send it a chunk."""

    ready: bool

    def send(self, msg: Chunk) -> bool:
        """Queue ``msg`` on the worker's channel; False when there is no channel."""
        ...

    def place(self, payload: bytes | memoryview) -> int:
        """Copy a payload into the worker's shared-memory arena: its slot, or -1 (inline)."""
        ...

    def release(self, k: int) -> None:
        """Arena slot ``k`` is free again (its chunk acknowledged, or its worker gone)."""
        ...

    def reserve(self) -> int:
        """A free arena slot for a routed part another worker will write, or -1."""
        ...

    def read(self, k: int, size: int) -> bytes:
        """A copy of the ``size`` bytes in arena slot ``k``."""
        ...


class Ledger:
    """Per-worker queues and windows of chunks, and the operations they belong to."""

    def __init__(
        self,
        channels: Sequence[Channel],
        window: int,
        max_attempts: int,
        admission: Admission,
        decode_events: Callable[[bytes], list[Any]],
        planner: Planner,
    ) -> None:
        self.channels = channels
        self.window = window
        self.max_attempts = max_attempts
        self.admission = admission
        self.decode_events = decode_events
        n = len(channels)
        self.queues: list[collections.deque[Entry]] = [collections.deque() for _ in range(n)]
        self.inflight: list[dict[int, Entry]] = [{} for _ in range(n)]
        self.shared: collections.deque[Entry] = collections.deque()  # shard="chunk": any worker
        # per worker: the id of a redelivered chunk in flight there (0: none). It goes
        # alone, so if it kills the worker again it alone is blamed, not its window-mates
        self.suspect: list[int] = [0] * n
        self.ops: set[Operation] = set()
        self.counters: S.Slot | None = None  # the supervisor's stats slot, once started
        # chunk ids come from the planner (routed parts are chunks too), and it splits
        # a poison chunk's last delivery into one chunk per event
        self.planner = planner

    def load(self, i: int) -> int:
        """Chunks queued for and in flight at worker ``i`` (what it has yet to acknowledge)."""
        return len(self.queues[i]) + len(self.inflight[i])

    # -- in ---------------------------------------------------------------------------
    def enqueue(self, op: Operation, per_worker: list[list[Entry]] | None, shared: list[Entry] | None) -> None:
        """Queue an operation's chunks; ``(None, None)`` seals it (no more will come)."""
        if op.done():
            return
        if shared:
            self.ops.add(op)
            op.chunks_left += len(shared)
            self.shared.extend(shared)
            # deal one chunk at a time round the workers, or the first takes a whole window
            dealt = True
            while self.shared and dealt:
                dealt = False
                for i, ch in enumerate(self.channels):
                    if self.shared and ch.ready and len(self.inflight[i]) < self.window:
                        self.pump(i, limit=1)
                        dealt = True
            return
        if per_worker is None:
            op.sealed = True
            if op.chunks_left == 0:
                self.op_done(op)
            return
        self.ops.add(op)
        for i, entries in enumerate(per_worker):
            if entries:
                op.chunks_left += len(entries)
                self.queues[i].extend(entries)
                self.pump(i)

    def pump(self, i: int, limit: int = 1 << 30) -> None:
        """Send queued chunks while worker ``i``'s window has room."""
        ch = self.channels[i]
        if not ch.ready:
            return
        q = self.queues[i]
        shared = self.shared
        inflight = self.inflight[i]
        if self.suspect[i]:
            return
        while len(inflight) < self.window and limit > 0:
            limit -= 1
            if q:
                if q[0].attempt and inflight:
                    break  # a redelivered chunk waits for an empty window
                e = q.popleft()
            elif shared:
                e = shared.popleft()
                e.worker = i
            else:
                break
            op = e.op
            if op.done():  # its operation was failed meanwhile
                self.unslot(i, e)  # a routed part already in this worker's arena
                continue
            plan = op.plan
            assert plan is not None
            if e.payload is None and e.slot < 0:
                e.payload = plan.encode(e)
                e.items = None
                if e.payload is None:  # nothing left to send: every item failed to encode
                    self.complete(e)
                    continue
            e.sent_at = time.monotonic()
            inflight[e.id] = e
            if e.attempt:
                self.suspect[i] = e.id
            whole = e.part_pos is None  # not a part another worker routed: as planned
            # the payload goes through shared memory when it fits a slot; the slot is
            # freed at the ack or when the worker is gone (take_back), never before. A
            # routed part is there already: its router wrote it into the slot its range
            # reserved (see reserve)
            if e.slot < 0:
                k = e.slot = ch.place(e.payload)
                e.size = len(e.payload) if k >= 0 else 0
            k = e.slot
            route = plan.route if whole else 0
            msg = Chunk(
                e.id, e.payload if k < 0 else b"", op.events is not None, e.attempt, plan.ndjson, op.id,
                route, not whole, k, e.size, self.reserve(i, e) if route > 1 and k >= 0 else [],
            )
            if not ch.send(msg):
                break  # no channel (the worker is going): take_back() finds the chunk
            if e.attempt:
                break  # nothing else goes with it

    # -- out --------------------------------------------------------------------------
    def on_ack(self, i: int, ack: Ack) -> bool:
        """Account worker ``i``'s acknowledgement; False for a chunk it no longer holds."""
        e = self.inflight[i].pop(ack.id, None)
        if e is None:
            return False
        self.unslot(i, e)
        self.unreserve(e)  # a range that failed before it routed: no Routed came
        if self.suspect[i] == ack.id:
            self.suspect[i] = 0
        op = e.op
        if op.parts is not None:  # NDJSON ranges: placed once every range is counted
            self.account_range(e, ack)
        else:
            pos = e.positions if ack.errors or ack.events is not None else ()
            if ack.errors:
                op.errors.extend(ErrorItem(pos[r.pos], r.path, r.reason, r.kind) for r in ack.errors)
            if ack.events is not None and op.events is not None:
                if ack.errors:
                    bad = {r.pos for r in ack.errors}
                    pos = [p for i, p in enumerate(pos) if i not in bad]
                self.place_events(op.events, pos, ack.events)
        op.acc.add(ack.summary)
        if op.reported_keys is not None and ack.summary.keys:
            op.reported_keys.update(ack.summary.keys)
        op.account(ack.handled, ack.failed)
        op.worker_counted += ack.handled + ack.failed
        self.complete(e)
        self.pump(i)
        return True

    def reserve(self, i: int, e: Entry) -> list[int]:
        """Slots for the parts of range ``e``, sent to worker ``i``: one in each other
        worker's arena, which that range's router writes its part for that worker into.

        They stay reserved until its Routed arrives (a slot with a part goes to the part's
        chunk, the others are freed), or until its ack or its worker's death without one.
        Only for a range in the arena itself: a part is never larger than its range.
        """
        got = [-1] * len(self.channels)
        for j, ch in enumerate(self.channels):
            if j != i:
                got[j] = ch.reserve()
        if max(got) < 0:
            return []
        e.reserved = got
        return got.copy()  # the entry's list changes as the parts arrive; the message's must not

    def unreserve(self, e: Entry) -> None:
        """Free what range ``e`` still has reserved in the other workers' arenas."""
        if e.reserved is not None:
            for j, k in enumerate(e.reserved):
                if k >= 0:
                    self.channels[j].release(k)
            e.reserved = None

    def unslot(self, i: int, e: Entry) -> None:
        """Give back the arena slot of ``e``'s payload: worker ``i`` acknowledged it or is gone."""
        if e.slot >= 0:
            self.channels[i].release(e.slot)
            e.slot = -1

    def place_events(self, out: list[Any], pos: Sequence[int], events: bytes) -> None:
        """Put a chunk's returned events (those it stored, in order) at ``pos``."""
        for p, ev in zip(pos, self.decode_events(events), strict=False):
            out[p] = ev

    def account_range(self, e: Entry, ack: Ack) -> None:
        """An NDJSON range's ack (or a routed part's): keep its figures by line in the range."""
        op = e.op
        assert op.parts is not None
        part = op.parts[e.lo]
        errs = ack.errors
        lines = answers_for(e, part)
        if lines is None:  # shard="chunk": the worker counted the range
            part.lines = ack.handled + ack.failed
            lines = range(part.lines)
        elif e.part_pos is not None:  # a part another worker routed here: its own indices
            for r in errs:
                r.pos = lines[r.pos]
        # (a router's errors already count lines of the range)
        if errs:
            part.errors += errs
        if ack.events is not None and op.events is not None:
            if part.events is None:
                part.events = [None] * part.lines
            if errs:
                bad = {r.pos for r in errs}
                lines = [p for p in lines if p not in bad]
            self.place_events(part.events, lines, ack.events)

    def on_routed(self, i: int, msg: Routed) -> None:
        """Worker ``i`` routed a range: queue each other worker's part to its owner.

        The parts are chunks of their own in the ledger (redelivered, failed and
        acknowledged as any), and the range is done when its router's ack and every
        part's ack are in. A redelivered range routes again: that second Routed is
        ignored, the parts of the first are already queued.
        """
        e = self.inflight[i].get(msg.id)
        if e is None:  # taken back (its worker died): its reservations were freed then
            return
        if e.op.done() or e.op.parts is None or e.op.parts[e.lo].own is not None:
            self.unreserve(e)
            return
        reserved = e.reserved
        for p in msg.parts:  # checked before anything changes: a wrong slot is a bug
            if p.slot >= 0 and (reserved is None or reserved[p.worker] != p.slot):
                raise RuntimeError(f"worker {i} wrote a part into slot {p.slot} of worker {p.worker}'s "
                                   f"arena, which range {e.id} had not reserved")
        part = e.op.parts[e.lo]
        part.lines = msg.lines
        # arrays, not lists: no Python int per line in the supervisor (read only on
        # errors, returned events or a failure)
        part.own = array("I", msg.own)
        op = e.op
        for p in msg.parts:
            child = Entry(next(self.planner.ids), op, p.worker, None, e.lo, e.lo, 0, 0, p.payload or None)
            child.part_pos = array("I", p.positions)
            if reserved is not None and p.slot >= 0:  # the router wrote it into its owner's arena
                reserved[p.worker] = -1  # the part's chunk holds that slot now
                child.slot, child.size = p.slot, p.size
            op.chunks_left += 1
            self.queues[p.worker].append(child)
        self.unreserve(e)  # the slots of workers that got no part
        for p in msg.parts:
            self.pump(p.worker)

    def resolve(self, op: Operation) -> None:
        """NDJSON ranges: the operation's total, error indices and events from the counts.

        Range ``k``'s lines start after the lines of ranges ``0..k-1``, so positions are
        known only now; ``received`` is corrected from the estimate to the count.
        """
        parts, op.parts = op.parts, None
        assert parts is not None
        want = op.events is not None
        events: list[Any] = []
        total = 0
        for part in parts:
            n = max(part.lines, 0)
            if part.errors:
                op.errors.extend(ErrorItem(total + r.pos, r.path, r.reason, r.kind) for r in part.errors)
            if want:
                events += part.events if part.events is not None else [None] * n
            total += n
        if self.counters is not None:
            self.counters.add(S.RECEIVED, total - op.admitted)
        op.total = total
        op.events = events if want else None

    def take_back(self, i: int) -> list[Entry]:
        """Worker ``i`` died: the chunks it held and did not acknowledge, oldest first."""
        lost = sorted(self.inflight[i].values(), key=attrgetter("id"))
        self.inflight[i].clear()
        for e in lost:  # the process is gone: nothing reads its arena any more
            if e.payload is None and e.slot >= 0:
                # a routed part: its only copy is in the slot (the arena outlives the
                # worker); kept here for its redelivery, which places it again
                e.payload = self.channels[i].read(e.slot, e.size)
            self.unslot(i, e)
            self.unreserve(e)  # its router is gone: what it wrote there is not a part
        self.suspect[i] = 0
        return lost

    def requeue(self, i: int, entries: list[Entry], cause: str) -> None:
        """Give a dead worker's chunks to its replacement first, in their order.

        A chunk delivered ``max_attempts`` times (it kills every worker that reads it)
        fails as ``lost`` instead. A redelivered chunk is then sent alone (see
        :meth:`pump`): only the first death blames every chunk the worker held, so the
        chunks that merely shared a window with a poison chunk are stored, not lost.
        """
        counters = self.counters
        for e in reversed(entries):
            e.attempt += 1
            if e.attempt >= self.max_attempts:
                self.fail(e, f"chunk killed its worker {e.attempt} times (last: {cause})")
                continue
            if counters is not None:
                counters.add(S.REDELIVERED, 1)
            e.op.acc.redelivered += 1
            if e.attempt >= 2 and e.attempt == self.max_attempts - 1 and e.n > 1:
                # it went alone and killed again: it holds a poison event. Its last chance
                # is taken one event at a time, so that the poison fails alone and not the
                # events that shared its chunk (batches coalesced from many requests)
                singles = self.planner.split(e)
                if singles:
                    for s in singles:
                        s.attempt = e.attempt
                    e.op.chunks_left += len(singles) - 1
                    self.queues[i].extendleft(reversed(singles))
                    continue
            self.queues[i].appendleft(e)

    def fail(self, e: Entry, reason: str) -> None:
        """A chunk that cannot be delivered: its events fail as ``lost``."""
        op = e.op
        if op.parts is not None:  # an NDJSON range, or a routed part of one
            part = op.parts[e.lo]
            lines = answers_for(e, part)  # a routed range: only its own lines, the parts are elsewhere
            if lines is None:  # no worker counted it: count it here (rare)
                part.lines = len(ndjson_lines(bytes(e.payload)))
                lines = range(part.lines)
            part.errors += [ErrorRecord(p, "$", reason, "lost") for p in lines]
            op.account(0, len(lines))
            self.complete(e)
            return
        e.op.errors.extend(ErrorItem(p, "$", reason, "lost") for p in e.positions)
        e.op.account(0, len(e.positions))
        self.complete(e)

    def complete(self, e: Entry) -> None:
        """A chunk is done; its operation too when it was the last and all are queued."""
        e.payload = None
        op = e.op
        op.chunks_left -= 1
        if op.chunks_left == 0 and op.sealed:
            self.op_done(op)

    def op_done(self, op: Operation, exc: BaseException | None = None) -> None:
        """Complete ``op`` (or fail it with ``exc``) and release its in-flight room."""
        if op.parts is not None and exc is None:
            self.resolve(op)
        op.finish(exc)
        # account in the supervisor's slot the events no worker counted (rejected before
        # routing, unencodable, lost), so received == handled + in flight
        missing = op.total - op.worker_counted
        if missing > 0 and self.counters is not None:
            self.counters.add(S.EVENTS, missing)
            self.counters.add(S.FAILED, missing)
        self.ops.discard(op)
        self.admission.release(op.admitted)

    def fail_all(self, exc: BaseException) -> None:
        """Fail every open operation with ``exc`` (a fatal error, or closing)."""
        for op in list(self.ops):
            op.finish(exc)
        self.ops.clear()


def answers_for(e: Entry, part: RangePart) -> Sequence[int] | None:
    """The lines of its range that entry ``e`` answers for: a routed part's, or a router's
    own (and those that did not decode); None for a shard="chunk" range (all of it,
    counted by its worker)."""
    return e.part_pos if e.part_pos is not None else part.own


def events_decoder(event_type: type[msgspec.Struct]) -> Callable[[bytes], list[Any]]:
    """Decoder of the events a worker sends back when an operation asked for them."""
    return msgspec.json.Decoder(list[event_type]).decode  # type: ignore[valid-type]
