"""Lock-free statistics in one shared-memory block.

::

    worker 0 ──writes──► slot 0 ┐
    worker 1 ──writes──► slot 1 ├─► readers (supervisor, /metrics, stats()) sum slots
    ...                         │   without locks and without messaging any worker
    supervisor ─writes─► slot N ┘   (its own counters: received, redelivered, restarts)

Each slot is ``SLOT_BYTES`` long and 64-byte aligned, and has exactly one writer, so
no two processes ever write the same cache line. Every field is one aligned 8-byte word
(``q`` or ``d``), which x86-64 and arm64 read and write whole: a reader can see a
slightly old value, never a torn one. Readers take deltas for rates.

The parent creates the block and is its only owner; workers map it by name
(:class:`collector.shm.Segment`, which also says how a segment never outlives its
collector).
"""

from __future__ import annotations

import functools
import struct
import time
from itertools import compress
from operator import itemgetter
from typing import Any

from .results import SinkStats, Stats, WorkerStats
from .shm import Segment

__all__ = [
    "LATENCY_BOUNDS_MS",
    "MAX_SINKS",
    "SINK_FIELDS",
    "SinkStats",
    "Slot",
    "Stats",
    "StatsBlock",
    "WorkerStats",
]

SLOT_BYTES = 4096  # 512 words; a multiple of 64 keeps every slot on its own cache lines
WORDS = SLOT_BYTES // 8

# word offsets inside a slot; floats are stored through a 'd' view of the same memory
HEARTBEAT = 0  # d: time.monotonic() of the last stamp (CLOCK_MONOTONIC is system wide)
PID = 1
STARTED = 2  # d: monotonic time the worker came up
EVENTS = 3  # events handled (valid or not) and acknowledged
FAILED = 4  # events rejected as invalid
CHUNKS = 5
LOOKUP_CALLS = 6
CACHE_HITS = 7
COALESCED = 8
LOOKUP_FAILURES = 9
INFLIGHT = 10  # events received by the worker and not yet acknowledged
LAT_SUM_US = 11  # sum of chunk latencies (receive → ack), microseconds
LAT_COUNT = 12
READY = 13  # 1 once the worker's pipeline is built
BUSY_NS = 14  # ns spent processing chunks (for utilisation)
REDELIVERED = 15  # supervisor slot: chunks sent again after a worker died
RESTARTS = 16  # supervisor slot: workers respawned
RECEIVED = 17  # supervisor slot: events accepted by handle()
DROPPED_DUP = 18  # duplicates dropped by the dedup stage
DEADLETTERED = 19
FILTERED = 20  # events a filter or rule dropped on purpose (kind "filtered")
ENRICHED = 21  # events through the enrichment step, less the lookups that finally failed
# latency histogram of chunk processing: bucket i counts latencies <= LATENCY_BOUNDS_MS[i]
LAT_BUCKETS = 24
LATENCY_BOUNDS_MS = (0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, float("inf"))
# events per whole second, RATE_SLOTS seconds kept: (second stamp, count) pairs
RATE_BASE = 40
RATE_SLOTS = 8
# per-sink metrics: MAX_SINKS x SINK_FIELDS words
SINK_BASE = 64
SINK_FIELDS = ("rows", "batches", "errors", "retries", "last_commit_us")
MAX_SINKS = 8
assert LAT_BUCKETS + len(LATENCY_BOUNDS_MS) <= RATE_BASE
assert RATE_BASE + 2 * RATE_SLOTS <= SINK_BASE
assert SINK_BASE + MAX_SINKS * len(SINK_FIELDS) <= 128
# per-lookup metrics (collector.sources.metrics reads and writes them): MAX_LOOKUPS x
# LOOKUP_WORDS words from LOOKUP_BASE, in the order of Pipeline.lookups; the fields
# before LOOKUP_GAUGES are counters (carried over when a worker is replaced), the
# breaker state is a gauge, then LOOKUP_LAT_BOUNDS_MS latency buckets (counters)
LOOKUP_BASE = 128
LOOKUP_FIELDS = (
    "calls", "hits", "shared_hits", "misses", "coalesced", "failures", "not_found", "stale",
    "keys_fetched", "short_circuited", "breaker_opens", "breaker_half_opens", "breaker_closes",
    "err_timeout", "err_http_status", "err_invalid", "err_connection", "err_key", "err_other",
    "latency_sum_us", "kept", "dead_lettered", "held", "recovered", "log_suppressed",
)
LOOKUP_STATE = len(LOOKUP_FIELDS)  # gauge: 0 closed, 1 open, 2 half-open (as of the last chunk)
LOOKUP_LAT = LOOKUP_STATE + 1
LOOKUP_LAT_BOUNDS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, float("inf"))
LOOKUP_WORDS = LOOKUP_LAT + len(LOOKUP_LAT_BOUNDS_MS)
MAX_LOOKUPS = 8
assert LOOKUP_BASE + MAX_LOOKUPS * LOOKUP_WORDS <= WORDS

