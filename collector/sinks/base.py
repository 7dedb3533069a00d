"""The sink contract, the shared per-chunk encoding, and :class:`SinkSet` (fan-out + retry).

::

    worker ── commit(events) ──► SinkSet ──┬─► sink 0 .write(batch) ─ retry w/ backoff+jitter ─┐
                                           ├─► sink 1 .write(batch) ─ ...                       ├─► return
                                           └─► ...  (budget spent) ─► dead-letter sink ─────────┘
    worker ── reject(records) ─► dead-letter sink (or nothing)

A :class:`Batch` encodes the chunk to JSON once (``msgspec``, one ``encode_lines`` call)
and every sink reads the encoding it needs from it, so N sinks do not pay N encodes.
``commit`` returns only when every sink stored the chunk, or when a sink spent its
retry budget and the chunk went to the dead-letter sink; a store outage never raises
out of it (only ``CancelledError`` does), so the chunk stays unacknowledged and the
engine's in-flight bound turns the outage into backpressure.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import random
import re
import time
import typing
from collections.abc import Sequence
from operator import attrgetter
from typing import Any, ClassVar

import msgspec

from .. import stats as S
from .config import _PASSWORD_IN_URL, DeadLetterConfig, SinkConfig, redact_dsn

__all__ = ["Batch", "DeadLetter", "EventCodec", "GroupCommit", "Sink", "SinkSet"]

log = logging.getLogger("collector.sinks")


class DeadLetter(msgspec.Struct, frozen=True):
    """One record of the dead-letter sink (one JSON line).

    ``payload`` is the original event as JSON text (bytes are decoded as UTF-8),
    ``reason`` what went wrong, ``path`` the field path (``$`` for the whole event),
    ``stage`` where it failed (``validate``, ``sink:<name>``, ...), ``time`` Unix
    seconds. ``collector replay`` reads these lines back.
    """

    payload: str
    reason: str
    path: str = "$"
    stage: str = "validate"
    time: float = 0.0
    worker: int | None = None


def _scalar_kind(tp: Any) -> str | None:
    """'int' / 'float' / 'str' / 'bool' for simple (optionally nullable) annotations."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, type(int | None)) else (tp,)
    args = tuple(a for a in args if a is not type(None))
    if len(args) != 1:
        return None
    (a,) = args
    if typing.get_origin(a) is typing.Annotated:
        a = typing.get_args(a)[0]
    if typing.get_origin(a) is typing.Literal:
        lits = typing.get_args(a)
        a = type(lits[0]) if lits and all(type(x) is type(lits[0]) for x in lits) else None
    for t in (bool, int, float, str):  # bool before int: bool is an int subclass
        if a is t:
            return t.__name__
    return None


class EventCodec:
    """What sinks need to know about the event type, worked out once per worker.

    ``fields`` are the event's top-level fields as ``(attr name, JSON key, scalar
    kind or None)``. ``id_kind`` is ``"int"`` when the id field is an ``int``, else
    ``"text"``; without an id field the id is a content hash (BLAKE2b-128 of the
    event's JSON, hex), so rewriting the same event is still a no-op.
    """

    def __init__(self, event_type: type[msgspec.Struct] | None, id_field: str | None) -> None:
        self.event_type = event_type
        self.encoder = msgspec.json.Encoder()
        self.fields: list[tuple[str, str, str | None]] = []
        if event_type is not None:
            hints = typing.get_type_hints(event_type, include_extras=True)
            for f in msgspec.structs.fields(event_type):
                self.fields.append((f.name, f.encode_name, _scalar_kind(hints.get(f.name, f.type))))
        names = {f[0] for f in self.fields}
        if id_field is not None and event_type is not None and id_field not in names:
            from ..errors import ConfigError

            raise ConfigError(f"sinks: id field {id_field!r} is not a field of {event_type.__name__}")
        self.id_field = id_field
        kinds = {f[0]: f[2] for f in self.fields}
        self.id_kind = "int" if id_field is not None and kinds.get(id_field) == "int" else "text"
        self.id_get = attrgetter(id_field) if id_field is not None else None

    def has(self, attr: str) -> bool:
        """Whether the event type has a top-level field named ``attr``."""
        return any(f[0] == attr for f in self.fields)


