"""Dedup: drop events whose id was stored within a TTL (ack after commit).

::

    chunk ─► seen (committed ids)? duplicate │ claimed by a chunk in flight? wait for it
          ─► new: claimed by this chunk ─► sinks commit ─► settle(ok) ─► seen (or released;
             so are the ids of events a sink dead-lettered)

With ``count_by``, the duplicates are also counted per value of that field (the event
type): the runtime is a :class:`CountingDedupWindow` whose ``snapshot()`` the worker
publishes, and ``Dedup.merge``/``read`` sum the workers' counts on read.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from operator import attrgetter
from typing import Any

import msgspec

from ..protocol import ErrorRecord
from .base import Stage
from .integrity import field_path

__all__ = ["CountingDedupWindow", "Dedup", "DedupWindow"]


@dataclass(frozen=True)
class Dedup(Stage):
    """Drop events whose ``field`` was stored within ``ttl`` seconds (per-type TTLs).

    An id counts as seen only once the chunk carrying it was committed by the sinks
    (ack after commit): the worker calls the runtime's ``settle`` after the sinks
    returned. A copy of an id whose original is still being stored (a client retrying
    during a store outage) is never answered as a duplicate before the original is
    stored: its chunk waits up to ``wait`` seconds for the original's outcome. If the
    original was stored, the copy is a ``duplicate``; if it failed, the copy is stored
    in its place; if the wait runs out, the copy fails with kind ``retry`` (the daemon
    answers 503 with Retry-After), so the client sends it again later.

    ``ttl_by_type`` maps a value of ``type_field`` to its own TTL (seed 003: a click
    is a duplicate for 5 s, a purchase for a day). At most ``max_entries`` ids are
    remembered; the oldest are forgotten first. The window lives in the worker's
    memory: after a restart it is empty, and a retry of an event stored before the
    restart is stored again (idempotent sinks keep one row per id).

    ``count_by`` (a field or property of the event, e.g. ``"type"``; dotted paths
    work, into Structs and dicts) counts the duplicates per value of that field: read
    them with ``collector.aggregate(name)`` (``{value: count}``; an event lacking the
    field counts under ``""``), on ``GET /aggregates`` and as
    ``collector_duplicates_total`` in the daemon's metrics. Counts are per worker and summed on read; a worker that dies
    keeps the counts of its last snapshot. Without ``count_by`` the stage keeps no
    counts and is not an aggregate.
    """

    field: str = "id"
    ttl: float = 300.0
    max_entries: int = 1_000_000
    type_field: str | None = None
    ttl_by_type: dict[str, float] = dc_field(default_factory=dict)
    wait: float = 30.0
    name: str = "dedup"
    count_by: str | None = None

    @property
    def stateful(self) -> bool:
        """Whether the workers publish partials (only with ``count_by``)."""
        return self.count_by is not None

    @property
    def integrity(self) -> str | None:
        """What the daemon's metrics show of this stage: per-value duplicate counts."""
        return "duplicates" if self.count_by is not None else None

    def build(self) -> DedupWindow:
        """A dedup window for one worker (one that counts duplicates with ``count_by``)."""
        return DedupWindow(self) if self.count_by is None else CountingDedupWindow(self)

    def merge(self, partials: Sequence[bytes]) -> dict[Any, int]:
        """The workers' duplicate counts summed per value."""
        out: dict[Any, int] = {}
        for b in partials:
            for v, n in _decoder.decode(b).counts:
                out[v] = out.get(v, 0) + n
        return out

    def read(self, result: dict[Any, int], key: Any = None, **_: Any) -> Any:
        """``{value: duplicates}``, or one value's count (0 when none was seen)."""
        if key is None:
            return dict(sorted(result.items(), key=lambda kv: (-kv[1], str(kv[0]))))
        return result.get(key, 0)


