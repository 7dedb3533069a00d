"""The NATS ingress's connection and JetStream setup, and the consumer-lag watch.

::

    connect(nats, cfg, stop)  ─► nats-py connect, bounded by connect_timeout; None once stop is set
    ensure(nats, js, cfg)     ─► stream_info / consumer_info; create what is missing (create = true)
    watch_lag(js, cfg, stats, state) ─► every lag_interval (1 s): consumer_info ─► stats.num_pending,
                                        num_ack_pending, state.info_at (a request never reads it itself)

:class:`~collector.ingress.nats.NatsIngress` calls them from ``run()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..config import NatsIngressConfig
from ..errors import CollectorError
from ..sinks.nats import connection_callbacks
from .nats_records import IngressState, IngressStats

__all__ = ["connect", "ensure", "watch_lag"]

log = logging.getLogger("collector.ingress")


def _callbacks(state: IngressState | None) -> dict[str, Any]:
    """The logging callbacks, also noting errors and disconnections in ``state``."""
    cbs = connection_callbacks("ingress")
    if state is None:
        return cbs
    err, disc = cbs["error_cb"], cbs["disconnected_cb"]

    async def error_cb(e: Exception) -> None:
        state.error(f"connection: {type(e).__name__}: {e}")
        await err(e)

    async def disconnected_cb() -> None:
        state.error("disconnected from NATS; reconnecting")
        await disc()

    return {**cbs, "error_cb": error_cb, "disconnected_cb": disconnected_cb}


async def connect(nats: Any, cfg: NatsIngressConfig, stop: asyncio.Event, state: IngressState | None = None) -> Any:
    """The connection to ``cfg.url``; None when ``stop`` was set first.

    Raises :class:`CollectorError` when NATS is not reachable within ``connect_timeout``.
    Connection errors and disconnections are noted in ``state``.
    """
    # nats-py retries the first connect for ever too: bound it (a wrong URL is an
    # error at start) and let stop() end it; once connected, outages are retried
    task = asyncio.ensure_future(
        nats.connect(
            servers=cfg.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.5, allow_reconnect=True,
            **_callbacks(state),
        )
    )
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, timeout=cfg.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1)
        if stop.is_set():
            return None
        raise CollectorError(f"NATS not reachable at {cfg.url} within {cfg.connect_timeout}s")
    return task.result()


async def ensure(nats: Any, js: Any, cfg: NatsIngressConfig) -> None:
    """Create the stream and the durable consumer if missing (else use them as they are)."""
    api = nats.js.api
    try:
        await js.stream_info(cfg.stream)
    except nats.js.errors.NotFoundError:
        if not cfg.create:
            raise CollectorError(f"NATS stream {cfg.stream!r} does not exist (create = false)") from None
        await js.add_stream(
            api.StreamConfig(
                name=cfg.stream,
                subjects=list(cfg.stream_subjects or cfg.subjects),
                retention=api.RetentionPolicy(cfg.retention),
                max_age=cfg.max_age or None,
                duplicate_window=cfg.duplicate_window,
                storage=api.StorageType.FILE,
            )
        )
        log.info("created NATS stream %s on %s", cfg.stream, cfg.stream_subjects or cfg.subjects)
    try:
        await js.consumer_info(cfg.stream, cfg.durable)
    except nats.js.errors.NotFoundError:
        if not cfg.create:
            raise CollectorError(f"NATS consumer {cfg.durable!r} on {cfg.stream!r} does not exist") from None
        await js.add_consumer(
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


async def watch_lag(js: Any, cfg: NatsIngressConfig, stats: IngressStats, state: IngressState | None = None) -> None:
    """Copy the consumer's lag into ``stats`` every ``lag_interval`` (until cancelled).

    Each read is bounded (``min(5, 2 * lag_interval)`` s); the status endpoints read the
    copies, never JetStream, so a slow or absent server never holds a request.
    """
    while True:
        try:
            info = await js.consumer_info(cfg.stream, cfg.durable, timeout=min(5.0, max(1.0, 2 * cfg.lag_interval)))
            stats.num_pending = int(info.num_pending or 0)
            stats.num_ack_pending = int(info.num_ack_pending or 0)
            if state is not None:
                state.info_at = time.monotonic()
        except Exception as e:
            log.debug("consumer info failed: %s", e)
            if state is not None:
                state.error(f"consumer info: {type(e).__name__}: {e}")
        await asyncio.sleep(cfg.lag_interval)
