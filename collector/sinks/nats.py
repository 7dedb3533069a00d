"""The ``nats`` sink: events to NATS JetStream, one message per event or per chunk.

::

    chunk ─► subject per event from the template (``events.{type}``)
          ─► one message per event (``Nats-Msg-Id`` = event id)        mode = "event"
             or one NDJSON message per subject (id = hash of the ids)  mode = "chunk"
          ─► publish every message of the chunk at once ─► await every PubAck ─► return

``write`` returns only when JetStream acknowledged (stored) every message, so the
chunk is acknowledged by its worker only after the stream holds it (DESIGN principle
5). A retried chunk publishes the same message ids again: within the stream's
duplicate window JetStream stores each id once and answers ``duplicate: true``; the
sink counts those answers (``duplicates``) instead of hiding them. The same
:class:`Publisher` serves ``collector publish``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import string
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..errors import ConfigError, missing
from ..pipeline import event_type_name
from .base import Batch, EventCodec, Sink
from .config import NatsSinkConfig

__all__ = ["NatsSink", "Publisher", "SubjectTemplate", "chunk_id", "connection_callbacks", "nats_module", "partition"]

log = logging.getLogger("collector.sinks")

MSG_ID = "Nats-Msg-Id"


def nats_module() -> Any:
    """The ``nats`` package (nats-py), or the error naming the extra to install."""
    try:
        import nats
        import nats.js.errors  # the submodule the errors live in
    except ImportError:
        raise missing("nats", "nats", "NATS JetStream") from None
    return nats


_BAD = str.maketrans({" ": "_", ".": "_", "*": "_", ">": "_", "\t": "_", "\r": "_", "\n": "_"})


def partition(value: Any, n: int) -> int:
    """``value``'s partition out of ``n``: FNV-1a (32 bits) of its text, modulo ``n``.

    Stable across processes and versions (not Python's salted ``hash``), so every
    publisher sends one key to the same partition."""
    h = 0x811C9DC5
    for b in str(value).encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h % n


def _strip_specs(template: str) -> str:
    """``template`` without its format specs (``{user_id:p4}`` → ``{user_id}``)."""
    out = []
    for lit, f, _spec, conv in string.Formatter().parse(template):
        out.append(lit.replace("{", "{{").replace("}", "}}"))
        if f is not None:
            out.append("{" + f + (f"!{conv}" if conv else "") + "}")
    return "".join(out)


class SubjectTemplate:
    """A subject template such as ``events.{type}``: fields of the event fill the tokens.

    A value is made a valid subject token (``.``, ``*``, ``>`` and whitespace become
    ``_``); a missing or empty value becomes ``_``. ``{field:pN}`` is the field's
    partition out of ``N`` instead (:func:`partition`, ``0`` .. ``N-1``): with
    ``clickstream.{event}.{user_id:p4}`` one user's events always carry one partition
    token, so a consumer filtering ``clickstream.*.2`` gets every event of its users.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        self.partitions: dict[str, int] = {}  # field → N, for {field:pN}
        self.fields = []
        for _, f, spec, _ in string.Formatter().parse(template):
            if not f:
                continue
            if not f.isidentifier():
                raise ConfigError(f"subject template {template!r}: {{{f}}} must name a top-level field")
            if spec:
                if not (spec[0] == "p" and spec[1:].isdigit() and int(spec[1:]) >= 1):
                    raise ConfigError(f"subject template {template!r}: {{{f}:{spec}}}: the only format is "
                                      "`pN`, the field's partition out of N (N >= 1)")
                self.partitions[f] = int(spec[1:])
            self.fields.append(f)
        if self.partitions:  # render fills such a field with its partition number
            self.template = _strip_specs(template)
        if not template or " " in template:
            raise ConfigError(f"subject template {template!r} is empty or has a space")

    @property
    def constant(self) -> bool:
        """Whether every event goes to the same subject."""
        return not self.fields

    def render(self, values: dict[str, Any]) -> str:
        """The subject for one event's field values."""
        clean = {}
        parts = self.partitions
        for f in self.fields:
            v = values.get(f)
            if f in parts:
                clean[f] = str(partition("" if v is None else v, parts[f]))
            else:
                clean[f] = str(v).translate(_BAD) if v is not None and v != "" else "_"
        return self.template.format_map(clean)

    def of_objects(self, events: Sequence[Any]) -> list[str]:
        """One subject per event (Structs: attributes; dicts: keys)."""
        if self.constant:
            return [self.template] * len(events)
        fs = self.fields

        def values(e: Any) -> dict[str, Any]:
            if isinstance(e, dict):
                return e
            return {f: getattr(e, f, None) for f in fs}

        return [self.render(values(e)) for e in events]


class Publisher:
    """Publish messages to JetStream concurrently and await every PubAck.

    ``duplicates`` counts PubAcks that said the message id was stored already (a
    retry within the stream's duplicate window); ``published`` counts messages the
    stream acknowledged, duplicates included.
    """

    def __init__(self, url: str, *, stream: str | None = None, max_pending: int = 4096, connect_timeout: float = 5.0) -> None:
        self.nats = nats_module()
        self.url = url
        self.stream = stream
        self.max_pending = max_pending
        self.connect_timeout = connect_timeout
        self.nc: Any = None
        self.js: Any = None
        self.published = 0
        self.duplicates = 0
        self._lock: asyncio.Lock | None = None

    async def connect(self) -> Any:
        """The JetStream context, connecting on first use (reconnects are nats-py's)."""
        if self.js is not None:
            return self.js
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.js is None:
                # bounded: nats-py would retry a first connect for ever
                async with _reach(self.url, self.connect_timeout * 2):
                    nc = await self.nats.connect(
                        servers=self.url.split(","),
                        connect_timeout=self.connect_timeout,
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=0.5,
                        allow_reconnect=True,
                        **connection_callbacks("publisher"),
                    )
                self.nc = nc
                self.js = nc.jetstream(publish_async_max_pending=self.max_pending)
        return self.js

    async def publish(self, messages: Sequence[tuple[str, bytes, str]]) -> int:
        """Publish ``(subject, payload, msg id)`` messages; return when all are stored.

        Returns how many of them JetStream reported as duplicates. Raises on the first
        failure (the caller retries the whole set with the same ids: harmless).
        """
        js = await self.connect()
        hdr_name = MSG_ID
        futs: list[asyncio.Future[Any]] = []
        try:
            for subject, payload, msg_id in messages:
                futs.append(await js.publish_async(subject, payload, stream=self.stream, headers={hdr_name: msg_id}))
            acks = await asyncio.gather(*futs)
        except BaseException:
            # nats-py keeps a future until its PubAck arrives, which may be never
            for f in futs:
                f.cancel()
            raise
        dups = sum(1 for a in acks if a.duplicate)
        self.published += len(acks)
        self.duplicates += dups
        return dups

    async def close(self) -> None:
        """Flush and close the connection."""
        nc, self.nc, self.js = self.nc, None, None
        if nc is not None:
            try:
                await nc.drain()
            except Exception:
                await nc.close()


@contextlib.asynccontextmanager
async def _reach(url: str, seconds: float) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise ConnectionError(f"NATS not reachable at {url} within {seconds:g}s") from None


def connection_callbacks(what: str) -> dict[str, Any]:
    """nats-py callbacks that log through ``collector`` loggers instead of printing tracebacks."""

    async def error_cb(e: Exception) -> None:
        log.debug("%s: NATS connection error: %s: %s", what, type(e).__name__, e)

    async def disconnected_cb() -> None:
        log.warning("%s: disconnected from NATS; reconnecting", what)

    async def reconnected_cb() -> None:
        log.warning("%s: reconnected to NATS", what)

    return {"error_cb": error_cb, "disconnected_cb": disconnected_cb, "reconnected_cb": reconnected_cb}


def chunk_id(ids: Sequence[Any]) -> str:
    """The message id of a chunk of events: a hash of their ids (stable across retries)."""
    h = hashlib.blake2b(digest_size=16)
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\n")
    return h.hexdigest()


def resolve_url(cfg: NatsSinkConfig) -> str:
    """``$<url_env>`` if set, else ``url``."""
    if cfg.url_env:
        v = os.environ.get(cfg.url_env)
        if v:
            return v
    return cfg.url


class NatsSink(Sink):
    """Chunks to a JetStream stream (see the module docstring)."""

    kind = "nats"

    def __init__(self, config: NatsSinkConfig, *, name: str, codec: EventCodec, worker: int) -> None:
        super().__init__(config, name=name, codec=codec, worker=worker)
        self.cfg = config
        self.subjects = SubjectTemplate(config.subject)
        if codec.event_type is not None:
            for f in self.subjects.fields:
                if not codec.has(f):
                    raise ConfigError(
                        f"nats sink {name}: subject {config.subject!r} names field {f!r}, "
                        f"which {event_type_name(codec.event_type)} does not have"
                    )
        url = resolve_url(config)
        self.remember_secret(url)
        self.publisher = Publisher(url, stream=config.stream, max_pending=config.max_pending)

    @property
    def duplicates(self) -> int:
        """Messages JetStream reported as already stored (retries inside the duplicate window)."""
        return self.publisher.duplicates

    @property
    def published(self) -> int:
        """Messages JetStream acknowledged, duplicates included."""
        return self.publisher.published

    async def open(self) -> None:
        """Connect; a server that is down is retried on write."""
        try:
            async with asyncio.timeout(self.cfg.timeout):
                await self.publisher.connect()
        except Exception as e:
            self.healthy = False
            log.warning("sink %s: NATS not reachable yet (%s); writes will retry", self.name, self.describe_error(e))

    def messages(self, batch: Batch) -> list[tuple[str, bytes, str]]:
        """The ``(subject, payload, msg id)`` messages of a chunk."""
        subjects = self.subjects.of_objects(batch.events)
        if self.cfg.mode == "event":
            ids = batch.ids
            texts = batch.texts
            return [(s, t.encode(), str(i)) for s, t, i in zip(subjects, texts, ids, strict=True)]
        groups: dict[str, list[int]] = {}
        for k, s in enumerate(subjects):
            groups.setdefault(s, []).append(k)
        if len(groups) == 1:
            (s,) = groups
            return [(s, batch.ndjson, chunk_id(batch.ids))]
        texts, ids = batch.texts, batch.ids
        return [
            (s, ("\n".join(texts[k] for k in ks) + "\n").encode(), chunk_id([ids[k] for k in ks]))
            for s, ks in groups.items()
        ]

    async def write(self, batch: Batch) -> None:
        """Publish the chunk and await every PubAck (one attempt)."""
        dups = await self.publisher.publish(self.messages(batch))
        if dups:
            log.info(
                "sink %s: %d of the chunk's messages were stored already (duplicates dropped by JetStream; %d so far)",
                self.name, dups, self.publisher.duplicates,
            )

    async def health(self) -> bool:
        """Whether the connection is up; a sink never opened (the daemon's ``/ready``
        probe) connects first, for at most 2 s."""
        if self.publisher.nc is None:
            try:
                async with asyncio.timeout(min(self.cfg.timeout, 2.0)):
                    await self.publisher.connect()
            except Exception:
                return False
        nc = self.publisher.nc
        return bool(nc is not None and nc.is_connected)

    async def close(self) -> None:
        """Drain and close the connection."""
        await self.publisher.close()