RATE_WINDOW = 5.0  # seconds over which processed_per_sec is measured
_WINDOW = int(RATE_WINDOW)
assert _WINDOW < RATE_SLOTS

_SLOT = struct.Struct(f"<{WORDS}q")
_SUMMED = (EVENTS, FAILED, CHUNKS, LOOKUP_CALLS, CACHE_HITS, COALESCED, LOOKUP_FAILURES,
           INFLIGHT, LAT_SUM_US, LAT_COUNT, DROPPED_DUP, DEADLETTERED, FILTERED, ENRICHED)
# what a replaced worker's slot hands to the supervisor's before it is reset: its counters,
# latency buckets and sink figures (not INFLIGHT: its chunks are redelivered, nor the
# last-commit latencies, which are gauges)
_CARRIED = tuple(
    [w for w in _SUMMED if w != INFLIGHT]
    + list(range(LAT_BUCKETS, LAT_BUCKETS + len(LATENCY_BOUNDS_MS)))
    + [SINK_BASE + k * len(SINK_FIELDS) + f for k in range(MAX_SINKS) for f in range(4)]
    + [LOOKUP_BASE + k * LOOKUP_WORDS + f for k in range(MAX_LOOKUPS) for f in range(LOOKUP_WORDS) if f != LOOKUP_STATE]
)

# What read() takes from each slot, all slots in one unpack_from (one pass over the block,
# no per-word Python): the heartbeat, the pid, and as bytes the "span" (EVENTS .. the last
# latency bucket), the rate ring and the sink words. Workers change these only when they
# take or acknowledge a chunk (and stamp the heartbeat every beat), so read() keeps what it
# derived from the last copy it saw (_Sums): a read that finds the same copy in the same
# second does no arithmetic at all.
#
# The spans are summed over the slots as one integer each (int.from_bytes, then +): every
# word in a span is a non-negative count below 2**63, so adding the integers adds each
# word on its own; a carry into the next word needs a word's total over the slots to pass
# 2**64 (1.8e19 events). The gauges in it (INFLIGHT, READY) are masked out (_span_mask).
# The sink words likewise.
_SPAN0, _SPAN1 = EVENTS, LAT_BUCKETS + len(LATENCY_BOUNDS_MS)
_SPAN_BYTES = 8 * (_SPAN1 - _SPAN0)
_RING_BYTES = 16 * RATE_SLOTS
_SINKS = struct.Struct(f"<{MAX_SINKS * len(SINK_FIELDS)}q")
_SLOT_READ = (
    f"dq{8 * (_SPAN0 - PID - 1)}x{_SPAN_BYTES}s{8 * (RATE_BASE - _SPAN1)}x{_RING_BYTES}s"
    f"{8 * (SINK_BASE - RATE_BASE) - _RING_BYTES}x{_SINKS.size}s{SLOT_BYTES - 8 * SINK_BASE - _SINKS.size}x"
)
assert HEARTBEAT == 0 and PID == 1 and struct.calcsize("<" + _SLOT_READ) == SLOT_BYTES
_ITEMS = 5  # what _SLOT_READ unpacks per slot: heartbeat, pid, span, ring, sink words
_SPAN = struct.Struct(f"<{_SPAN1 - _SPAN0}Q")  # unsigned: a sum of counts may pass 2**63
_span_totals = itemgetter(*(w - _SPAN0 for w in (
    EVENTS, FAILED, CHUNKS, LOOKUP_CALLS, CACHE_HITS, COALESCED, LOOKUP_FAILURES, LAT_SUM_US, LAT_COUNT,
    DROPPED_DUP, DEADLETTERED, FILTERED, ENRICHED, RECEIVED, REDELIVERED, RESTARTS)))
