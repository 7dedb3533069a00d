"""The bytes that cross the supervisor ↔ worker channel.

::

    supervisor ──Chunk(id, events as a JSON array)──► worker
    supervisor ◄──Ready | Ack(id, counts, errors, summary, events?) | BootFailed──── worker
    supervisor ◄──Snapshot(stage, partial state)──────────────────────────────── worker

One channel (a socketpair) per worker. Every message is a frame: a 4-byte
little-endian length, then one msgpack-encoded message of the tagged union below.
Nothing is pickled. Event payloads stay JSON inside the frame because that is what
producers send (a ``bytes`` batch goes through untouched) and msgspec's JSON codec is
as fast as its msgpack codec for these shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import msgspec

__all__ = [
    "FRAME_HEADER",
    "Ack",
    "BootFailed",
    "Chunk",
    "ChunkSummary",
    "ErrorRecord",
    "FrameProtocol",
    "FrameWriter",
    "LookupSummary",
    "Ready",
    "Routed",
    "RoutedPart",
    "Snapshot",
    "Stop",
    "decode_frame",
    "encode_frame",
    "ndjson_lines",
    "read_frames",
]

FRAME_HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 31


class Chunk(msgspec.Struct, tag=1, array_like=True):
    """A slice of one operation's events for one worker.

    ``attempt`` is 0 on first delivery and counts redeliveries after worker deaths.
    """

    id: int
    payload: bytes  # a JSON array of events, or NDJSON
    want_events: bool = False
    attempt: int = 0
    ndjson: bool = False  # payload is NDJSON instead of a JSON array
    op: int = 0  # the operation it belongs to (workers report each key once per op)
    # shard="key" NDJSON: route this range over ``route`` workers (keep this worker's
    # events, send the others back in a Routed); ``part``: events another worker routed
    # here. Both report each key once per op, as shard="chunk" does.
    route: int = 0
    part: bool = False
    # the payload sits in the worker's shared-memory arena (collector/arena.py): slot
    # ``slot``, ``size`` bytes, and ``payload`` is empty; -1: the payload is inline
    slot: int = -1
    size: int = 0
    # a shard="key" range: per worker, a slot of its arena reserved for this range's part
    # for it (-1: none; empty: no reservations, parts go inline in the Routed)
    reserved: list[int] = []


class Stop(msgspec.Struct, tag=2, array_like=True):
    """Finish what is in flight, close sinks, exit 0."""


class Ready(msgspec.Struct, tag=3, array_like=True):
    """The worker's pipeline is built and it takes chunks."""

    pid: int


class BootFailed(msgspec.Struct, tag=4, array_like=True):
    """The worker could not build its pipeline; it exits with ``BOOT_FAILURE`` next."""

    pid: int
    message: str
    traceback: str


class ErrorRecord(msgspec.Struct, array_like=True):
    """One rejected event: its position in the chunk, field path, reason, kind."""

    pos: int
    path: str
    reason: str
    kind: str = "invalid"  # invalid | duplicate | filtered | unauthorized | retry | deadlettered | error | lost


class LookupSummary(msgspec.Struct, array_like=True):
    """What one lookup did for one chunk (merged across chunks by the supervisor)."""

    calls: int = 0  # calls actually made to the client (retries included)
    hits: int = 0  # events served from the cache
    coalesced: int = 0  # events whose key was already being fetched (single-flight)
    misses: int = 0  # events that needed a fetch
    failures: int = 0  # events whose lookup finally failed (field left at its default)
    reported_sum: float = 0.0  # sum of durations the service reported
    reported_max: float = 0.0
    latencies: list[float] = []  # measured call latencies, seconds
    # source lookups (collector.sources); appended, so older readers stay compatible
    errors: int = 0  # failed calls (tries) and failed keys inside good answers
    not_found: int = 0  # events whose key the source does not have (field left at its default)
    stale: int = 0  # events served a stale value because the source failed (also in failures)
    breaker_opens: int = 0  # times the circuit breaker opened
    short_circuited: int = 0  # calls refused at once by an open breaker
    shared_hits: int = 0  # keys answered by the shared (Redis) cache level
    keys_fetched: int = 0  # keys asked of the source (÷ calls = keys per batched call)
    # failure policies (Lookup.on_failure / on_missing / on_error), events
    kept: int = 0  # failed lookups whose event went on with the field at its default
    dead_lettered: int = 0  # events sent to the dead-letter sink by the policy
    held: int = 0  # events held for the source to answer again
    recovered: int = 0  # held events the source then answered (enriched after all)
    log_suppressed: int = 0  # per-event log lines over log_rate, not written


class ChunkSummary(msgspec.Struct, array_like=True):
    """Per-chunk partial of the batch statistics."""

    counts: dict[str, dict[str, int]] = {}
    lookups: dict[str, LookupSummary] = {}
    keys: list[Any] | None = None  # shard="chunk": shard keys this worker had not yet seen in this op


class Ack(msgspec.Struct, tag=5, array_like=True):
    """A chunk is done: its sinks committed it. ``events`` when the chunk asked for them."""

    id: int
    handled: int
    failed: int
    errors: list[ErrorRecord]
    summary: ChunkSummary
    events: bytes | None = None  # JSON array of the enriched events
    worker_latency: float = 0.0


class RoutedPart(msgspec.Struct, array_like=True):
    """The events of a routed range that belong to ``worker``, and where they were."""

    worker: int
    payload: bytes  # NDJSON: the range's lines as they were (native router) or encoded again
    positions: bytes  # array('I'): each event's line index in the range
    # written into the slot the range reserved in ``worker``'s arena (``payload`` empty)
    slot: int = -1
    size: int = 0