class _Claim:
    """The ids one chunk claimed, and the future its waiting copies await.

    The future is made only when a copy waits (rare): a chunk nobody waits for costs a
    set, not a future (a one-event chunk is the daemon's single-event path).
    """

    __slots__ = ("fut", "keys")

    def __init__(self, keys: set[Any]) -> None:
        self.fut: asyncio.Future[bool] | None = None
        self.keys = keys

    def waiter(self) -> asyncio.Future[bool]:
        """The future settle() resolves with the chunk's outcome."""
        if self.fut is None:
            self.fut = asyncio.get_running_loop().create_future()
        return self.fut


class DedupWindow:
    """The running form of :class:`Dedup` in one worker.

    ``seen`` holds committed ids. Each chunk in flight holds a claim on its new ids (a
    set, so claiming and releasing a chunk are C-level set and dict operations, not a
    loop over its events); a worker has at most its window of chunks in flight, so an
    id is checked against a handful of sets. ``__call__`` returns the drops, or a
    coroutine giving them when some id is claimed by another chunk in flight.
    """

    def __init__(self, spec: Dedup) -> None:
        self.seen: dict[Any, float] = {}  # id → expiry
        # the ids in the order they were remembered, in groups sharing one expiry (a
        # whole chunk in the common case): forgetting the oldest pops from the left in
        # O(1), where iterating a dict from its start would first walk over every slot
        # that earlier deletions left empty (a worker holding 1M ids slowed 20x)
        self.order: collections.deque[tuple[float, list[Any]]] = collections.deque()
        # claims of the chunks in flight, by the identity of the event list the worker
        # passed (it passes the same list to settle())
        self.claims: dict[int, _Claim] = {}
        self.field = spec.field
        self.ttl = spec.ttl
        self.cap = spec.max_entries
        self.tfield = spec.type_field
        self.by_type = dict(spec.ttl_by_type or {})
        self.wait = spec.wait
        self.get = attrgetter(spec.field)
        # called with (events, drops) when a chunk had drops (count_by); the common case,
        # all new and distinct, returns before it
        self.on_drops: Callable[[list[Any], list[ErrorRecord]], None] | None = None

    def _forget(self, group: tuple[float, list[Any]]) -> None:
        exp, ks = group
        seen = self.seen
        for k in ks:
            if seen.get(k) == exp:  # not re-remembered since (with a later expiry)
                del seen[k]

    def _dup(self, i: int, k: Any) -> ErrorRecord:
        return ErrorRecord(i, f"$.{self.field}", f"duplicate {self.field} {k!r}", "duplicate")

    def _holder(self, k: Any) -> _Claim | None:
        for c in self.claims.values():
            if k in c.keys:
                return c
        return None

    def __call__(self, events: list[Any]) -> Any:
        """Drops for ``events``; a coroutine when some id waits for another chunk."""
        now = time.monotonic()
        # expired groups first (per-type TTLs make the order approximate: a group
        # waits behind an older one that lives longer, and is still checked on read)
        order = self.order
        while order and order[0][0] <= now:
            self._forget(order.popleft())
        keys = list(map(self.get, events))
        seen = self.seen
        mine = _Claim(set(keys))
        claims = self.claims
        if (
            len(mine.keys) == len(keys)
            and seen.keys().isdisjoint(keys)
            and (not claims or all(c.keys.isdisjoint(keys) for c in claims.values()))
        ):
            # the common case, all new and distinct: claimed in C calls
            self.claims[id(events)] = mine
            return []
        dropped: list[ErrorRecord] = []
        waits: list[tuple[int, Any]] = []
        claimed = mine.keys
        claimed.clear()
        for i, k in enumerate(keys):
            until = seen.get(k)
            # stored already, or an earlier copy in this chunk (stored by the same commit)
            if (until is not None and until > now) or k in claimed:
                dropped.append(self._dup(i, k))
            elif self._holder(k) is not None:
                waits.append((i, k))
            else:
                claimed.add(k)
        self.claims[id(events)] = mine
        if not waits:
            if dropped and self.on_drops is not None:
                self.on_drops(events, dropped)
            return dropped
        return self._after_wait(events, mine, dropped, waits)

    async def _after_wait(
        self, events: list[Any], mine: _Claim, dropped: list[ErrorRecord], waits: list[tuple[int, Any]]
    ) -> list[ErrorRecord]:
        deadline = time.monotonic() + self.wait
        while waits:
            holders = {h.waiter() for _, k in waits if (h := self._holder(k)) is not None and h is not mine}
            left = deadline - time.monotonic()
            if holders and left > 0:
                await asyncio.wait(holders, timeout=left)
            now = time.monotonic()
            still = []
            for i, k in waits:
                until = self.seen.get(k)
                holder = self._holder(k)
                if (until is not None and until > now) or holder is mine:
                    dropped.append(self._dup(i, k))  # the original is stored now
                elif holder is None:  # the original failed: this copy is stored instead
                    mine.keys.add(k)
                elif now >= deadline:
                    dropped.append(ErrorRecord(
                        i, f"$.{self.field}",
                        f"{self.field} {k!r} is still being stored by an earlier request; retry later",
                        "retry"))
                else:  # taken over by another waiting copy meanwhile: wait for that one
                    still.append((i, k))
            waits = still
        dropped.sort(key=attrgetter("pos"))
        if dropped and self.on_drops is not None:
            self.on_drops(events, dropped)
        return dropped

    def settle(self, events: list[Any], ok: bool, failed: Collection[Any] = ()) -> None:
        """The sinks committed ``events`` (``ok``) or failed them: remember or release.

        ``failed`` lists events of a committed chunk that a sink did not store (it
        dead-lettered them): their ids are released, not remembered, so a client's
        retry is stored rather than answered ``duplicate``.
        """
        claim = self.claims.pop(id(events), None)
        if claim is None:
            return
        keys = claim.keys
        if ok and failed:
            keys = keys - set(map(self.get, failed))
        if ok and keys:
            now = time.monotonic()
            seen, order = self.seen, self.order
            if not self.tfield:
                exp = now + self.ttl
                group = list(keys)
                seen.update(dict.fromkeys(group, exp))
                order.append((exp, group))
            else:
                tfield, by_type, ttl = self.tfield, self.by_type, self.ttl
                get = self.get
                for e in events:
                    k = get(e)
                    if k in keys and seen.get(k, 0.0) <= now:  # the chunk's first copy
                        exp = now + by_type.get(getattr(e, tfield), ttl)
                        seen[k] = exp
                        order.append((exp, [k]))
            while len(seen) > self.cap and order:
                self._forget(order.popleft())
        if claim.fut is not None:
            claim.fut.set_result(ok)


