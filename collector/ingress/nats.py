"""A NATS JetStream pull consumer feeding a running :class:`~collector.Collector`.

::

    stream (subjects) ─► durable pull consumer ─► fetch(batch) ──┐  at most `max_batches` batches in flight
                                                                  ▼
       per message: delivered > max_deliver? ─► term + dead-letter (poison)
                    split into events (one JSON object, or NDJSON), read each shard key;
                    malformed / not an object ─► dead-letter (subject, stream sequence)
                                                                  ▼
       collector.ahandle(events, keys=...) ─► operation ─► sinks committed ─► result
          (in_progress every ack_wait/3 while it runs)                      │
                                                                            ▼
       per message: every event stored, invalid (the worker dead-lettered it), filtered or a duplicate ─► ack
                    an event lost or failed in pipeline code, the engine closed or overloaded,
                    or no result within work_timeout (if set) ─► nak(delay) ─► redelivered later
                         └─ already the max_deliver-th delivery ─► term + dead-letter (poison)

A message is acknowledged only after the operation holding its events completed,
which happens only after every sink committed them (DESIGN principle 5): a crash at
any point leaves it unacknowledged, and JetStream delivers it again after
``ack_wait``. Delivery is therefore at least once; redeliveries are counted
(``redelivered``) and the sinks are idempotent on the event id where the store allows
it. Several collectors on one durable consumer share the stream's messages (DESIGN
principle 10).

Backpressure: at most ``max_batches`` fetched batches are unsettled at once, the
consumer's ``max_ack_pending`` bounds what the server hands out, and
``Collector.ahandle`` awaits while the engine's ``max_inflight`` is reached.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from ..config import NatsIngressConfig
from ..errors import CollectorError, Overloaded
from ..sinks.base import DeadLetter
from ..sinks.nats import connection_callbacks, nats_module

if TYPE_CHECKING:
    from ..engine import Collector

__all__ = ["IngressStats", "NatsDeadLetter", "NatsIngress", "NatsIngressConfig", "run_ingress"]

log = logging.getLogger("collector.ingress")

FAILED_KINDS = frozenset({"lost", "error"})  # result kinds after which a message is delivered again


class IngressStats(msgspec.Struct):
    """The ingress's counters (messages unless said otherwise)."""

    fetched: int = 0
    events: int = 0  # events handed to the engine
    acked: int = 0
    nakked: int = 0
    redelivered: int = 0  # fetched with a delivery count above 1
    terminated: int = 0  # poison: delivered max_deliver times, dead-lettered
    deadlettered: int = 0  # events: invalid here or in a worker, or in a poison message
    fetch_errors: int = 0
    batches_inflight: int = 0
    num_pending: int = 0  # consumer lag: stream messages not yet delivered to the consumer
    num_ack_pending: int = 0  # delivered, not yet acknowledged (all collectors on the consumer)


class NatsDeadLetter(DeadLetter, frozen=True):
    """A dead-letter record with the message's origin; ``collector replay`` reads it as a DeadLetter."""

    subject: str = ""
    stream: str = ""
    sequence: int = 0
    deliveries: int = 0
    index: int = 0  # the event's line in its message


