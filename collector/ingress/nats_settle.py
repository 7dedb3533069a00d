"""Settling one fetched batch of NATS messages: events to the engine, then ack, nak or term.

::

    msgs ─► per message: delivered > max_deliver? ─► poison: dead-letter its events, term
                         split: one JSON object or NDJSON ─► raw events + shard keys
                                malformed / not an object ─► dead-letter record
         ─► collector.ahandle(events, keys=...) ─► result (in_progress every ack_wait/3 meanwhile)
         ─► per message (its span of the events): stored, invalid, filtered ─► ack
                                                  lost / failed / timeout / engine refused ─► nak(delay)
                                                  ... on its max_deliver-th delivery ─► poison
         cancelled before settling (stop ran out of time) ─► nak every message

:class:`BatchSettler` holds what settling needs (the engine, the key decoder, the
dead-letter file) and counts into the ingress's :class:`~.nats_records.IngressStats`;
:class:`~collector.ingress.nats.NatsIngress` runs one ``settle`` task per fetched batch.
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
from .nats_records import IngressState, IngressStats, NatsDeadLetter

if TYPE_CHECKING:
    from ..engine import Collector

__all__ = ["FAILED_KINDS", "BatchSettler"]

log = logging.getLogger("collector.ingress")

FAILED_KINDS = frozenset({"lost", "error"})  # result kinds after which a message is delivered again


def _lines(data: bytes) -> list[bytes]:
    """The non-blank lines of a stripped message: one JSON event, or NDJSON."""
    return [data] if b"\n" not in data else [ln for ln in data.split(b"\n") if ln.strip()]


class _Span:
    __slots__ = ("lo", "md", "msg")

    def __init__(self, msg: Any, md: Any, lo: int) -> None:
        self.msg = msg
        self.md = md
        self.lo = lo


class BatchSettler:
    """Hands a batch's events to ``collector`` and settles each message by the result."""

    def __init__(self, collector: Collector, cfg: NatsIngressConfig, stats: IngressStats,
                 state: IngressState | None = None) -> None:
        self.collector = collector
        self.cfg = cfg
        self.stats = stats
        self.state = state or IngressState()  # its last_error: the last nak, term or failed ack
        p = collector.pipeline
        self.key = p.key
        self.keyed = p.shard != "chunk"
        T = msgspec.defstruct("NatsKey_" + p.key, [(p.key, Any, None)])
        self.dec_key = msgspec.json.Decoder(T)
        self.enc = msgspec.json.Encoder()
        self.dl_file: Any = None
        self.dl_path = self._deadletter_path()

    def _deadletter_path(self) -> str | None:
        """The ingress's own dead-letter file, else the pipeline's (``{worker}`` → ``nats``)."""
        if self.cfg.deadletter:
            return self.cfg.deadletter
        dl = self.collector.pipeline.deadletter
        path = dl.get("path") if isinstance(dl, dict) else getattr(dl, "path", None)
        return str(path).replace("{worker}", "nats") if path else None

    def close(self) -> None:
        """Close the dead-letter file, if one was opened."""
        if self.dl_file is not None:
            self.dl_file.close()
            self.dl_file = None

    async def settle(self, msgs: list[Any]) -> None:
        """Hand ``msgs``' events to the engine and settle each message (see the module docstring)."""
        st = self.stats
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
                    self.stats.nakked += 1
                    with contextlib.suppress(Exception):
                        await sp.msg.nak(delay=cfg.nak_delay)

    def _split(self, m: Any, md: Any, items: list[Any], keys: list[Any]) -> list[NatsDeadLetter]:
        """Append the message's events (raw JSON objects) and their shard keys; the bad ones back."""
        data = m.data.strip()
        lines = _lines(data)
        key = self.key
        dec = self.dec_key.decode
        if len(lines) > 1:
            try:
                found = self.dec_key.decode_lines(data)
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
            self.stats.acked += 1
        except Exception as e:  # not acknowledged: it comes again (a counted redelivery)
            log.warning("NATS ack of %s failed: %s", m.subject, e)
            self.state.error(f"ack of {m.subject} failed: {type(e).__name__}: {e}")

    async def _nak(self, m: Any, md: Any, why: str, delay: float) -> None:
        self.stats.nakked += 1
        self.state.error(f"nak {m.subject} seq {md.sequence.stream}: {why}")
        log.warning("NATS message %s seq %d not committed (%s): nak, redelivery in %.1fs",
                    m.subject, md.sequence.stream, why, delay)
        with contextlib.suppress(Exception):
            await m.nak(delay=delay)

    async def _poison(self, m: Any, md: Any, why: str) -> None:
        """Dead-letter every event of the message, then terminate it (no more deliveries)."""
        lines = _lines(m.data.strip()) or [b""]
        await self._deadletter([self._record(m, md, ln, f"poison message: {why}", i) for i, ln in enumerate(lines)])
        log.error("NATS message %s seq %d is poison (%s): dead-lettered and terminated", m.subject, md.sequence.stream, why)
        self.stats.terminated += 1
        self.state.error(f"terminated {m.subject} seq {md.sequence.stream} (poison): {why}")
        with contextlib.suppress(Exception):
            await m.term()

    async def _deadletter(self, records: list[NatsDeadLetter]) -> None:
        self.stats.deadlettered += len(records)
        if self.dl_path is None:
            for r in records:
                log.error("dead letter (no dead-letter file configured): %s", self.enc.encode(r).decode())
            return
        blob = self.enc.encode_lines(records)
        await asyncio.to_thread(self._write_dl, blob)

    def _write_dl(self, blob: bytes) -> None:
        if self.dl_file is None:
            from ..sinks.files import LineFile

            self.dl_file = LineFile(self.dl_path or "", fsync="always")
        self.dl_file.write(blob)
