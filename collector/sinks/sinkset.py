"""SinkSet: every sink of one worker, written concurrently, plus the dead-letter sink.

::

    worker ── commit(events) ──► SinkSet ──┬─► sink 0 .write(batch) ─ retry w/ backoff+jitter ─┐
                                           ├─► sink 1 .write(batch) ─ ...                       ├─► return
                                           ├─► data error: halve the batch until the refused   │
                                           │   events stand alone ─► dead-letter sink           │
                                           └─► ...  (budget spent) ─► dead-letter sink ─────────┘
    worker ── reject(records) ─► dead-letter sink (or nothing)

``commit`` returns only when every sink stored the chunk, or when a sink spent its
retry budget and the chunk went to the dead-letter sink; a store outage never raises
out of it (only ``CancelledError`` does), so the chunk stays unacknowledged and the
engine's in-flight bound turns the outage into backpressure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from .. import stats as S
from ..retry import Backoff
from .base import Batch, DeadLetter, EventCodec, Sink
from .routing import compile_when

__all__ = ["GAVE_UP", "REFUSED", "SinkSet"]

log = logging.getLogger("collector.sinks")
# the dead-letter sink is the last resort and retries for ever, never longer than 5 s apart
_DEADLETTER_BACKOFF = Backoff(0.05, 5.0, retries=-1, jitter="equal")

REFUSED = "refused this event"
"""How a dead-letter reason starts when the store refused the event's data (a NUL
character in PostgreSQL's JSONB, a value over a column limit): sent again unchanged,
the event would be refused again."""
GAVE_UP = "gave up"
"""How a dead-letter reason starts when the sink spent its retry budget on the chunk
(a store down, a full disk): the event itself may be fine; sent again later, it is stored."""


class _NullSlot:
    """Stands in for a stats slot when the caller has none."""

    def sink_add(self, sink: int, **kw: Any) -> None:
        pass

    def add(self, word: int, n: int = 1) -> None:
        pass


class SinkSet:
    """Every sink of one worker, written concurrently, plus the dead-letter sink."""

    def __init__(
        self,
        sinks: Sequence[Sink],
        deadletter: Any | None,
        codec: EventCodec,
        slot: Any | None,
        worker: int,
    ) -> None:
        self.sinks = list(sinks)
        self.deadletter = deadletter  # a DeadLetterSink or None
        self.codec = codec
        self.slot = slot if slot is not None else _NullSlot()
        self.worker = worker
        self.deadlettered = 0  # events this sinkset sent to the dead-letter sink
        self._dl_index = len(self.sinks)  # metrics of the dead-letter sink go after the sinks
        # routing: unrouted events go to the sinks with ``default`` (every sink unless set
        # false) whose ``when`` selects them (no ``when``: all of them)
        self._defaults = [getattr(s.config, "default", True) for s in self.sinks]
        self._when = [
            None if getattr(s.config, "when", None) is None else compile_when(s.config.when, f"sinks[{i}].when")
            for i, s in enumerate(self.sinks)
        ]
        self._all_default = all(self._defaults) and not any(self._when)
        self._opened = False

    def __bool__(self) -> bool:
        return bool(self.sinks) or self.deadletter is not None

    async def open(self) -> None:
        """Open every sink (concurrently)."""
        parts: list[Sink] = [*self.sinks]
        if self.deadletter is not None:
            parts.append(self.deadletter)
        if parts:
            await asyncio.gather(*(s.open() for s in parts))
        self._opened = True

    async def commit(
        self, events: Sequence[Any], routes: Sequence[frozenset[str] | None] | None = None
    ) -> list[tuple[int, str, str]]:
        """Store ``events`` in every sink; return when all hold them (or dead-lettered).

        ``routes[i]`` (when given) names the sinks event ``i`` goes to, or is None: the
        event goes to every sink with ``default`` (true unless configured), as every
        event does without ``routes``. Every route of the chunk is written before this
        returns; dead positions are positions of ``events`` whatever sinks took them.

        Never raises for a store failure: a failing sink retries with exponential
        backoff and jitter until it succeeds or its retry budget is spent (then the
        chunk goes to the dead-letter sink and is counted). Only cancellation escapes.
        Returns what a sink did not store: ``(position in events, sink name, reason)``
        for each event a sink refused or gave up on (it went to the dead-letter sink
        instead; one entry per sink, so an event two sinks refused appears twice).
        Empty when every sink holds every event. The caller must not remember those
        events as stored (dedup), or a client's retry would be dropped; ``reason``
        starts with :data:`REFUSED` when the store refused the event's data (the
        same event would be refused again) and with :data:`GAVE_UP` when the sink
        spent its retry budget on the chunk (a store outage, a full disk).
        """
        sinks = self.sinks
        if not sinks or not events:
            return []
        if routes is not None or not self._all_default:
            return await self._commit_routed(events, routes)
        batch = Batch(events, self.codec)
        dead: list[tuple[int, str, str]] = []  # events of this commit a sink did not store
        if len(sinks) == 1:
            await self._deliver(0, sinks[0], batch, 0, dead)
        else:
            await asyncio.gather(*(self._deliver(i, s, batch, 0, dead) for i, s in enumerate(sinks)))
        if len(dead) > 1:
            dead.sort()
        return dead

    async def _commit_routed(
        self, events: Sequence[Any], routes: Sequence[frozenset[str] | None] | None
    ) -> list[tuple[int, str, str]]:
        """Each sink writes the events routed to it (a sub-batch), all concurrently; an
        event no sink takes is dead-lettered (reason: no sink takes it)."""
        n = len(events)
        picks: list[list[int] | None] = []  # per sink: the positions it takes (None: all)
        for i, s in enumerate(self.sinks):
            name, dflt, when = s.name, self._defaults[i], self._when[i]
            pos: list[int] | None
            takes = dflt  # whether it takes unrouted events (those its `when` selects)
            sel: list[bool] | None = when(events) if dflt and when is not None else None
            if routes is None:
                if not takes:
                    pos = []
                elif sel is None:
                    pos = None
                else:
                    pos = [p for p, ok in enumerate(sel) if ok]
            else:
                pos = [p for p, r in enumerate(routes)
                       if (name in r if r is not None else takes and (sel is None or sel[p]))]
            picks.append(None if pos is not None and len(pos) == n else pos)
        dead: list[tuple[int, str, str]] = []
        if all(p is not None for p in picks):
            taken = bytearray(n)
            for p in picks:
                for q in p or ():
                    taken[q] = 1
            if not all(taken):
                await self._untaken([q for q in range(n) if not taken[q]], events, dead)
        full: Batch | None = None
        jobs = []
        for i, s in enumerate(self.sinks):
            pos = picks[i]
            if pos is None:  # every event: the chunk's shared batch (one encoding)
                if full is None:
                    full = Batch(events, self.codec)
                jobs.append(self._deliver(i, s, full, 0, dead))
            elif pos:
                jobs.append(self._deliver_some(i, s, [events[p] for p in pos], pos, dead))
        if len(jobs) == 1:
            await jobs[0]
        elif jobs:
            await asyncio.gather(*jobs)
        if len(dead) > 1:
            dead.sort()
        return dead

    async def _untaken(self, pos: list[int], events: Sequence[Any], dead: list[tuple[int, str, str]]) -> None:
        """Events no sink takes (no route, no default sink selects them): dead-lettered."""
        why = f"{REFUSED}: no sink takes it (no route rule names a sink for it, and no sink with default = true selects it)"
        batch = Batch([events[p] for p in pos], self.codec)
        now = time.time()
        dead.extend((p, "routing", why) for p in pos)
        await self._to_deadletter(
            [DeadLetter(t, f"sink routing: {why}", "$", "routing", now, self.worker) for t in batch.texts], count=True
        )

    async def _deliver_some(
        self, index: int, sink: Sink, events: list[Any], pos: list[int], dead: list[tuple[int, str, str]]
    ) -> None:
        """``sink`` writes a part of the chunk; its dead entries are mapped back to chunk positions."""
        mine: list[tuple[int, str, str]] = []
        await self._deliver(index, sink, Batch(events, self.codec), 0, mine)
        dead.extend((pos[p], name, why) for p, name, why in mine)

    async def _deliver(self, index: int, sink: Sink, batch: Batch, at: int, dead: list[tuple[int, str, str]]) -> None:
        """One sink writes ``batch``, which starts at position ``at`` of the commit."""
        cfg = sink.config
        slot = self.slot
        attempt = 0
        while True:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(cfg.timeout):
                    rejected = await sink.write(batch)
            except Exception as e:  # every store failure is retried; CancelledError is not an Exception
                attempt += 1
                slot.sink_add(index, errors=1)
                why = sink.describe_error(e)
                if sink.is_data_error(e) and (len(batch) > 1 or self.deadletter is not None):
                    # the store refuses something in this chunk's data: the same rows would
                    # fail every retry and take the whole chunk to the dead-letter sink (or,
                    # without one, block it for ever). Halve it until the refused events
                    # stand alone; they go to the dead-letter sink, the rest is stored.
                    await self._isolate(index, sink, batch, at, why, dead)
                    return
                sink.healthy = False
                if self.deadletter is not None and 0 <= cfg.retries < attempt:
                    log.error(
                        "sink %s: chunk of %d events failed %d times (last: %s); sending it to the dead-letter sink",
                        sink.name, len(batch), attempt, why,
                    )
                    await self._deadletter_chunk(sink, batch, at, f"{GAVE_UP}: failed {attempt} times; last error: {why}", dead)
                    return
                delay = Backoff(cfg.backoff, cfg.backoff_max, jitter="equal").delay(attempt - 1)
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "sink %s: write of %d events failed (attempt %d): %s; retrying in %.2fs",
                        sink.name, len(batch), attempt, why, delay,
                    )
                slot.sink_add(index, retries=1)
                await asyncio.sleep(delay)
                continue
            if attempt:
                log.info("sink %s: write succeeded after %d failed attempts", sink.name, attempt)
            sink.healthy = True
            slot.sink_add(index, rows=len(batch), batches=1, latency_s=time.perf_counter() - t0)
            if rejected:
                # a sink that checks rows itself (MySQL) returns the refused ones: find
                # their positions by their text, the very strings of ``batch.texts``
                texts = batch.texts
                where = {id(t): i for i, t in enumerate(texts)}
                for r in rejected:
                    i = where.get(id(r.payload))
                    if i is None:
                        i = texts.index(r.payload) if r.payload in texts else 0
                    dead.append((at + i, sink.name, f"{REFUSED}: {r.path}: {r.reason}"))
                await self._to_deadletter(rejected, count=True)
            return

    async def _isolate(
        self, index: int, sink: Sink, batch: Batch, at: int, why: str, dead: list[tuple[int, str, str]]
    ) -> None:
        if len(batch) == 1:
            log.error("sink %s: the store refuses an event (%s); sending it to the dead-letter sink", sink.name, why)
            await self._deadletter_chunk(sink, batch, at, f"{REFUSED}: {why}", dead)
            return
        mid = len(batch) // 2
        await self._deliver(index, sink, Batch(batch.events[:mid], self.codec), at, dead)
        await self._deliver(index, sink, Batch(batch.events[mid:], self.codec), at + mid, dead)

    async def _deadletter_chunk(
        self, sink: Sink, batch: Batch, at: int, why: str, dead: list[tuple[int, str, str]]
    ) -> None:
        name = sink.name
        dead.extend((at + i, name, why) for i in range(len(batch)))
        now = time.time()
        stage = f"sink:{name}"
        w = self.worker
        reason = f"sink {name}: {why}"
        await self._to_deadletter(
            [DeadLetter(t, reason, "$", stage, now, w) for t in batch.texts], count=True
        )

    async def _to_deadletter(self, records: list[DeadLetter], count: bool) -> None:
        dl = self.deadletter
        if dl is None:
            # without a dead-letter sink nothing may be dropped silently: say so loudly
            log.error("no dead-letter sink configured; %d records dropped: %s", len(records), records[0].reason)
            return
        attempt = 0
        idx = self._dl_index
        while True:
            t0 = time.perf_counter()
            try:
                await dl.write_records(records)
            except Exception as e:
                # the dead-letter sink is the last resort: it retries for ever, so the
                # chunk stays unacknowledged rather than lost
                attempt += 1
                self.slot.sink_add(idx, errors=1, retries=1)
                delay = _DEADLETTER_BACKOFF.delay(attempt - 1)
                if attempt == 1 or attempt % 10 == 0:
                    log.error("dead-letter sink: write failed (attempt %d): %s", attempt, dl.describe_error(e))
                await asyncio.sleep(delay)
                continue
            self.slot.sink_add(idx, rows=len(records), batches=1, latency_s=time.perf_counter() - t0)
            if count:
                self.deadlettered += len(records)
                self.slot.add(S.DEADLETTERED, len(records))
            return

    async def reject(self, records: Sequence[DeadLetter]) -> None:
        """Write invalid events to the dead-letter sink (no-op without one).

        The caller counts them (the worker adds them to its ``deadlettered`` stat).
        """
        if self.deadletter is None or not records:
            return
        fixed = [
            r if type(r.payload) is str and r.worker is not None
            else msgspec.structs.replace(
                r,
                payload=r.payload if isinstance(r.payload, str) else bytes(r.payload).decode("utf-8", "replace"),
                worker=self.worker if r.worker is None else r.worker,
            )
            for r in records
        ]
        await self._to_deadletter(fixed, count=False)

    async def flush(self) -> None:
        """Flush every sink (buffered writes reach their store)."""
        parts: list[Any] = [*self.sinks]
        if self.deadletter is not None:
            parts.append(self.deadletter)
        for s in parts:
            try:
                await s.flush()
            except Exception as e:
                log.error("sink %s: flush failed: %s", s.name, s.describe_error(e))

    async def close(self) -> None:
        """Flush, then close every sink; errors are logged, not raised."""
        await self.flush()
        parts: list[Any] = [*self.sinks]
        if self.deadletter is not None:
            parts.append(self.deadletter)
        for s in parts:
            try:
                await s.close()
            except Exception as e:
                log.error("sink %s: close failed: %s", s.name, s.describe_error(e))

    async def health(self) -> dict[str, bool]:
        """Each sink's name → whether it is writing (probes run concurrently, bounded)."""
        parts: list[Any] = [*self.sinks]
        if self.deadletter is not None:
            parts.append(self.deadletter)

        async def probe(s: Any) -> bool:
            try:
                async with asyncio.timeout(2.0):
                    return bool(await s.health())
            except Exception:
                return False

        results = await asyncio.gather(*(probe(s) for s in parts))
        return {s.name: ok for s, ok in zip(parts, results, strict=True)}
