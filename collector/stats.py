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

The parent creates the block with :class:`multiprocessing.shared_memory.SharedMemory`
(which registers it with the resource tracker, so the segment is unlinked even when the
parent is SIGKILLed) and is its only owner. Workers attach by mapping
``/dev/shm/<name>`` directly: attaching through ``SharedMemory`` would register the
segment with the tracker a second time and unlink it when the worker exits
(CPython gh-82300). A collector killed together with its process group (``kill -9
-PGID``, a container stop) takes the tracker with it; the next block created on the
machine unlinks the segments whose creator pid is gone (:func:`sweep_stale_segments`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import struct
import time
from multiprocessing import shared_memory
from operator import add, itemgetter
from typing import Any

import msgspec

__all__ = [
    "LATENCY_BOUNDS_MS",
    "MAX_SINKS",
    "SINK_FIELDS",
    "SinkStats",
    "Slot",
    "Stats",
    "StatsBlock",
    "WorkerStats",
    "sweep_stale_segments",
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
    "latency_sum_us",
)
LOOKUP_STATE = len(LOOKUP_FIELDS)  # gauge: 0 closed, 1 open, 2 half-open (as of the last chunk)
LOOKUP_LAT = LOOKUP_STATE + 1
LOOKUP_LAT_BOUNDS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, float("inf"))
LOOKUP_WORDS = LOOKUP_LAT + len(LOOKUP_LAT_BOUNDS_MS)
MAX_LOOKUPS = 8
assert LOOKUP_BASE + MAX_LOOKUPS * LOOKUP_WORDS <= WORDS

RATE_WINDOW = 5.0  # seconds over which processed_per_sec is measured

_SLOT = struct.Struct(f"<{WORDS}q")
_HEAD = struct.Struct(f"<{LOOKUP_BASE}q")  # what read() sums: the words before the per-lookup ones
_F64 = struct.Struct("<d")
_SUMMED = (EVENTS, FAILED, CHUNKS, LOOKUP_CALLS, CACHE_HITS, COALESCED, LOOKUP_FAILURES,
           INFLIGHT, LAT_SUM_US, LAT_COUNT, DROPPED_DUP, DEADLETTERED, FILTERED, ENRICHED)
_pick_summed = itemgetter(*_SUMMED)
# what a replaced worker's slot hands to the supervisor's before it is reset: its counters,
# latency buckets and sink figures (not INFLIGHT: its chunks are redelivered, nor the
# last-commit latencies, which are gauges)
_CARRIED = tuple(
    [w for w in _SUMMED if w != INFLIGHT]
    + list(range(LAT_BUCKETS, LAT_BUCKETS + len(LATENCY_BOUNDS_MS)))
    + [SINK_BASE + k * len(SINK_FIELDS) + f for k in range(MAX_SINKS) for f in range(4)]
    + [LOOKUP_BASE + k * LOOKUP_WORDS + f for k in range(MAX_LOOKUPS) for f in range(LOOKUP_WORDS) if f != LOOKUP_STATE]
)

_CARRIED_HEAD = tuple(w for w in _CARRIED if w < LOOKUP_BASE)  # read() sums these; sources.metrics the rest

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


class SinkStats(msgspec.Struct, frozen=True):
    """Per-sink delivery figures, summed over workers.

    ``index`` is the sink's position in ``Pipeline.sinks``; the dead-letter sink comes
    after them, at ``len(Pipeline.sinks)`` (``collector.sinks.sink_names(pipeline)``
    gives the name of each index). ``rows`` and ``batches`` count chunks committed,
    ``errors`` failed write attempts, ``retries`` attempts scheduled again after a
    failure, ``last_commit_ms`` the latest commit's duration (the slowest worker's).
    Only sinks that wrote or failed at least once are listed; a replaced worker's
    figures are kept (in the supervisor's slot).
    """

    index: int
    rows: int
    batches: int
    errors: int
    retries: int
    last_commit_ms: float


class WorkerStats(msgspec.Struct, frozen=True):
    """One worker's figures as read from its slot."""

    index: int
    pid: int
    alive: bool
    heartbeat_age: float
    events: int
    failed: int
    chunks: int
    inflight: int
    processed_per_sec: float
    lookup_calls: int
    cache_hits: int
    coalesced: int
    lookup_failures: int
    avg_latency_ms: float


