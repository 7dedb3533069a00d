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

Where each part lives: this module holds the fetch loop (:class:`NatsIngress`) and
:func:`run_ingress`; connecting, creating the stream and consumer and watching the lag
are :mod:`.nats_setup`; splitting a batch, handing it to the engine and the ack / nak /
term / dead-letter decisions are :mod:`.nats_settle`; the counters and the dead-letter
record are :mod:`.nats_records` (re-exported here).

Backpressure: at most ``max_batches`` fetched batches are unsettled at once, the
consumer's ``max_ack_pending`` bounds what the server hands out, and
``Collector.ahandle`` awaits while the engine's ``max_inflight`` is reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import TYPE_CHECKING, Any

import msgspec

from ..config import NatsIngressConfig
from ..sinks.nats import nats_module
from .nats_records import IngressState, IngressStats, NatsDeadLetter
from .nats_settle import BatchSettler
from .nats_setup import connect, ensure, watch_lag

if TYPE_CHECKING:
    from ..engine import Collector

__all__ = ["IngressState", "IngressStats", "NatsDeadLetter", "NatsIngress", "NatsIngressConfig", "run_ingress"]

log = logging.getLogger("collector.ingress")


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
        self._stats = IngressStats()
        self.state = IngressState()  # last error, when the lag was last read
        self.settler = BatchSettler(collector, self.cfg, self._stats, self.state)
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()
        self.nc: Any = None
        self.js: Any = None
        self._stopped_early = False
        self.task: asyncio.Task[None] | None = None  # set by run_ingress

    # ------------------------------------------------------------------ public
    def stats(self) -> IngressStats:
        """A copy of the counters."""
        return msgspec.structs.replace(self._stats)

    def stats_dict(self) -> dict[str, int]:
        """The counters as a dict (for ``/metrics``)."""
        return msgspec.structs.asdict(self._stats)

    @property
    def connected(self) -> bool:
        """True while the connection to NATS is up (False before ``run()`` connected, and after it)."""
        nc = self.nc
        return bool(nc is not None and nc.is_connected)

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
        nc = await connect(self.nats, cfg, self._stop, self.state)
        if nc is None:  # stopped while connecting
            return
        self.nc = nc
        try:
            self.js = self.nc.jetstream()
            await ensure(self.nats, self.js, cfg)
            # one subscription per fetcher: a fetch is a request and its replies share
            # the subscription's inbox, so concurrent fetches need their own
            subs = [
                await self.js.pull_subscribe_bind(durable=cfg.durable, stream=cfg.stream)
                for _ in range(cfg.fetchers)
            ]
            self.ready.set()
            lag = asyncio.create_task(watch_lag(self.js, cfg, self._stats, self.state))
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
            self.settler.close()

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
                self.state.error(f"fetch: {type(e).__name__}: {e}")
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning("NATS fetch failed (%d in a row): %s: %s", failures, type(e).__name__, e)
                await asyncio.sleep(min(5.0, 0.1 * failures))
                continue
            failures = 0
            self._stats.batches_inflight += 1
            self._stats.messages_inflight += len(msgs)
            t = asyncio.create_task(self.settler.settle(msgs))
            self._tasks.add(t)
            t.add_done_callback(functools.partial(self._batch_done, room=room, n=len(msgs)))

    def _batch_done(self, t: asyncio.Task[None], room: asyncio.Semaphore, n: int) -> None:
        self._tasks.discard(t)
        self._stats.batches_inflight -= 1
        self._stats.messages_inflight -= n
        room.release()
        if not t.cancelled() and t.exception() is not None:
            log.error("NATS batch failed: %r", t.exception())
            self.state.error(f"batch failed: {t.exception()!r}")

    async def _drain(self) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.cfg.drain_timeout)
        for t in pending:  # their messages are nakked as they are cancelled
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)


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