async def _acquire(room: asyncio.Semaphore, stop: asyncio.Event) -> bool:
    """Take a slot of ``room``; False (and no slot) once ``stop`` is set.

    With every slot held by batches whose sinks are down, a plain ``acquire`` would
    keep ``stop()`` waiting for ever.
    """
    if not room.locked():
        await room.acquire()
    else:
        acq = asyncio.ensure_future(room.acquire())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({acq, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not acq.done():
            acq.cancel()
            return False
    if stop.is_set():
        room.release()
        return False
    return True


def _lines(data: bytes) -> list[bytes]:
    """The non-blank lines of a stripped message: one JSON event, or NDJSON."""
    return [data] if b"\n" not in data else [ln for ln in data.split(b"\n") if ln.strip()]


class _Span:
    __slots__ = ("lo", "md", "msg")

    def __init__(self, msg: Any, md: Any, lo: int) -> None:
        self.msg = msg
        self.md = md
        self.lo = lo


class NatsIngress:
    """Pull events from a JetStream durable consumer into ``collector`` (see the module docstring).

    ``await run()`` connects, creates the stream and consumer if missing, and consumes
    until ``stop()``; then it settles what is in flight (up to ``drain_timeout``) and
    closes. ``stats()`` returns the counters. The collector must be running.
    """

    def __init__(
        self,
        collector: Collector,
        url: str = "nats://127.0.0.1:4222",
        stream: str = "EVENTS",
        subjects: list[str] | tuple[str, ...] = ("events.>",),
        durable: str = "collector",
        batch: int = 256,
        **options: Any,
    ) -> None:
        self.cfg = msgspec.convert(
            dict(url=url, stream=stream, subjects=list(subjects), durable=durable, batch=batch, **options),
            NatsIngressConfig,
        )
        self._setup(collector)

    @classmethod
    def from_config(cls, collector: Collector, cfg: NatsIngressConfig) -> NatsIngress:
        """An ingress for a decoded config (the daemon's ``[source]`` table)."""
        self = cls.__new__(cls)
        self.cfg = cfg
        self._setup(collector)
        return self

    def _setup(self, collector: Collector) -> None:
        self.nats = nats_module()
        self.collector = collector
        p = collector.pipeline
        self.key = p.key
        self.keyed = p.shard != "chunk"
        T = msgspec.defstruct("NatsKey_" + p.key, [(p.key, Any, None)])
        self._dec_key = msgspec.json.Decoder(T)
        self._enc = msgspec.json.Encoder()
        self._stats = IngressStats()
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()
        self.nc: Any = None
        self.js: Any = None
        self._dl_file: Any = None
        self._dl_path = self._deadletter_path()
        self._stopped_early = False
        self.task: asyncio.Task[None] | None = None  # set by run_ingress

    def _deadletter_path(self) -> str | None:
        if self.cfg.deadletter:
            return self.cfg.deadletter
        dl = self.collector.pipeline.deadletter
        path = dl.get("path") if isinstance(dl, dict) else getattr(dl, "path", None)
        return str(path).replace("{worker}", "nats") if path else None

    # ------------------------------------------------------------------ public
    def stats(self) -> IngressStats:
        """A copy of the counters."""
        return msgspec.structs.replace(self._stats)

    def stats_dict(self) -> dict[str, int]:
        """The counters as a dict (for ``/metrics``)."""
        return msgspec.structs.asdict(self._stats)

    def stop(self) -> None:
        """Ask ``run()`` to stop fetching, settle what is in flight and return."""
        if self._stop is not None:
            self._stop.set()
        else:  # run() has not started: it returns at once
            self._stopped_early = True

    async def run(self) -> None:
        """Consume until :meth:`stop` (see the class docstring)."""
        cfg = self.cfg
        self._stop = asyncio.Event()
        if self._stopped_early:
            return
        # nats-py retries the first connect for ever too: bound it (a wrong URL is an
        # error at start) and let stop() end it; once connected, outages are retried
        connect = asyncio.ensure_future(
            self.nats.connect(
                servers=cfg.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.5, allow_reconnect=True,
                **connection_callbacks("ingress"),
            )
        )
        stopped = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({connect, stopped}, timeout=cfg.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not connect.done():
            connect.cancel()
            await asyncio.wait({connect}, timeout=1)
            if self._stop.is_set():
                return
            raise CollectorError(f"NATS not reachable at {cfg.url} within {cfg.connect_timeout}s")
        self.nc = connect.result()
        try:
            self.js = self.nc.jetstream()
            await self._ensure()
            # one subscription per fetcher: a fetch is a request and its replies share
            # the subscription's inbox, so concurrent fetches need their own
            subs = [
                await self.js.pull_subscribe_bind(durable=cfg.durable, stream=cfg.stream)
                for _ in range(cfg.fetchers)
            ]
            self.ready.set()
            lag = asyncio.create_task(self._watch_lag())
            room = asyncio.Semaphore(cfg.max_batches)
            try:
                await asyncio.gather(*(self._consume(sub, room) for sub in subs))
            finally:
                lag.cancel()
                await self._drain()
                for sub in subs:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
        finally:
            with contextlib.suppress(Exception):
                await self.nc.drain()
            if self._dl_file is not None:
                self._dl_file.close()
                self._dl_file = None

    # ------------------------------------------------------------------ setup
    async def _ensure(self) -> None:
        """Create the stream and the durable consumer if missing (else use them as they are)."""
        api = self.nats.js.api
        cfg = self.cfg
        jsm = self.js
        try:
            await jsm.stream_info(cfg.stream)
        except self.nats.js.errors.NotFoundError:
            if not cfg.create:
                raise CollectorError(f"NATS stream {cfg.stream!r} does not exist (create = false)") from None
            await jsm.add_stream(
                api.StreamConfig(
                    name=cfg.stream,
                    subjects=list(cfg.subjects),
                    retention=api.RetentionPolicy(cfg.retention),
                    max_age=cfg.max_age or None,
                    duplicate_window=cfg.duplicate_window,
                    storage=api.StorageType.FILE,
                )
            )
            log.info("created NATS stream %s on %s", cfg.stream, cfg.subjects)
        try:
            await jsm.consumer_info(cfg.stream, cfg.durable)
        except self.nats.js.errors.NotFoundError:
            if not cfg.create:
                raise CollectorError(f"NATS consumer {cfg.durable!r} on {cfg.stream!r} does not exist") from None
            await jsm.add_consumer(
                cfg.stream,
                api.ConsumerConfig(
                    durable_name=cfg.durable,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_wait=cfg.ack_wait,
                    # one delivery more than ours: the ingress terminates and dead-letters a
                    # message on its max_deliver-th failure, or on any later delivery
                    max_deliver=cfg.max_deliver + 1,
                    max_ack_pending=cfg.max_ack_pending,
                    filter_subjects=list(cfg.subjects) if len(cfg.subjects) > 1 else None,
                    filter_subject=cfg.subjects[0] if len(cfg.subjects) == 1 else None,
                ),
            )
            log.info("created NATS durable consumer %s on stream %s", cfg.durable, cfg.stream)

    async def _watch_lag(self) -> None:
        cfg = self.cfg
        while True:
            try:
                info = await self.js.consumer_info(cfg.stream, cfg.durable)
                self._stats.num_pending = int(info.num_pending or 0)
                self._stats.num_ack_pending = int(info.num_ack_pending or 0)
            except Exception as e:
                log.debug("consumer info failed: %s", e)
            await asyncio.sleep(cfg.lag_interval)

    # ------------------------------------------------------------------ the loop
    async def _consume(self, sub: Any, room: asyncio.Semaphore) -> None:
        cfg = self.cfg
        stop = self._stop
        assert stop is not None
        failures = 0
        while not stop.is_set():
            if not await _acquire(room, stop):
                break
            try:
                msgs = await sub.fetch(cfg.batch, timeout=cfg.fetch_timeout)
            except TimeoutError:  # no message within fetch_timeout (nats-py's is a TimeoutError too)
                room.release()
                continue
            except Exception as e:  # disconnected, server restarting: nats-py reconnects
                room.release()
                self._stats.fetch_errors += 1
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning("NATS fetch failed (%d in a row): %s: %s", failures, type(e).__name__, e)
                await asyncio.sleep(min(5.0, 0.1 * failures))
                continue
            failures = 0
            self._stats.batches_inflight += 1
            t = asyncio.create_task(self._settle(msgs))
            self._tasks.add(t)
            t.add_done_callback(lambda t: self._batch_done(t, room))

    def _batch_done(self, t: asyncio.Task[None], room: asyncio.Semaphore) -> None:
        self._tasks.discard(t)
        self._stats.batches_inflight -= 1
        room.release()
        if not t.cancelled() and t.exception() is not None:
            log.error("NATS batch failed: %r", t.exception())

    async def _drain(self) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.cfg.drain_timeout)
        for t in pending:  # their messages are nakked as they are cancelled
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)

    # ------------------------------------------------------------------ one batch
    async def _settle(self, msgs: list[Any]) -> None:
        st = self._stats
        cfg = self.cfg
        st.fetched += len(msgs)
        items: list[Any] = []
        keys: list[Any] = []
        spans: list[_Span] = []
        dead: list[NatsDeadLetter] = []
        for m in msgs:
            md = m.metadata
            if md.num_delivered > 1:
                st.redelivered += 1
            if md.num_delivered > cfg.max_deliver:
                await self._poison(m, md, f"delivered {md.num_delivered} times (max_deliver {cfg.max_deliver})")
                continue
            spans.append(_Span(m, md, len(items)))
            dead.extend(self._split(m, md, items, keys))
        if dead:
            await self._deadletter(dead)
        if not items:
            for sp in spans:
                await self._ack(sp.msg)
            return
        st.events += len(items)
        keeper = asyncio.create_task(self._keep_alive([sp.msg for sp in spans]))
        failed: dict[int, str] = {}  # span index → why
        delay = cfg.nak_delay
        invalid: dict[int, list[Any]] = {}
        settled = False
        try:
            try:
                async with asyncio.timeout(cfg.work_timeout or None):
                    # block=False: a full engine hands the messages back (nak) for another
                    # collector on the consumer to take, rather than sitting on them
                    op = await self.collector.ahandle(items, keys=keys if self.keyed else None, block=False)
                    res = await op
            except TimeoutError:
                failed = dict.fromkeys(range(len(spans)), f"not committed within work_timeout ({cfg.work_timeout}s)")
            except Overloaded as e:
                delay = max(cfg.nak_delay, e.retry_after)
                failed = dict.fromkeys(range(len(spans)), f"engine overloaded: {e}")
            except CollectorError as e:
                failed = dict.fromkeys(range(len(spans)), f"{type(e).__name__}: {e}")
            else:
                los = [sp.lo for sp in spans]
                for err in res.errors:
                    j = bisect.bisect_right(los, err.index) - 1
                    if err.kind in FAILED_KINDS:
                        failed.setdefault(j, f"{err.kind}: {err.reason}")
                    elif err.kind == "invalid":
                        invalid.setdefault(j, []).append(err)
            keeper.cancel()
            # the worker writes an invalid event (payload, path, reason) to the pipeline's
            # dead-letter sink; this log line ties it to its subject and stream sequence
            where = (
                "dead-lettered by the workers" if self.collector.pipeline.deadletter is not None
                else "dropped (the pipeline has no dead-letter sink)"
            )
            for j, sp in enumerate(spans):
                why = failed.get(j)
                if why is None:
                    bad = invalid.get(j)
                    if bad:
                        st.deadlettered += len(bad)
                        e0 = bad[0]
                        log.warning(
                            "NATS message %s seq %d: %d invalid events %s (first: event %d, %s: %s); "
                            "message acknowledged",
                            sp.msg.subject, sp.md.sequence.stream, len(bad), where, e0.index - sp.lo, e0.path,
                            e0.reason,
                        )
                    await self._ack(sp.msg)
                elif sp.md.num_delivered >= cfg.max_deliver:
                    await self._poison(sp.msg, sp.md, f"failed on delivery {sp.md.num_delivered} of {cfg.max_deliver}: {why}")
                else:
                    await self._nak(sp.msg, sp.md, why, delay)
            settled = True
        finally:
            keeper.cancel()
            if not settled:  # cancelled (stop ran out of time): deliver them again soon
                for sp in spans:
                    self._stats.nakked += 1
                    with contextlib.suppress(Exception):
                        await sp.msg.nak(delay=cfg.nak_delay)

    def _split(self, m: Any, md: Any, items: list[Any], keys: list[Any]) -> list[NatsDeadLetter]:
        """Append the message's events (raw JSON objects) and their shard keys; the bad ones back."""
        data = m.data.strip()
        lines = _lines(data)
        key = self.key
        dec = self._dec_key.decode
        if len(lines) > 1:
            try:
                found = self._dec_key.decode_lines(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
            else:
                if len(found) == len(lines):
                    items.extend(map(msgspec.Raw, lines))
                    keys.extend(getattr(k, key) for k in found)
                    return []
        bad = []
        for i, ln in enumerate(lines):
            try:
                k = dec(ln)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                reason = f"malformed JSON: {e}" if isinstance(e, msgspec.DecodeError) else f"not an event object: {e}"
                bad.append(self._record(m, md, ln, reason, i))
                continue
            items.append(msgspec.Raw(ln))
            keys.append(getattr(k, key))
        return bad

    def _record(self, m: Any, md: Any, payload: bytes, reason: str, index: int) -> NatsDeadLetter:
        return NatsDeadLetter(
            payload=payload.decode("utf-8", "replace"),
            reason=reason,
            stage="nats",
            time=time.time(),
            subject=m.subject,
            stream=md.stream,
            sequence=md.sequence.stream,
            deliveries=md.num_delivered,
            index=index,
        )

    async def _keep_alive(self, msgs: list[Any]) -> None:
        """Tell JetStream the batch is being worked on, so ack_wait does not expire meanwhile."""
        while True:
            await asyncio.sleep(self.cfg.ack_wait / 3)
            for m in msgs:
                with contextlib.suppress(Exception):
                    await m.in_progress()

    async def _ack(self, m: Any) -> None:
        try:
            await m.ack()
            self._stats.acked += 1
        except Exception as e:  # not acknowledged: it comes again (a counted redelivery)
            log.warning("NATS ack of %s failed: %s", m.subject, e)

    async def _nak(self, m: Any, md: Any, why: str, delay: float) -> None:
        self._stats.nakked += 1
        log.warning("NATS message %s seq %d not committed (%s): nak, redelivery in %.1fs",
                    m.subject, md.sequence.stream, why, delay)
        with contextlib.suppress(Exception):
            await m.nak(delay=delay)

    async def _poison(self, m: Any, md: Any, why: str) -> None:
        """Dead-letter every event of the message, then terminate it (no more deliveries)."""
        lines = _lines(m.data.strip()) or [b""]
        await self._deadletter([self._record(m, md, ln, f"poison message: {why}", i) for i, ln in enumerate(lines)])
        log.error("NATS message %s seq %d is poison (%s): dead-lettered and terminated", m.subject, md.sequence.stream, why)
        self._stats.terminated += 1
        with contextlib.suppress(Exception):
            await m.term()

    async def _deadletter(self, records: list[NatsDeadLetter]) -> None:
        self._stats.deadlettered += len(records)
        if self._dl_path is None:
            for r in records:
                log.error("dead letter (no dead-letter file configured): %s", self._enc.encode(r).decode())
            return
        blob = self._enc.encode_lines(records)
        await asyncio.to_thread(self._write_dl, blob)

    def _write_dl(self, blob: bytes) -> None:
        if self._dl_file is None:
            from ..sinks.files import LineFile

            self._dl_file = LineFile(self._dl_path or "", fsync="always")
        self._dl_file.write(blob)


async def run_ingress(collector: Collector, cfg: NatsIngressConfig) -> NatsIngress:
    """Start an ingress for ``cfg`` on the running loop; returns once it is consuming.

    The daemon keeps the returned object: ``stop()`` then awaiting ``ingress.task``
    ends it; ``stats_dict()`` feeds ``/metrics``.
    """
    ing = NatsIngress.from_config(collector, cfg)
    task = ing.task = asyncio.create_task(ing.run())
    waiter = asyncio.create_task(ing.ready.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        task.result()  # raises the start-up error
    return ing