_OWN = struct.Struct(f"<{READY + 1 - _SPAN0}q")  # a worker's own figures: the head of its span
_RING = struct.Struct(f"<{2 * RATE_SLOTS}q")
_SINKS_SUM = struct.Struct(f"<{MAX_SINKS * len(SINK_FIELDS)}Q")
_NO_SINKS = bytes(_SINKS.size)


def _span_mask(*left_out: int) -> int:
    """All ones over the span's words but ``left_out`` (gauges, words another slot owns)."""
    return sum(((1 << 64) - 1) << (64 * (w - _SPAN0)) for w in range(_SPAN0, _SPAN1) if w not in left_out)


_SUP_MASK = _span_mask(INFLIGHT, READY)
_WORKER_MASK = _span_mask(INFLIGHT, READY, RECEIVED, REDELIVERED, RESTARTS)  # the last three: the supervisor's

# (second, the copy of the block, per worker its _OWN figures + its events in the rate
# window, all workers' events in it, totals as _span_totals picks them, latency buckets, sinks)
_Sums = tuple[int, tuple[Any, ...], list[tuple[int, ...]], int, tuple[int, ...],
              tuple[tuple[float, int], ...], tuple[SinkStats, ...]]


def _sum_slots(now_sec: int, t: tuple[Any, ...]) -> _Sums:
    """What read() derives from ``t``, its copy of the block (_SLOT_READ per slot), at ``now_sec``."""
    if not t:
        return now_sec, t, [], 0, (), (), ()
    spans = t[2::_ITEMS]
    # the supervisor's slot holds what replaced workers counted (Slot.absorb) and the
    # events it rejected before any worker saw them: totals never go backwards
    total = int.from_bytes(spans[-1], "little") & _SUP_MASK
    for span in spans[:-1]:
        total += int.from_bytes(span, "little") & _WORKER_MASK
    summed = _SPAN.unpack(total.to_bytes(_SPAN_BYTES, "little"))
    want, in_window = _ring_window(now_sec)
    oldest = now_sec - _WINDOW
    own = []
    for span, raw in zip(spans[:-1], t[3::_ITEMS][:-1], strict=True):  # the workers (the supervisor: no ring)
        ring = _RING.unpack(raw)
        stamps, counts = ring[0::2], ring[1::2]
        if stamps == want:  # a busy worker wrote every second of its ring: no stamp to check
            r = sum(compress(counts, in_window))
        else:
            r = sum([c for st, c in zip(stamps, counts, strict=True) if oldest <= st <= now_sec])
        own.append((*_OWN.unpack_from(span), r))
    sink_words = t[4::_ITEMS]
    return (
        now_sec,
        t,
        own,
        sum([w[-1] for w in own]),
        _span_totals(summed),
        tuple(zip(LATENCY_BOUNDS_MS, summed[LAT_BUCKETS - _SPAN0 :], strict=True)),
        () if sink_words.count(_NO_SINKS) == len(sink_words) else _sink_stats(sink_words),
    )


@functools.lru_cache(maxsize=2)
def _ring_window(now_sec: int) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """``(want, in_window)`` at ``now_sec``: the stamps of a ring written in each of the
    last RATE_SLOTS seconds, and which of its positions are in the rate window."""
    want = [0] * RATE_SLOTS
    in_window = [False] * RATE_SLOTS
    for sec in range(now_sec - RATE_SLOTS + 1, now_sec + 1):
        want[sec % RATE_SLOTS] = sec
        in_window[sec % RATE_SLOTS] = sec >= now_sec - _WINDOW
    return tuple(want), tuple(in_window)


def _sink_stats(sink_words: tuple[bytes, ...]) -> tuple[SinkStats, ...]:
    """The sinks that wrote or failed, summed over the slots (the supervisor's last)."""
    nf = len(SINK_FIELDS)
    total = 0
    last = [0] * MAX_SINKS
    for k, raw in enumerate(sink_words):
        if raw != _NO_SINKS:
            total += int.from_bytes(raw, "little")  # every sink word is a count or a duration
            if k < len(sink_words) - 1:  # last-commit times are gauges: the slowest worker's
                last = list(map(max, last, _SINKS.unpack(raw)[nf - 1 :: nf]))
    tot = _SINKS_SUM.unpack(total.to_bytes(_SINKS.size, "little"))
    return tuple(
        SinkStats(index=k, rows=rows, batches=batches, errors=errors, retries=retries, last_commit_ms=last[k] / 1000.0)
        for k, (rows, batches, errors, retries) in enumerate(zip(*(tot[f::nf] for f in range(4)), strict=True))
        if batches or errors
    )