class DuplicatesPartial(msgspec.Struct, array_like=True):
    """One worker's duplicate counts: ``[value, count]`` pairs (any msgpack key)."""

    stage: str
    counts: list[tuple[Any, int]]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(DuplicatesPartial)


class CountingDedupWindow(DedupWindow):
    """A :class:`DedupWindow` that also counts its duplicates per ``count_by`` value.

    The window calls ``_count`` only for a chunk with drops (``on_drops``): a chunk
    of new ids returns on the same path as in the plain window, and only the drops of
    kind ``duplicate`` are looked at.
    """

    def __init__(self, spec: Dedup) -> None:
        super().__init__(spec)
        self.name = spec.name
        self.value = field_path(spec.count_by or "")
        self.dups: dict[Any, int] = {}
        self._snap: bytes | None = None
        self.on_drops = self._count

    def _count(self, events: list[Any], drops: list[ErrorRecord]) -> None:
        dups, get = self.dups, self.value
        for r in drops:
            if r.kind != "duplicate":
                continue
            v = get(events[r.pos])
            if v is None:
                v = ""  # a JSON key and a Prometheus label, where None is neither
            elif type(v) not in (str, int, float):
                v = str(v)  # a bool, an enum, a nested value: a label JSON and msgpack carry
            dups[v] = dups.get(v, 0) + 1
            self._snap = None

    def snapshot(self) -> bytes:
        """The counts as msgpack; the same bytes object while nothing changed."""
        if self._snap is None:
            self._snap = _encoder.encode(DuplicatesPartial(self.name, list(self.dups.items())))
        return self._snap