class Batch:
    """One chunk of events and its encodings, each computed at most once.

    ``ndjson`` is every event as one JSON line (``b"...\\n"`` each), ``texts`` the same
    lines as ``str`` without newlines, ``ids`` each event's id (see
    :class:`EventCodec`).
    """

    __slots__ = ("_ids", "_ndjson", "_texts", "codec", "events")

    def __init__(self, events: Sequence[Any], codec: EventCodec) -> None:
        self.events = events
        self.codec = codec
        self._ndjson: bytes | None = None
        self._texts: list[str] | None = None
        self._ids: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.events)

    @property
    def ndjson(self) -> bytes:
        """All events as JSON lines, newline-terminated."""
        if self._ndjson is None:
            self._ndjson = self.codec.encoder.encode_lines(self.events)
        return self._ndjson

    @property
    def texts(self) -> list[str]:
        """Each event's JSON as ``str``."""
        if self._texts is None:
            # one decode and one split for the chunk beats a decode per event;
            # JSON escapes newlines inside strings, so every b"\n" ends an event
            self._texts = self.ndjson.decode().split("\n")
            self._texts.pop()
        return self._texts

    @property
    def ids(self) -> list[Any]:
        """Each event's id: the id field (``int`` or ``str``) or a content hash."""
        if self._ids is None:
            get = self.codec.id_get
            if get is None:
                b2 = hashlib.blake2b
                self._ids = [b2(t.encode(), digest_size=16).hexdigest() for t in self.texts]
            else:
                ids = list(map(get, self.events))
                if self.codec.id_kind == "int":
                    self._ids = ids
                else:
                    self._ids = [i if type(i) is str else str(i) for i in ids]
            return self._ids
        return self._ids


class Sink:
    """A destination for event chunks. Subclasses implement :meth:`write`.

    ``write`` stores one chunk in one attempt and raises on failure; the
    :class:`SinkSet` owns retries, backoff, timeouts, metrics and dead-lettering. It
    may return dead-letter records for events the store can never accept (the MySQL
    sink does for values its schema cannot hold); the rest of the chunk is stored.
    ``write`` may be called concurrently for different chunks.
    """

    kind: ClassVar[str] = "sink"

    def __init__(self, config: Any, *, name: str, codec: EventCodec, worker: int) -> None:
        self.config = config
        self.name = name
        self.codec = codec
        self.worker = worker
        self.healthy = True
        self._secrets: list[str] = []

    async def open(self) -> None:
        """Acquire resources. A store that is down is not an error here: writes retry."""

    async def write(self, batch: Batch) -> list[DeadLetter] | None:
        """Store ``batch`` durably (one attempt)."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Write out anything buffered."""

    async def close(self) -> None:
        """Release resources; after ``flush``."""

    async def health(self) -> bool:
        """Whether the last write (or a cheap probe) succeeded."""
        return self.healthy

    def is_data_error(self, e: BaseException) -> bool:
        """Whether ``e`` says the store refuses the data itself (retrying cannot help).

        The :class:`SinkSet` then halves the chunk until the refused events stand
        alone and dead-letters only those. Default: no error is.
        """
        return False

    async def migrate(self) -> list[str]:
        """Create or upgrade the store's tables; the steps applied (SQL sinks)."""
        return []

    def describe_error(self, e: BaseException) -> str:
        """``e`` as text safe to log: known secrets and URL passwords are redacted."""
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        for s in self._secrets:
            if s:
                text = text.replace(s, "***")
        return _PASSWORD_IN_URL.sub(r"\1***@", text)

    def remember_secret(self, dsn: str) -> None:
        """Note the password inside ``dsn`` so that error texts never show it."""
        redacted = redact_dsn(dsn)
        if redacted != dsn:
            m = re.match(r"[^:]+://[^:/@]*:([^@]*)@", dsn)
            if m:
                self._secrets.append(m.group(1))
            for pw in re.findall(r"(?i)password=([^&]*)", dsn):
                self._secrets.append(pw)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.config!r}>"