class Routed(msgspec.Struct, tag=7, array_like=True):
    """A worker routed a range (Chunk ``route``): its line count and the others' parts.

    Sent before the range's own Ack, on the same channel, so the supervisor knows the
    parts to wait for before that Ack can arrive. ``own``: the line indices this
    worker kept (array('I')); lines that failed to decode are its own too.
    """

    id: int
    lines: int
    own: bytes
    parts: list[RoutedPart]


class Snapshot(msgspec.Struct, tag=6, array_like=True):
    """A stateful stage's partial state in one worker (aggregates), sent periodically.

    ``data`` is the stage's own msgspec encoding of its partial (never a pickle); the
    supervisor keeps the latest per worker and stage and merges on read.
    """

    stage: str
    data: bytes
    taken_at: float  # the worker's time.time() when the partial was taken


class Release(msgspec.Struct, tag=8, array_like=True):
    """The collector is draining: stages holding events (Order's buffer) release them now,
    so the chunks waiting for them finish without waiting out their delay."""


Message = Chunk | Stop | Ready | BootFailed | Ack | Snapshot | Routed | Release

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def ndjson_lines(payload: bytes) -> list[bytes]:
    """The events of an NDJSON payload: its lines, blank ones skipped (not events).

    A chunk's positions count these lines, so the worker that reports an error at
    position ``i`` and the supervisor that places it agree on what ``i`` is.
    """
    return [ln for ln in payload.split(b"\n") if ln.strip()]


def encode_frame(msg: Message) -> bytes:
    """Length-prefixed msgpack frame of ``msg``."""
    body = _encoder.encode(msg)
    return FRAME_HEADER.pack(len(body)) + body


def decode_frame(body: bytes | memoryview) -> Message:
    """Decode one frame body (the bytes after the length prefix)."""
    return _decoder.decode(body)


class FrameWriter:
    """Queues frames and writes all those of one loop iteration with one ``writelines``.

    One syscall per burst instead of one per frame: under load a worker acknowledges
    many chunks per iteration, and the supervisor sends many.
    """

    __slots__ = ("_buf", "_loop", "transport")

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self._buf: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def send(self, msg: Message) -> None:
        """Queue ``msg``; it is written at the end of this loop iteration."""
        body = _encoder.encode(msg)
        # header and body go to writelines separately: no copy of a large chunk just to
        # put four bytes in front of it
        self._buf.append(FRAME_HEADER.pack(len(body)))
        self._buf.append(body)
        if len(self._buf) == 2:
            self._loop.call_soon(self.flush)

    def send_now(self, msg: Message) -> None:
        """Queue ``msg`` and write the queue at once.

        For the messages a peer waits on (a worker's ack, its routed parts): written at
        the end of the iteration, they would wait behind every callback already queued
        in it, such as the next chunk's CPU-bound step (2.6 ms of a 6 ms round trip
        under HTTP load).
        """
        self.send(msg)
        self.flush()

    def flush(self) -> None:
        """Write what is queued now."""
        if self._buf:
            buf, self._buf = self._buf, []
            # the peer may be gone; its process sentinel (or EOF) reports that
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.transport.writelines(buf)

    def pending(self) -> int:
        """Bytes queued in the transport (for backpressure)."""
        return self.transport.get_write_buffer_size()


class FrameProtocol(asyncio.Protocol):
    """A channel's frames decoded as its bytes arrive, each handed to ``on_message``.

    :func:`read_frames` wakes a task per burst, and that task runs after every callback
    already queued in the loop turn: in the daemon's supervisor, behind the turn's HTTP
    requests (2 ms of a chunk's 6 ms round trip under batched load). Here an ack is
    accounted in the I/O callback itself. ``closed`` resolves when the peer closes
    the channel (or dies).
    """

    def __init__(self, on_message: Callable[[Message], None],
                 on_connect: Callable[[asyncio.Transport], None] | None = None) -> None:
        self.on_message = on_message
        self.on_connect = on_connect
        self.buf = bytearray()  # the start of a frame not complete yet
        self.need = 0  # bytes that complete it
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are no subclass of it
        if self.on_connect is not None:
            self.on_connect(self.transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        if buf:
            buf += data
            if len(buf) < self.need:  # a large frame still arriving: no copy per piece
                return
            data = bytes(buf)
            buf.clear()
        n = len(data)
        pos = 0
        hsize = FRAME_HEADER.size
        unpack = FRAME_HEADER.unpack_from
        with memoryview(data) as view:
            while n - pos >= hsize:
                (size,) = unpack(view, pos)
                end = pos + hsize + size
                if end > n:
                    break
                msg = _decoder.decode(view[pos + hsize:end])
                pos = end
                try:
                    self.on_message(msg)
                except Exception as e:  # a bug in accounting: reported, the channel goes on
                    asyncio.get_running_loop().call_exception_handler(
                        {"message": f"handling a {type(msg).__name__} frame failed", "exception": e, "protocol": self})
            if pos < n:
                buf += view[pos:]
                self.need = hsize + unpack(view, pos)[0] if n - pos >= hsize else hsize

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)


async def read_frames(reader: asyncio.StreamReader) -> AsyncIterator[Message]:
    """Messages from ``reader`` until the peer closes the channel (or dies)."""
    hsize = FRAME_HEADER.size
    unpack = FRAME_HEADER.unpack
    while True:
        try:
            head = await reader.readexactly(hsize)
            (n,) = unpack(head)
            body = await reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        yield decode_frame(body)
