"""``Order``: deliver the events of each key in the order of a timestamp field.

::

    no buffer (max_delay 0):  chunk ─► stable sort by `by` (one sort, C key function)
        ─► the runner permutes the chunk (take_order) ─► sinks, in that order
        an event older than the newest one already delivered for its key: `late`, passed on
    buffer (max_delay > 0):   chunk ─► each timed event held per key (heap by `by`), kind
        "held" (off the chunk, not an error) ─► released in `by` order when older than
        its key's watermark, or max_delay seconds after it arrived, or the buffer is full
        ─► drain() (the runner's emitter machinery) ─► sinks commit ─► settle_records()
        ─► the chunk that brought them is acked (it waited: at-least-once)

Keyed state: shard the pipeline by ``key`` (the default is the pipeline's key) so
every event of a key reaches one worker. Times are compared as numbers: ``by`` may be
int or float (any unit; ``max_delay`` is then in that unit), or ``datetime`` / ISO 8601
strings (converted to epoch seconds, naive = UTC; a chunk holding any of these is
converted event by event). An event without a usable time is ``untimed``: never
held, never late, delivered after the chunk's timed events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ..errors import ConfigError
from ..protocol import ErrorRecord
from .base import Stage
from .integrity import values_of
from .windows import parse_time

__all__ = ["COUNTERS", "Order", "OrderRuntime"]

# summed across workers by Order.merge; `held` is a gauge (events in the buffers now)
COUNTERS = ("ordered", "reordered", "late", "untimed", "released_early", "forgotten_keys", "held")
_NUMBERS = {int, float}
_NEVER = float("-inf")  # the newest time delivered for a key not seen yet
_LAST = float("inf")  # a sequence number after every other: (t, _LAST) bounds all entries at t
_FOREVER = float("inf")
_waiter_of = operator.itemgetter(3)


@dataclass(frozen=True)
class Order(Stage):
    """Deliver each key's events in ``by`` order, within a chunk and across chunks.

    ``key``: the field whose events are kept in order (None: the pipeline's key, which
    the pipeline must shard by). ``max_delay``: None or 0, no buffer (a chunk is sorted;
    an event older than the newest delivered for its key is ``late`` and passed on);
    else events wait up to ``max_delay`` (seconds of event time behind the newest of
    their key, and of processing time since arrival) so a late arrival within it takes
    its place. At most ``max_held`` events wait per worker (beyond: the oldest arrivals
    go early, ``released_early``); ``max_keys`` keys are remembered (the oldest
    forgotten first; a forgotten key's next event is never late). ``tick``: seconds
    between the idle releases of a buffer. See docs/stateful-stages.md, "Ordering".
    """

    by: str
    key: str | None = None
    max_delay: float | None = None
    max_held: int = 100_000
    max_keys: int = 1_000_000
    tick: float = 0.1
    name: str = "order"

    def __post_init__(self) -> None:
        where = f"order stage {self.name!r}"
        if not isinstance(self.by, str) or not self.by:
            raise ConfigError(f"{where}: by must name the timestamp field (e.g. by = \"timestamp\")")
        if self.key is not None and (not isinstance(self.key, str) or not self.key):
            raise ConfigError(f"{where}: key must name a field (or be left out: the pipeline's key)")
        if self.max_delay is not None and not self.max_delay >= 0:
            raise ConfigError(f"{where}: max_delay must be >= 0 seconds, or 0/None for no buffer (got {self.max_delay})")
        if self.max_held < 1 or self.max_keys < 1 or not self.tick > 0:
            raise ConfigError(f"{where}: needs max_held >= 1, max_keys >= 1, tick > 0 "
                              f"(got {self.max_held}, {self.max_keys}, {self.tick})")

    @property
    def holds(self) -> bool:
        """Whether events wait in a buffer (then the stage must be the pipeline's last)."""
        return bool(self.max_delay)

    @property
    def integrity(self) -> str:
        """What the daemon's metrics show of this stage: ordering counters."""
        return "ordering"

    def build(self) -> OrderRuntime:
        """The ordering state of one worker."""
        return OrderRuntime(self)

    def merge(self, partials: Sequence[bytes]) -> dict[str, int]:
        """The workers' counters summed (``held``: events waiting in every worker now)."""
        out = dict.fromkeys(COUNTERS, 0)
        for b in partials:
            for c, v in zip(COUNTERS, _decoder.decode(b), strict=False):
                out[c] += v
        return out

    def retired(self, partial: bytes) -> bytes:
        """A dead worker's last partial as it stays merged: its counters, ``held`` 0 (the
        events it held come back in its redelivered chunks, held by its replacement)."""
        vals = _decoder.decode(partial)
        vals[COUNTERS.index("held")] = 0
        return _encoder.encode(vals)

    def read(self, result: dict[str, int], key: Any = None, **_: Any) -> dict[str, int]:
        """The merged counters."""
        return dict(result)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[int])


class _Waiter:
    """A chunk whose held events are not committed yet: ``left`` of them."""

    __slots__ = ("dead", "done", "failed", "left")

    def __init__(self) -> None:
        self.left = 0
        self.dead: list[ErrorRecord] = []
        self.failed = False
        self.done = asyncio.Event()


class OrderRuntime:
    """One worker's ordering: call it with a chunk; emitter (``drain``) with a buffer."""

    def __init__(self, spec: Order) -> None:
        self.spec = spec
        self.name = spec.name
        self.clock = time.monotonic  # processing time of the buffer (the runner's tick reads it)
        self._times = values_of(spec.by)
        self._keys: Any = None
        if spec.key is not None:
            self._bind_key(spec.key)
        self.delay = float(spec.max_delay or 0.0)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.last: dict[Any, Any] = {}  # key → newest time delivered (oldest-inserted first)
        self.newest: dict[Any, Any] = {}  # key → newest time seen (buffer: what overtook whom)
        self.held: dict[Any, list[tuple[Any, ...]]] = {}  # key → heap of entries (time, seq, event, waiter, pos)
        # per chunk held: (deadline, {key: its newest entry}); entries are (time, seq, event,
        # its chunk's waiter, its position there)
        self.arrivals: collections.deque[tuple[float, dict[Any, tuple[Any, ...]]]] = collections.deque()
        self.out: list[Any] = []
        self.out_wait: list[tuple[Any, ...]] = []  # the entries of ``out``
        self.drained: dict[int, list[tuple[Any, ...]]] = {}  # id(first record of a drain) → its entries
        self._seq = itertools.count()
        self._perm: list[int] | None = None
        self._snap: tuple[tuple[int, ...], bytes] | None = None

    def bind(self, pipeline: Any) -> None:
        """Called by the worker once built: ``key`` None reads the pipeline's key."""
        if self._keys is None:
            self._bind_key(pipeline.key)

    def _bind_key(self, path: str) -> None:
        self._keys = values_of(path)

    # ------------------------------------------------------------------ chunk
    def __call__(self, events: list[Any]) -> Any:
        """Order a chunk (no buffer: a permutation for :meth:`take_order`), or hold its
        timed events (buffer: a coroutine that ends once they were committed)."""
        return self._run(events, self.delay)

    def redelivered(self, events: list[Any]) -> Any:
        """A chunk delivered again after a worker died. The supervisor sends such a chunk
        alone (it may be what killed the worker) and nothing else until it is answered,
        so it is not held for ``max_delay``: its events are put in order with what is
        held of their keys and released at once (the answer waits for their commit)."""
        return self._run(events, 0.0)

    def _run(self, events: list[Any], delay: float) -> Any:
        if not events:
            return []
        times = self._times(events)
        if not set(map(type, times)) <= _NUMBERS:
            times = list(map(parse_time, times))  # ISO strings, datetimes; None where unusable
        if self._keys is None:
            raise ConfigError(f"order stage {self.name!r}: no key (the worker binds the pipeline's key)")
        keys = self._keys(events)
        self.counters["ordered"] += len(events)
        if self.delay:
            return self._hold(events, times, keys, delay)
        self._sort(times, keys)
        return []

    def take_order(self) -> list[int] | None:
        """The last chunk's new order (new position → old position), None when unchanged."""
        perm, self._perm = self._perm, None
        return perm

    def _sort(self, times: list[Any], keys: list[Any]) -> None:
        c = self.counters
        pos: list[int] | None = None  # None: positions unchanged (0..n-1)
        untimed: list[int] = []
        if None in times:
            untimed = [i for i, t in enumerate(times) if t is None]
            pos = [i for i, t in enumerate(times) if t is not None]
            times = [times[i] for i in pos]
            keys = [keys[i] for i in pos]
            c["untimed"] += len(untimed)
        ts = sorted(times)
        if ts != times:  # in order already (the common case) costs one C pass of each
            order = sorted(range(len(times)), key=times.__getitem__)  # stable: ties keep arrival order
            c["reordered"] += _overtaken(keys, times)
            times = ts
            keys = list(map(keys.__getitem__, order))
            pos = list(map(pos.__getitem__, order)) if pos is not None else order
        with contextlib.suppress(TypeError):  # an unhashable key (a JSON object): ordered in the chunk only
            self._deliver(keys, times)
        if pos is not None:
            self._perm = pos + untimed if untimed else pos

    def _deliver(self, keys: list[Any], times: list[Any]) -> None:
        """Remember the newest time delivered per key (``times`` ascending), counting the late."""
        last = self.last
        prev = list(map(last.get, keys, itertools.repeat(_NEVER)))  # C calls, no per-event bytecode
        late = sum(map(operator.lt, times, prev))
        last.update(zip(keys, times, strict=True))  # ascending: the newest of each key wins
        if late:
            self.counters["late"] += late
            for k, p in zip(keys, prev, strict=True):  # a key whose events were all late keeps its newest
                if last[k] < p:
                    last[k] = p
        self._forget(last)

    def _forget(self, table: dict[Any, Any]) -> None:
        over = len(table) - self.spec.max_keys
        if over > 0:
            for k in list(itertools.islice(table, over)):
                del table[k]
                self.newest.pop(k, None)
            self.counters["forgotten_keys"] += over

    # ------------------------------------------------------------------ buffer
    def _hold(self, events: list[Any], times: list[Any], keys: list[Any], delay: float) -> Any:
        now = self.clock()
        c = self.counters
        last, newest, held = self.last, self.newest, self.held
        seq, heappush = self._seq, heapq.heappush
        w = _Waiter()
        why = f"held by {self.name}"
        drops: list[ErrorRecord] = []
        newest_held: dict[Any, tuple[Any, ...]] = {}  # key → its newest entry held from this chunk
        for i, (e, t, k) in enumerate(zip(events, times, keys, strict=True)):
            if t is None:
                c["untimed"] += 1
                continue
            try:
                lt = last.get(k)
            except TypeError:  # an unhashable key (a JSON object) cannot be ordered
                c["untimed"] += 1
                continue
            if lt is not None and t < lt:
                c["late"] += 1  # its successors are gone: passed on with the chunk
                continue
            nt = newest.get(k)
            if nt is not None and t < nt:
                c["reordered"] += 1
            else:
                newest[k] = t
            entry = (t, next(seq), e, w, i)
            h = held.get(k)
            if h is None:
                held[k] = [entry]
            else:
                heappush(h, entry)
            top = newest_held.get(k)
            if top is None or entry > top:
                newest_held[k] = entry
            drops.append(ErrorRecord(i, "$", why, "held"))
        if not drops:
            return drops
        w.left = len(drops)
        c["held"] += w.left
        # processing time: at the deadline, each key's newest entry from this chunk goes,
        # with everything older of its key
        self.arrivals.append((now + delay, newest_held))
        for k in newest_held:  # the event-time watermark: newest seen minus max_delay
            self._release(k, (newest[k] - delay, _LAST))
        self.expire(now)
        return self._wait(w, drops)

    async def _wait(self, w: _Waiter, drops: list[ErrorRecord]) -> list[ErrorRecord]:
        """Until the sinks committed this chunk's held events: ``drops`` and the dead-lettered."""
        await w.done.wait()
        if w.failed:
            raise RuntimeError(f"order stage {self.name!r}: the commit of this chunk's held events failed")
        if not w.dead:
            return drops
        dead = {d.pos for d in w.dead}
        return [d for d in drops if d.pos not in dead] + w.dead

    def _release(self, k: Any, upto: tuple[Any, ...]) -> int:
        """Release key ``k``'s held entries up to ``upto`` (time, sequence), in order."""
        h = self.held.get(k)
        if not h or h[0] > upto:
            return 0
        out, wait = self.out, self.out_wait
        heappop = heapq.heappop
        n = 0
        entry = h[0]
        while h and h[0] <= upto:
            entry = heappop(h)
            out.append(entry[2])
            wait.append(entry)
            n += 1
        self.last[k] = entry[0]
        if not h:
            del self.held[k]
            self._forget(self.last)
        self.counters["held"] -= n
        return n

    def expire(self, now: float) -> None:
        """Release what waited ``max_delay`` since arrival (with its key's older events),
        then the oldest arrivals while more than ``max_held`` wait."""
        arr = self.arrivals
        while arr and arr[0][0] <= now:
            for k, entry in arr.popleft()[1].items():
                self._release(k, entry)
        c = self.counters
        while c["held"] > self.spec.max_held and arr:  # key by key from the oldest arrivals
            group = arr[0][1]
            k = next(iter(group))
            c["released_early"] += self._release(k, group.pop(k))
            if not group:
                arr.popleft()
        if not c["held"]:
            arr.clear()  # what is left points at released events

    def flush(self) -> None:
        """Release everything held, each key in order (the worker's drain)."""
        for k in list(self.held):
            self._release(k, (_FOREVER,))
        self.arrivals.clear()

    def drain(self) -> list[Any]:
        """The events released since the last drain, each key's in ``by`` order."""
        out, self.out = self.out, []
        if out:
            # their chunks, found again by the first event when the commit is settled
            self.drained[id(out[0])] = self.out_wait
            self.out_wait = []
        return out

    def settle_records(self, records: list[Any], ok: bool, dead: Sequence[tuple[int, str, str]] = ()) -> None:
        """The sinks committed ``records`` (a drain of this stage; ``ok`` False: the commit
        failed): the chunks that brought them are answered when all theirs are in."""
        entries = self.drained.pop(id(records[0]), None) if records else None
        if entries is None:
            return
        if not ok:
            for w in {id(e[3]): e[3] for e in entries}.values():
                w.failed = True
                w.done.set()
            return
        for pos, sink, r in dead:
            e = entries[pos]
            e[3].dead.append(ErrorRecord(e[4], "$", f"sink {sink}: {r}", "deadlettered"))
        for w, n in collections.Counter(map(_waiter_of, entries)).items():
            w.left -= n
            if w.left <= 0:
                w.done.set()

    def stats(self) -> dict[str, int]:
        """The counters (``held``: events waiting now)."""
        return dict(self.counters)

    def snapshot(self) -> bytes:
        """The counters as msgpack; the same bytes object while they did not change."""
        vals = tuple(self.counters[c] for c in COUNTERS)
        if self._snap is None or self._snap[0] != vals:
            self._snap = (vals, _encoder.encode(list(vals)))
        return self._snap[1]


def _overtaken(keys: list[Any], times: list[Any]) -> int:
    """Events (arrival order) that came after a newer event of their key: the ones moved."""
    newest: dict[Any, Any] = {}
    n = 0
    for k, t in zip(keys, times, strict=True):
        m = newest.get(k)
        if m is not None and t < m:
            n += 1
        else:
            newest[k] = t
    return n