class GroupCommit:
    """Group commit: chunks submitted while transactions run share the next one.

    ``commit(rows)`` stores a list of rows in one transaction (one attempt; raises on
    failure). ``await submit(rows)`` returns once a transaction holding ``rows``
    committed. Up to ``concurrency`` transactions run at once (a pool's connections);
    chunks that arrive while all of them are busy are merged into the next one, up to
    ``max_rows`` rows. When a merged transaction fails with a data error
    (``is_data_error``), every chunk of it is retried in its own transaction, so only
    the chunk holding the refused row fails (the :class:`SinkSet` then isolates the
    row); any other error fails every chunk of it, and each retries on its own.
    """

    def __init__(self, commit: Any, is_data_error: Any, max_rows: int, concurrency: int = 1) -> None:
        self._commit = commit
        self._is_data_error = is_data_error
        self.max_rows = max_rows
        self.concurrency = concurrency
        self._pending: collections.deque[tuple[list[Any], asyncio.Future[None]]] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, rows: list[Any]) -> None:
        """Commit ``rows`` (with whatever else is queued meanwhile)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((rows, fut))
        if len(self._tasks) < self.concurrency:
            t = loop.create_task(self._rounds())
            self._tasks.add(t)
        # shield: an attempt that times out must not cancel a round other chunks share
        await asyncio.shield(fut)

    async def _rounds(self) -> None:
        pending = self._pending
        try:
            while pending:
                items = [pending.popleft()]
                n = len(items[0][0])
                while pending and n + len(pending[0][0]) <= self.max_rows:
                    items.append(pending.popleft())
                    n += len(items[-1][0])
                merged = items[0][0] if len(items) == 1 else [r for rows, _ in items for r in rows]
                try:
                    await self._commit(merged)
                except asyncio.CancelledError:
                    for _, f in items:
                        f.cancel()
                    raise
                except Exception as e:
                    if len(items) > 1 and self._is_data_error(e):
                        for rows, f in items:
                            try:
                                await self._commit(rows)
                            except Exception as e1:
                                _fail(f, e1)
                            else:
                                _done(f)
                    else:
                        for _, f in items:
                            _fail(f, e)
                else:
                    for _, f in items:
                        _done(f)
        except asyncio.CancelledError:
            while pending:  # the sink is closing: no round will run these
                pending.popleft()[1].cancel()
            raise
        finally:
            # leave the running set in the same step as the last look at `pending`: as a
            # done callback this ran a loop turn later, and a chunk submitted in between
            # saw the task still counted, started none and waited for the next submit
            # (or its timeout, after which its rows were dead-lettered and stored too)
            self._tasks.discard(asyncio.current_task())

    async def drain(self) -> None:
        """Wait for the transactions in progress."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _done(f: asyncio.Future[None]) -> None:
    if not f.done():
        f.set_result(None)


def _fail(f: asyncio.Future[None], e: BaseException) -> None:
    if not f.done():
        f.set_exception(e)
        # a caller whose attempt timed out no longer awaits it: mark it retrieved
        f.add_done_callback(lambda f: f.exception())


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

    async def commit(self, events: Sequence[Any]) -> bool:
        """Store ``events`` in every sink; return when all hold them (or dead-lettered).

        Never raises for a store failure: a failing sink retries with exponential
        backoff and jitter until it succeeds or its retry budget is spent (then the
        chunk goes to the dead-letter sink and is counted). Only cancellation escapes.
        True when every sink holds every event; False when a sink failed or refused
        some and they went to the dead-letter sink instead: the caller must not
        remember those as stored (dedup), or a client's retry would be dropped.
        """
        sinks = self.sinks
        if not sinks or not events:
            return True
        batch = Batch(events, self.codec)
        dead = [0]  # events of this commit a sink did not store
        if len(sinks) == 1:
            await self._deliver(0, sinks[0], batch, dead)
        else:
            await asyncio.gather(*(self._deliver(i, s, batch, dead) for i, s in enumerate(sinks)))
        return dead[0] == 0

    async def _deliver(self, index: int, sink: Sink, batch: Batch, dead: list[int]) -> None:
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
                    await self._isolate(index, sink, batch, why, dead)
                    return
                sink.healthy = False
                if self.deadletter is not None and 0 <= cfg.retries < attempt:
                    log.error(
                        "sink %s: chunk of %d events failed %d times (last: %s); sending it to the dead-letter sink",
                        sink.name, len(batch), attempt, why,
                    )
                    await self._deadletter_chunk(sink, batch, f"sink {sink.name} failed {attempt} times; last error: {why}", dead)
                    return
                delay = min(cfg.backoff_max, cfg.backoff * 2.0 ** min(attempt - 1, 30))
                # equal jitter: never hammer a recovering store in lockstep with the
                # other workers, never retry much sooner than the backoff says
                delay = delay / 2 + random.random() * delay / 2
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
                dead[0] += len(rejected)
                await self._to_deadletter(rejected, count=True)
            return

    async def _isolate(self, index: int, sink: Sink, batch: Batch, why: str, dead: list[int]) -> None:
        if len(batch) == 1:
            log.error("sink %s: the store refuses an event (%s); sending it to the dead-letter sink", sink.name, why)
            await self._deadletter_chunk(sink, batch, f"sink {sink.name} refused this event: {why}", dead)
            return
        mid = len(batch) // 2
        for part in (batch.events[:mid], batch.events[mid:]):
            await self._deliver(index, sink, Batch(part, self.codec), dead)

    async def _deadletter_chunk(self, sink: Sink, batch: Batch, reason: str, dead: list[int]) -> None:
        dead[0] += len(batch)
        now = time.time()
        stage = f"sink:{sink.name}"
        w = self.worker
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
                delay = min(5.0, 0.05 * 2.0 ** min(attempt - 1, 30))
                delay = delay / 2 + random.random() * delay / 2
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


def default_name(cfg: SinkConfig | DeadLetterConfig, index: int) -> str:
    """``cfg.name`` or ``<kind>[<index>]``."""
    name = getattr(cfg, "name", None)
    if name:
        return str(name)
    kind = getattr(cfg, "kind", "deadletter")
    return f"{kind}[{index}]"