class Stats(msgspec.Struct, frozen=True):
    """Collector statistics, read from shared memory without waiting for any worker.

    ``total_events`` counts every event handled (valid or rejected) since start;
    ``processed_per_sec`` is the rate over the last ``RATE_WINDOW`` whole seconds and
    ``avg_per_sec`` the average since start.
    """

    total_events: int
    processed_per_sec: float
    avg_per_sec: float
    failed_events: int
    received_events: int
    inflight_events: int
    chunks: int
    redelivered_chunks: int
    worker_restarts: int
    duplicates_dropped: int
    deadlettered: int
    lookup_calls: int
    cache_hits: int
    coalesced_calls: int
    lookup_failures: int
    avg_latency_ms: float
    latency_buckets_ms: list[tuple[float, int]]
    uptime: float
    workers: list[WorkerStats]
    sinks: list[SinkStats]
    filtered_events: int = 0  # dropped on purpose by a filter or a rule
    enriched_events: int = 0  # through enrichment, less the lookups that finally failed


def sweep_stale_segments(shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink ``collector_<pid>_*`` segments whose creator is no longer running.

    Returns the names removed. A live pid keeps its segment even when it was reused by
    another program: a leak costs a few KiB, unlinking a live block would break a
    running collector.
    """
    import psutil

    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:  # no /dev/shm (not Linux): nothing to sweep
        return removed
    for n in names:
        parts = n.split("_")
        if len(parts) < 3 or parts[0] != "collector" or not parts[1].isdigit():
            continue
        if psutil.pid_exists(int(parts[1])):
            continue
        with contextlib.suppress(OSError):  # another collector swept it first
            os.unlink(os.path.join(shm_dir, n))
            removed.append(n)
    return removed


class StatsBlock:
    """The shared-memory block: ``workers`` worker slots plus one supervisor slot."""

    def __init__(
        self, workers: int, name: str | None = None, *, create: bool = True
    ) -> None:
        self.workers = workers
        size = SLOT_BYTES * (workers + 1)
        self._shm: shared_memory.SharedMemory | None = None
        self._mmap: mmap.mmap | None = None
        if create:
            sweep_stale_segments()
            # the creator's pid in the name: a leak (or a test's leak check) can tell
            # whose segment it is
            name = name or f"collector_{os.getpid()}_{secrets.token_hex(4)}"
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=size)
            buf = self._shm.buf
            assert buf is not None
            self.name = self._shm.name
        else:
            assert name is not None
            fd = os.open(f"/dev/shm/{name.lstrip('/')}", os.O_RDWR)
            try:
                self._mmap = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            buf = memoryview(self._mmap)
            self.name = name
        self._buf: memoryview = buf
        self.slots = [Slot(buf, i) for i in range(workers + 1)]
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

        Each slot is copied out with one ``unpack_from`` (a consistent-enough snapshot
        of aligned words), then only the words that are reported are summed.
        """
        now = time.monotonic()
        now_sec = int(now)
        window = int(RATE_WINDOW)
        buf = self._buf
        nb = len(LATENCY_BOUNDS_MS)
        nf = len(SINK_FIELDS)
        sink_end = SINK_BASE + MAX_SINKS * nf
        workers = []
        tot = [0] * LOOKUP_BASE
        summed = [0] * len(_SUMMED)
        buckets = [0] * nb
        recent = 0
        last_commit = [0] * MAX_SINKS
        oldest = now_sec - window
        uptime = now - self.started
        # whole seconds [now_sec - window, now_sec) plus the running second; shorter
        # right after start, so the first seconds are not diluted by time not yet lived
        span = min(window + (now - now_sec), uptime)
        for i in range(self.workers):
            q = _HEAD.unpack_from(buf, i * SLOT_BYTES)
            # element-wise sums in C (map over operator.add): this runs while workers
            # are saturated, and every microsecond here is one the GIL holder pays
            summed = list(map(add, summed, _pick_summed(q)))
            buckets = list(map(add, buckets, q[LAT_BUCKETS : LAT_BUCKETS + nb]))
            if any(q[SINK_BASE:sink_end]):  # some sink (not only the first) wrote or failed
                for w in range(SINK_BASE, sink_end):
                    tot[w] += q[w]
                for k in range(MAX_SINKS):
                    last_commit[k] = max(last_commit[k], q[SINK_BASE + k * nf + 4])
            ring = q[RATE_BASE : RATE_BASE + 2 * RATE_SLOTS]
            r = sum([c for st, c in zip(ring[0::2], ring[1::2], strict=True) if oldest <= st <= now_sec])
            recent += r
            (hb,) = _F64.unpack_from(buf, i * SLOT_BYTES + HEARTBEAT * 8)
            workers.append(
                WorkerStats(
                    index=i,
                    pid=q[PID],
                    alive=bool(alive[i]) if alive is not None else q[READY] == 1,
                    heartbeat_age=(now - hb) if hb else -1.0,
                    events=q[EVENTS],
                    failed=q[FAILED],
                    chunks=q[CHUNKS],
                    inflight=q[INFLIGHT],
                    processed_per_sec=r / span if span > 0.05 else 0.0,
                    lookup_calls=q[LOOKUP_CALLS],
                    cache_hits=q[CACHE_HITS],
                    coalesced=q[COALESCED],
                    lookup_failures=q[LOOKUP_FAILURES],
                    avg_latency_ms=(q[LAT_SUM_US] / q[LAT_COUNT] / 1000.0) if q[LAT_COUNT] else 0.0,
                )
            )
        for w, v in zip(_SUMMED, summed, strict=True):
            tot[w] = v
        sup = _HEAD.unpack_from(buf, self.workers * SLOT_BYTES)
        # the supervisor's slot holds what replaced workers counted (Slot.absorb) and
        # the events it rejected before any worker saw them: totals never go backwards
        for w in _CARRIED_HEAD:
            tot[w] += sup[w]
        buckets = list(map(add, buckets, sup[LAT_BUCKETS : LAT_BUCKETS + nb]))
        sinks = [
            SinkStats(
                index=k,
                rows=tot[SINK_BASE + k * nf],
                batches=tot[SINK_BASE + k * nf + 1],
                errors=tot[SINK_BASE + k * nf + 2],
                retries=tot[SINK_BASE + k * nf + 3],
                last_commit_ms=last_commit[k] / 1000.0,
            )
            for k in range(MAX_SINKS)
            if tot[SINK_BASE + k * nf + 1] or tot[SINK_BASE + k * nf + 2]
        ]
        return Stats(
            total_events=tot[EVENTS],
            processed_per_sec=recent / span if span > 0.05 else 0.0,
            avg_per_sec=tot[EVENTS] / uptime if uptime > 0 else 0.0,
            failed_events=tot[FAILED],
            received_events=sup[RECEIVED],
            inflight_events=max(sup[RECEIVED] - tot[EVENTS], 0),
            chunks=tot[CHUNKS],
            redelivered_chunks=sup[REDELIVERED],
            worker_restarts=sup[RESTARTS],
            duplicates_dropped=tot[DROPPED_DUP],
            deadlettered=tot[DEADLETTERED],
            filtered_events=tot[FILTERED],
            enriched_events=tot[ENRICHED],
            lookup_calls=tot[LOOKUP_CALLS],
            cache_hits=tot[CACHE_HITS],
            coalesced_calls=tot[COALESCED],
            lookup_failures=tot[LOOKUP_FAILURES],
            avg_latency_ms=(tot[LAT_SUM_US] / tot[LAT_COUNT] / 1000.0) if tot[LAT_COUNT] else 0.0,
            latency_buckets_ms=list(zip(LATENCY_BOUNDS_MS, buckets, strict=True)),
            uptime=uptime,
            workers=workers,
            sinks=sinks,
        )

    def raw(self, i: int) -> tuple[int, ...]:
        """Slot ``i``'s words copied out at once (one ``unpack_from``, no lock)."""
        return _SLOT.unpack_from(self._buf, i * SLOT_BYTES)

    def close(self) -> None:
        """Unmap the block; the creator also unlinks it (it is the one owner)."""
        for s in self.slots:
            s.release()
        self.slots = []
        self._buf.release()
        if self._shm is not None:
            self._shm.close()
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()
            self._shm = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> StatsBlock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