class Slot:
    """One process's view of one slot: the writer side (workers) and the raw reader side."""

    __slots__ = ("_d", "_q", "index")

    def __init__(self, buf: memoryview, index: int) -> None:
        view = buf[index * SLOT_BYTES : (index + 1) * SLOT_BYTES]
        self._q = view.cast("q")
        self._d = view.cast("d")
        self.index = index

    def add(self, word: int, n: int = 1) -> None:
        """Add ``n`` to counter ``word`` (only the slot's one writer may call this)."""
        self._q[word] += n

    def set(self, word: int, n: int) -> None:
        """Store integer ``n`` at ``word``."""
        self._q[word] = n

    def get(self, word: int) -> int:
        """Read integer ``word``."""
        return self._q[word]

    def setf(self, word: int, x: float) -> None:
        """Store float ``x`` at ``word``."""
        self._d[word] = x

    def getf(self, word: int) -> float:
        """Read float ``word``."""
        return self._d[word]

    def reset(self) -> None:
        """Zero the slot (the supervisor does this before a worker is (re)started)."""
        for i in range(WORDS):
            self._q[i] = 0

    def absorb(self, other: Slot) -> None:
        """Add ``other``'s counters to this slot (the supervisor keeps what a replaced
        worker counted, so totals never go backwards when a slot is reset)."""
        q, o = self._q, other._q
        for w in _CARRIED:
            q[w] += o[w]

    def heartbeat(self) -> None:
        """Stamp the monotonic clock; the supervisor kills a worker whose stamp goes stale."""
        self._d[HEARTBEAT] = time.monotonic()

    def count_processed(self, events: int, failed: int, latency_s: float) -> None:
        """Account one acknowledged chunk: counters, latency histogram, per-second rate."""
        q = self._q
        q[EVENTS] += events
        q[FAILED] += failed
        q[CHUNKS] += 1
        us = int(latency_s * 1e6)
        q[LAT_SUM_US] += us
        q[LAT_COUNT] += 1
        ms = latency_s * 1000.0
        for i, bound in enumerate(LATENCY_BOUNDS_MS):
            if ms <= bound:
                q[LAT_BUCKETS + i] += 1
                break
        sec = int(time.monotonic())
        at = RATE_BASE + 2 * (sec % RATE_SLOTS)
        if q[at] != sec:
            # a new second for this ring position: the stamp is written last, so a
            # reader that sees the new stamp sees a count of this second (maybe partial)
            q[at + 1] = 0
            q[at] = sec
        q[at + 1] += events

    def sink_add(
        self,
        sink: int,
        rows: int = 0,
        batches: int = 0,
        errors: int = 0,
        retries: int = 0,
        latency_s: float | None = None,
    ) -> None:
        """Account sink ``sink`` (its index in the pipeline, < MAX_SINKS) activity."""
        if sink >= MAX_SINKS:
            return
        base = SINK_BASE + sink * len(SINK_FIELDS)
        q = self._q
        q[base] += rows
        q[base + 1] += batches
        q[base + 2] += errors
        q[base + 3] += retries
        if latency_s is not None:
            q[base + 4] = int(latency_s * 1e6)

    def recent_events(self, now_sec: int, window: int) -> int:
        """Events counted in the ``window`` whole seconds before ``now_sec`` and in it."""
        q = self._q
        total = 0
        for i in range(RATE_SLOTS):
            stamp = q[RATE_BASE + 2 * i]
            if now_sec - window <= stamp <= now_sec:
                total += q[RATE_BASE + 2 * i + 1]
        return total

    def add_many(self, start: int, values: list[int]) -> None:
        """Add ``values[i]`` to word ``start + i`` (only the slot's one writer may call this)."""
        q = self._q
        for i, n in enumerate(values, start):
            if n:
                q[i] += n

    def release(self) -> None:
        """Drop the memoryviews so the underlying mapping can be closed."""
        self._q.release()
        self._d.release()


# read() builds these positionally: a field added or moved must be added there too
assert WorkerStats.__struct_fields__ == (
    "index", "pid", "alive", "heartbeat_age", "events", "failed", "chunks", "inflight", "processed_per_sec",
    "lookup_calls", "cache_hits", "coalesced", "lookup_failures", "avg_latency_ms")
