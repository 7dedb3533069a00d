"""``collector publish``: send a pack's generated events, or NDJSON, to NATS JetStream.

::

    generator of PACK (generic, playback, casino) ─┐
    --file PATH (NDJSON; - or none: stdin) ─┴─► JSON lines ─► subject from --subject (`events.{type}`)
        ─► messages of --per-message events ─► Publisher (Nats-Msg-Id = event id) ─► PubAcks awaited
        ─► progress line on stderr; the summary on stdout

Every message carries ``Nats-Msg-Id`` (the event's id, or a hash of the ids of an
NDJSON message's events; a content hash for events without an id), so publishing the
same events again within the stream's duplicate window stores nothing twice: the
PubAcks that say so are counted as ``duplicates``. The stream must exist and capture
the subjects (``NatsIngress`` creates it, or ``nats stream add``).

Exit status: 0 when every message was acknowledged, 2 on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["add_arguments", "publish_events", "run"]

PACKS = ("generic", "playback", "casino")
SLICE = 1000  # events generated or read per step


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``collector publish``."""
    p.add_argument("pack", nargs="?", choices=PACKS, help="generate this pack's events (else: NDJSON from --file or stdin)")
    p.add_argument("--file", metavar="PATH", help="NDJSON to publish, one event per line ('-': stdin)")
    p.add_argument("--to", required=True, metavar="nats://HOST:PORT", help="NATS server URL(s), comma-separated")
    p.add_argument(
        "--subject", default="events.{type}", metavar="TEMPLATE",
        help="subject template; {field} is the event's top-level field (default events.{type})",
    )
    p.add_argument("--rate", type=float, default=0.0, help="events per second (default 0: as fast as PubAcks come)")
    p.add_argument("--count", type=int, default=0, help="events to send (default: all of the file; a pack: until Ctrl-C)")
    p.add_argument("--per-message", type=int, default=1, help="events per message, as NDJSON (default 1)")
    p.add_argument("--id-field", default="id", help="the events' id field, used as Nats-Msg-Id (default id)")
    p.add_argument("--stream", help="expected stream name: a publish captured by another stream fails")
    p.add_argument("--users", type=int, default=1000, help="distinct users of generated events (default 1000)")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def _generated(pack: str, users: int) -> Iterator[list[bytes]]:
    """Slices of a pack's events as JSON lines, with ids that differ from any earlier run."""
    import msgspec

    enc = msgspec.json.Encoder()
    seed = int.from_bytes(os.urandom(4), "big")
    if pack == "generic":
        from collector.generic import generate_generic, new_ids

        while True:
            evs = generate_generic(SLICE, users=users, seed=seed)
            seed += 1
            for e, i in zip(evs, new_ids(len(evs)), strict=True):
                e["id"] = i
            yield enc.encode_lines(evs).splitlines()
    elif pack == "casino":
        from collector.casino import generate_casino

        start = time.time_ns() // 1000  # ids of later runs are larger
        while True:
            cevs = generate_casino(SLICE, seed=seed, start_id=start)
            seed += 1
            start += SLICE
            yield enc.encode_lines(cevs).splitlines()
    else:
        from collector.playback import generate_events

        start = time.time_ns() // 1000  # microseconds: ids of later runs are larger
        while True:
            pevs = generate_events(SLICE, users=users, seed=seed, start_id=start)
            seed += 1
            start += SLICE
            yield enc.encode_lines(pevs).splitlines()


def _from_file(path: str | None) -> Iterator[list[bytes]]:
    f = sys.stdin.buffer if path in (None, "-") else open(path, "rb")  # noqa: SIM115
    try:
        buf: list[bytes] = []
        for line in f:
            line = line.strip()
            if line:
                buf.append(line)
                if len(buf) >= SLICE:
                    yield buf
                    buf = []
        if buf:
            yield buf
    finally:
        if f is not sys.stdin.buffer:
            f.close()