assert Stats.__struct_fields__ == (
    "total_events", "processed_per_sec", "avg_per_sec", "failed_events", "received_events", "inflight_events",
    "chunks", "redelivered_chunks", "worker_restarts", "duplicates_dropped", "deadlettered", "lookup_calls",
    "cache_hits", "coalesced_calls", "lookup_failures", "avg_latency_ms", "latency_buckets_ms", "uptime",
    "workers", "sinks", "filtered_events", "enriched_events")


class StatsBlock:
    """The shared-memory block: ``workers`` worker slots plus one supervisor slot."""

    def __init__(
        self, workers: int, name: str | None = None, *, create: bool = True
    ) -> None:
        self.workers = workers
        size = SLOT_BYTES * (workers + 1)
        self.segment = Segment(size, name, create=create)
        self.name = self.segment.name
        buf = self._buf = self.segment.buf
        self.slots = [Slot(buf, i) for i in range(workers + 1)]
        self._layout = struct.Struct("<" + _SLOT_READ * (workers + 1))  # read()'s one unpack
        self._sums = _sum_slots(-1, ())  # what read() derived from its last copy of the block
        self.started = time.monotonic()
        if create:
            for s in self.slots:
                s.reset()

    @property
    def supervisor(self) -> Slot:
        """The supervisor's own slot (the last one)."""
        return self.slots[self.workers]

    def read(self, alive: list[bool] | None = None) -> Stats:
        """Sum the slots into a :class:`Stats`; no lock, no message, a few microseconds.

        The whole block is copied out with one ``unpack_from`` (a consistent-enough
        snapshot of aligned words; the totals and the per-worker figures come from the
        same copy), then summed in C: see ``_SLOT_READ``. This runs in the caller's
        thread while workers are saturated, beside the supervisor's thread: every
        microsecond here is one the caller holds the GIL.
        """
        now = time.monotonic()
        now_sec = int(now)
        uptime = now - self.started
        # whole seconds [now_sec - window, now_sec) plus the running second; shorter
        # right after start, so the first seconds are not diluted by time not yet lived
        span = min(RATE_WINDOW + (now - now_sec), uptime)
        per_sec = 1.0 / span if span > 0.05 else 0.0
        t = self._layout.unpack_from(self._buf)  # the one read of the block
        sums = self._sums
        if sums[0] != now_sec or sums[1] != t:  # a worker took or acked a chunk, or a second began
            sums = self._sums = _sum_slots(now_sec, t)
        _, _, own, recent, tot, buckets, sinks = sums
        workers = [
            WorkerStats(  # positionally: keywords cost as much as the rest of a worker
                i, t[_ITEMS * i + 1], bool(alive[i]) if alive is not None else ready == 1,
                (now - t[_ITEMS * i]) if t[_ITEMS * i] else -1.0, events, failed, chunks, inflight, r * per_sec,
                lookups, hits, coalesced, lfail, (lat_sum / lat_n / 1000.0) if lat_n else 0.0,
            )
            for i, (events, failed, chunks, lookups, hits, coalesced, lfail, inflight, lat_sum, lat_n, ready, r)
            in enumerate(own)
        ]
        (events, failed, chunks, lookups, hits, coalesced, lfail, lat_sum, lat_n, dups, dead, filtered, enriched,
         received, redelivered, restarts) = tot
        # positionally (the order is checked under the class): 22 keywords cost ~1.3 µs; the
        # lists are new, their items (tuples, frozen SinkStats) are shared with earlier reads
        return Stats(
            events, recent * per_sec, events / uptime if uptime > 0 else 0.0, failed, received,
            max(received - events, 0), chunks, redelivered, restarts, dups, dead, lookups, hits, coalesced, lfail,
            (lat_sum / lat_n / 1000.0) if lat_n else 0.0, list(buckets), uptime, workers, list(sinks), filtered,
            enriched,
        )

    def raw(self, i: int) -> tuple[int, ...]:
        """Slot ``i``'s words copied out at once (one ``unpack_from``, no lock)."""
        return _SLOT.unpack_from(self._buf, i * SLOT_BYTES)

    def close(self) -> None:
        """Unmap the block; the creator also unlinks it (it is the one owner)."""
        for s in self.slots:
            s.release()
        self.slots = []
        self.segment.close()

    def __enter__(self) -> StatsBlock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