class _Messages:
    """JSON lines → ``(subject, payload, msg id)`` messages of ``per`` events each."""

    def __init__(self, template: str, id_field: str, per: int) -> None:
        import msgspec

        from collector.sinks.nats import SubjectTemplate

        self.subjects = SubjectTemplate(template)
        self.id_field = id_field
        self.per = per
        fields = {id_field, *self.subjects.fields}
        self.dec = msgspec.json.Decoder(msgspec.defstruct("PublishHead", [(f, Any, None) for f in sorted(fields)]))
        self.pending: dict[str, list[tuple[bytes, str]]] = {}

    def add(self, lines: list[bytes]) -> list[tuple[str, bytes, str]]:
        """The messages complete after ``lines``."""
        import msgspec

        from collector.sinks.nats import chunk_id

        out = []
        for ln in lines:
            try:
                head = self.dec.decode(ln)
                values = {f: getattr(head, f) for f in self.subjects.fields}
                eid = getattr(head, self.id_field)
            except (msgspec.DecodeError, msgspec.ValidationError):
                values, eid = {}, None  # sent as it is: the consumer dead-letters it
            subject = self.subjects.render(values)
            mid = str(eid) if eid is not None else hashlib.blake2b(ln, digest_size=16).hexdigest()
            if self.per == 1:
                out.append((subject, ln, mid))
                continue
            group = self.pending.setdefault(subject, [])
            group.append((ln, mid))
            if len(group) >= self.per:
                out.append((subject, b"\n".join(x for x, _ in group) + b"\n", chunk_id([m for _, m in group])))
                del self.pending[subject]
        return out

    def rest(self) -> list[tuple[str, bytes, str]]:
        """The incomplete messages at the end."""
        from collector.sinks.nats import chunk_id

        out = [(s, b"\n".join(x for x, _ in g) + b"\n", chunk_id([m for _, m in g])) for s, g in self.pending.items()]
        self.pending.clear()
        return out


async def publish_events(args: argparse.Namespace) -> tuple[int, int, int, float]:
    """Publish what ``args`` (the options of ``collector publish``) name; (events, messages, duplicates, seconds)."""
    from collector.sinks.nats import Publisher

    source = _generated(args.pack, args.users) if args.pack else _from_file(args.file)
    msgs = _Messages(args.subject, args.id_field, max(1, args.per_message))
    pub = Publisher(args.to, stream=args.stream)
    await pub.connect()
    events = 0
    t0 = time.monotonic()
    shown = t0
    limit = args.count if args.count > 0 else None
    # rate-limited runs publish small steps so the pace is even
    step = max(1, min(SLICE, int(args.rate / 20))) if args.rate > 0 else SLICE
    try:
        for lines in source:
            if limit is not None:
                lines = lines[: limit - events]
            for lo in range(0, len(lines), step):
                part = lines[lo : lo + step]
                batch = msgs.add(part)
                if batch:
                    await pub.publish(batch)
                events += len(part)
                if args.rate > 0:
                    ahead = t0 + events / args.rate - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                now = time.monotonic()
                if not args.quiet and now - shown >= 0.5:
                    shown = now
                    _progress(events, pub.published, pub.duplicates, now - t0)
            if limit is not None and events >= limit:
                break
        tail = msgs.rest()
        if tail:
            await pub.publish(tail)
    finally:
        published, dups = pub.published, pub.duplicates
        await pub.close()
    wall = time.monotonic() - t0
    if not args.quiet:
        _progress(events, published, dups, wall)
        print(file=sys.stderr)
    return events, published, dups, wall


def _progress(events: int, messages: int, dups: int, wall: float) -> None:
    rate = events / wall if wall > 0 else 0.0
    print(
        f"\r  published {events:,} events in {messages:,} messages, {rate:,.0f} events/s, {dups:,} duplicates",
        end="", file=sys.stderr, flush=True,
    )


def run(args: argparse.Namespace) -> int:
    """Publish, then print what was sent."""
    from collector.errors import ConfigError

    if args.pack and args.file:
        raise ConfigError("give a PACK or --file, not both")
    try:
        events, messages, dups, wall = asyncio.run(publish_events(args))
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        print(f"collector publish: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(
        f"published {events} events in {messages} messages to {args.subject} "
        f"({dups} duplicates) in {wall:.2f} s ({events / wall if wall > 0 else 0:,.0f} events/s)"
    )
    return 0
