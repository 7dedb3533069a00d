"""HTTP ingest, metrics and health: an asyncio protocol on httptools, in the supervisor.

::

    socket ─► HttpProtocol (httptools, C parser)
               │ header deadline, body deadline, keep-alive idle deadline
               │ 413 from Content-Length before the body, 415, 401 before the body
               ▼
              App.dispatch(request)
               ├─ POST /events, /events/batch ─► depth check ─► envelope: list[Raw] (C)
               │     ─► id injected where absent ─► Coalescer (one operation per loop turn)
               │     ─► Collector (workers validate, dedup, enrich, store) ─► per-item results
               ├─ GET /metrics (JSON or Prometheus)  ◄── shared-memory stats
               ├─ GET /health, /ready
               └─ GET /openapi.json (built from the same Structs)

The supervisor parses each body once as raw items (no Python objects per field) and
looks at one field, ``id``; validation against the schema happens in the workers, as
for ``handle()``, so the serial part stays small. A request is answered only after its
events are committed by the sinks (or rejected), so a 202 means stored.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import hmac
import logging
import re
import time
import zlib
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from operator import attrgetter
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import msgspec

from ..errors import CollectorClosed, Overloaded
from ..generic import new_ids

if TYPE_CHECKING:
    from ..config import ServerConfig

__all__ = ["App", "HttpServer", "Request", "Response", "json_depth"]

log = logging.getLogger("collector.server")

_REASONS = {
    200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
    415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}


# ---------------------------------------------------------------------- API shapes
# The same Structs decode requests, encode responses and generate /openapi.json.
class BatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /events/batch``."""

    events: list[msgspec.Raw]


class _Reader:
    """What the server reads of each event of one pipeline, in one C pass (other
    fields are skipped unparsed): the id, generated when absent and the id is text,
    and the shard key, handed to the engine so that the supervisor parses nothing."""

    def __init__(self, pipeline: Any) -> None:
        self.id: str | None = pipeline.id_field
        self.key: str = pipeline.key
        names = sorted({self.key, *([self.id] if self.id else [])})
        # gc=False: one head and one result per event, none can be part of a cycle (they
        # hold decoded JSON values); tracked, they made the supervisor's cyclic GC 14 %
        # of its profile under batched load
        head = msgspec.defstruct("EventHead", [(n, Any, msgspec.UNSET) for n in names], gc=False)
        heads = msgspec.defstruct("BatchHeads", [("events", list[head])])  # type: ignore[valid-type]
        self.one: msgspec.json.Decoder[Any] = msgspec.json.Decoder(head)
        self.many: msgspec.json.Decoder[Any] = msgspec.json.Decoder(heads)
        self.get_id = attrgetter(self.id) if self.id else (lambda h: msgspec.UNSET)
        self.get_key = attrgetter(self.key)
        self.generate = self.id is not None and _takes_text(pipeline.event_type, self.id)
        # `{"<id field>":"%s",` then the rest of the object: the one template that puts a
        # generated id first in an event (the field's name escaped for JSON and for %)
        name = msgspec.json.encode(self.id or "").replace(b"%", b"%%")
        self.id_first = b"{" + name + b':"%s",%b'
        self.id_only = b"{" + name + b':"%s"%b'

    def inject_id(self, raw: msgspec.Raw | bytes, eid: str) -> bytes:
        """The JSON object ``raw`` with the generated id ``eid`` as its first member."""
        b = bytes(raw)
        if b[1:2] == b'"':  # `{"...`: a member follows (the common case, no scan)
            return self.id_first % (eid.encode(), b[1:])
        b = b.lstrip()
        rest = b[1:].lstrip()
        return self.id_only % (eid.encode(), b[1:] if rest[:1] == b"}" else b"," + b[1:])

    def ids_and_keys(self, heads: list[Any], raws: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
        """(items, ids, keys) for a batch whose heads were read; ids generated as needed."""
        ids = list(map(self.get_id, heads))
        items = raws
        if self.generate and ids.count(msgspec.UNSET) == len(ids) and _all_members(raws):
            # the common case, no event sent an id: one id each, put first in each
            # object by one formatting step (no scan of the item)
            ids = new_ids(len(ids))
            items = list(map(self.id_first.__mod__, zip(map(str.encode, ids), map(_after_brace, raws), strict=True)))
        elif self.generate and msgspec.UNSET in ids:
            items = list(raws)
            missing = [i for i, k in enumerate(ids) if k is msgspec.UNSET]
            for i, new in zip(missing, new_ids(len(missing)), strict=True):
                ids[i] = new
                items[i] = self.inject_id(raws[i], new)
        if self.key == self.id:
            keys = ids
        else:
            keys = [None if k is msgspec.UNSET else k for k in map(self.get_key, heads)]
        return items, ids, keys


_ID_TYPES = (str, int)  # ids echoed in answers; anything else is invalid and not repeated back


def _takes_text(event_type: Any, field: str) -> bool:
    """Whether ``event_type.<field>`` accepts a string (so a UUID can be generated for it)."""
    info = msgspec.inspect.type_info(event_type)
    for f in getattr(info, "fields", ()):
        if f.name == field:
            t = f.type
            options = t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)
            # Annotated[str, Meta(description=...)] comes wrapped in Metadata
            options = tuple(o.type if isinstance(o, msgspec.inspect.Metadata) else o for o in options)
            return any(isinstance(o, msgspec.inspect.StrType) for o in options)
    return False


def _after_brace(raw: msgspec.Raw | bytes) -> memoryview:
    return memoryview(raw)[1:]


def _all_members(raws: list[Any]) -> bool:
    """Whether every item starts ``{"`` (an object with a member, no leading space),
    in C passes: JSON text holds no NUL byte, so each item after the first starts
    right after a NUL of the join."""
    joined = b"\x00".join(raws)
    return joined[:2] == b'{"' and joined.count(b'\x00{"') == len(raws) - 1


class ItemResult(msgspec.Struct, omit_defaults=True, gc=False):
    """What happened to one event: ``accepted`` (stored), ``duplicate`` (its id was
    already accepted; not stored again), ``invalid`` (``path`` and ``reason`` say why)
    or ``failed`` (the engine could not process it; retry)."""

    index: int
    status: str
    id: str | int | None = None
    path: str | None = None
    reason: str | None = None


class EventResponse(msgspec.Struct, omit_defaults=True):
    """Answer to ``POST /events``."""

    status: str
    id: str | int | None = None
    path: str | None = None
    reason: str | None = None


class BatchResponse(msgspec.Struct):
    """Answer to ``POST /events/batch``: counts and one result per item, in order."""

    accepted: int
    duplicates: int
    invalid: int
    failed: int
    results: list[ItemResult]


class ErrorResponse(msgspec.Struct, omit_defaults=True):
    """Any 4xx/5xx that is not a per-item result: what was wrong and how to fix it."""

    error: str
    detail: str
    path: str | None = None
    retry_after: int | None = None


class Metrics(msgspec.Struct):
    """``GET /metrics`` as JSON (seed 004's fields, then more)."""

    events_received: int
    events_processed: int
    events_failed: int
    average_processing_latency_ms: float
    current_queue_depth: int
    active_workers: int
    events_per_second: float
    uptime_seconds: float
    duplicates_dropped: int
    deadlettered: int
    redelivered_chunks: int
    worker_restarts: int
    http_requests: dict[str, int]
    workers: list[dict[str, Any]]
    sinks: list[dict[str, Any]]


class Health(msgspec.Struct, omit_defaults=True):
    """``GET /health`` and ``GET /ready``."""

    status: str
    workers_alive: int
    workers: int
    heartbeats_fresh: bool
    sinks: dict[str, bool] | None = None
    detail: str | None = None


# ---------------------------------------------------------------------- helpers
_ESCAPE = re.compile(rb"\\.", re.S)
_STRING = re.compile(rb'"[^"]*"')
_KEEP = bytes(range(256)).translate(None, b'{}[]"')  # delete all but the structural bytes
_PARENS = bytes.maketrans(b"{[}]", b"(())")


def json_depth(body: bytes, limit: int) -> int:
    """Nesting depth of arrays and objects in ``body``; ``limit + 1`` means "deeper".

    Every step is a C-level pass, none is per byte in Python: escapes go first (so
    ``\\"`` does not end a string), then every byte that is not a bracket or a quote,
    then string bodies; what is left is brackets only. Each ``replace("()", "")``
    removes the innermost pairs, so the number of passes until nothing is left is the
    depth (a normal event needs three or four).
    """
    s = (_ESCAPE.sub(b"", body) if b"\\" in body else body).translate(None, _KEEP)
    if len(s) <= limit:
        return 0  # fewer brackets than the limit: cannot be deeper
    # most strings hold no bracket and are now `""`; dropping those pairs first leaves
    # the regex (a call per match) only the strings that do
    s = s.replace(b'""', b"")
    if b'"' in s:
        s = _STRING.sub(b"", s)
    s = s.translate(_PARENS)
    for depth in range(limit + 1):
        if not s:
            return depth
        s = s.replace(b"()", b"")
    return limit + 1 if s else limit


# Content-Encoding → zlib wbits (None: nothing to undo). "deflate" is the zlib format
# (RFC 9110); _inflate also takes the raw deflate some clients send under that name
_ENCODINGS: dict[str, int | None] = {"": None, "identity": None, "gzip": 31, "x-gzip": 31, "deflate": 15}


class _TooLarge(Exception):
    pass


def _inflate(body: bytes, wbits: int, limit: int) -> bytes:
    """``body`` decompressed, never more than ``limit`` bytes of output held (a small
    body can expand a thousandfold); gzip members written one after another are read
    in turn, as gzip(1) does."""
    out: list[bytes] = []
    size = 0
    data = body
    while True:
        d = zlib.decompressobj(wbits)
        try:
            chunk = d.decompress(data, limit + 1 - size)
        except zlib.error:
            if wbits != 15 or out:
                raise
            d = zlib.decompressobj(-15)  # raw deflate, no zlib header
            chunk = d.decompress(data, limit + 1 - size)
        size += len(chunk)
        out.append(chunk)
        if size > limit or d.unconsumed_tail:
            raise _TooLarge
        if not d.eof:
            raise zlib.error("the compressed stream ends early (truncated body)")
        data = d.unused_data
        if not data or wbits != 31:
            break
    if data:
        raise zlib.error(f"{len(data)} bytes of trailing data after the compressed stream")
    return b"".join(out)


class Request:
    """One parsed HTTP request."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "started")

    def __init__(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, keep_alive: bool) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.started = time.perf_counter()


class Response:
    """Status, body and headers of one answer."""

    __slots__ = ("body", "close", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: list[tuple[str, str]] | None = None,
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or []
        self.close = close


_enc = msgspec.json.Encoder()


def error(status: int, code: str, detail: str, *, path: str | None = None, retry_after: int | None = None, close: bool = False) -> Response:
    """A JSON error response (with ``Retry-After`` when ``retry_after`` is set)."""
    headers = [("Retry-After", str(retry_after))] if retry_after is not None else None
    body = _enc.encode(ErrorResponse(code, detail, path, retry_after))
    return Response(status, body, headers=headers, close=close)


# ---------------------------------------------------------------------- protocol
class HttpProtocol(asyncio.Protocol):
    """One connection: parse with httptools, enforce deadlines and limits, answer in order."""

    def __init__(self, server: HttpServer) -> None:
        import httptools

        self.server = server
        self.cfg = server.cfg
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.body_size = 0
        self.queue: deque[Request | Response] = deque()
        self.busy = False  # a request is being handled
        self.closing = False
        self.deadline_at = 0.0  # loop time after which expired() runs (0: none); see HttpServer.sweep
        self.reject: Response | None = None  # decided at headers: answer without the body
        self.in_message = False
        self.head_bytes = 0
        self.discarding = False  # answered already; reading the refused body to its end
        self.discarded = 0

    # -- connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        srv = self.server
        srv.connections.add(self)
        if len(srv.connections) > self.cfg.max_connections:
            srv.count(503)
            self.write(error(503, "too_many_connections",
                             f"more than {self.cfg.max_connections} open connections; retry later",
                             retry_after=self.cfg.retry_after, close=True))
            return
        self.deadline(self.cfg.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        self.deadline_at = 0.0

    def deadline(self, seconds: float | None) -> None:
        # a float per phase, not a timer handle: the server's sweep checks every
        # connection four times a second (a call_later per phase was 6 % of the
        # supervisor's time under single-event load)
        self.deadline_at = 0.0 if seconds is None else self.loop.time() + seconds

    def expired(self) -> None:
        """The current phase's deadline has passed."""
        self.deadline_at = 0.0
        if self.closing or self.transport is None:
            return
        if self.discarding:  # answered already; the refused body is taking too long
            self.closing = True
            self.transport.close()
        elif self.in_message:  # a slow client: cut it off, it costs others nothing
            self.server.slow_clients += 1
            self.server.count(408)
            self.write(error(408, "timeout", "the request's headers or body did not arrive in time", close=True))
        else:  # an idle keep-alive connection
            self.transport.close()
            self.closing = True

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _HeadTooLarge):
                self.fail(431, "headers_too_large", f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")
            else:
                self.fail(400, "bad_request", f"malformed HTTP request: {e}")
        except httptools.HttpParserUpgrade:
            self.fail(400, "upgrade_unsupported", "protocol upgrades are not supported")
        except httptools.HttpParserError as e:
            if self.reject is None:
                self.fail(400, "bad_request", f"malformed HTTP request: {e}")

    def fail(self, status: int, code: str, detail: str) -> None:
        self.server.count(status)
        self.queue.append(error(status, code, detail, close=True))
        self.pump()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self.in_message = True
        self.url = b""
        self.headers = {}
        self.body = []
        self.body_size = 0
        self.head_bytes = 0
        self.discarded = 0
        self.reject = None
        if not self.busy:
            self.deadline(self.cfg.header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools keeps no limit of its own: bound what a client may make us hold
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge
        n = name.decode("latin-1").lower()
        if n in _WANTED_HEADERS:
            self.headers[n] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if not self.busy:
            self.deadline(self.cfg.body_timeout)
        method = self.parser.get_method().decode("ascii", "replace")
        # decide what can be decided before the body arrives: size, type, auth
        rej = self.server.app.precheck(method, self.url, self.headers)
        if rej is not None:
            rej.close = True  # the body is not read: the connection cannot be reused
            self.reject = rej
            self.server.count(rej.status)
            self.queue.append(rej)
            self.pump()
            return
        if (self.headers.get("expect", "").lower() == "100-continue" and self.transport is not None
                and not self.busy and not self.queue):
            # only when no earlier answer is still owed on this connection: a 100 ahead
            # of it would break the order of responses (the client sends anyway, later)
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.reject is not None:
            self.discarded += len(body)
            if self.discarded > MAX_DISCARD and self.transport is not None:
                self.closing = True
                self.transport.close()
            return
        self.body_size += len(body)
        if self.body_size > self.cfg.max_body_bytes:  # chunked bodies have no Content-Length
            rej = error(413, "body_too_large", f"the body is larger than {self.cfg.max_body_bytes} bytes; split it", close=True)
            self.reject = rej
            self.server.count(413)
            self.body = []
            self.queue.append(rej)
            self.pump()
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        if self.reject is not None:
            if self.discarding and self.transport is not None:
                self.closing = True
                self.deadline(None)
                self.transport.close()
            return
        raw = self.url.decode("latin-1")
        path, _, query = raw.partition("?")
        req = Request(
            self.parser.get_method().decode("ascii", "replace"),
            unquote(path) if "%" in path else path,
            query,
            self.headers,
            b"".join(self.body) if len(self.body) != 1 else self.body[0],
            self.parser.should_keep_alive(),
        )
        self.body = []
        self.queue.append(req)
        if len(self.queue) > 8 and self.transport is not None:
            self.transport.pause_reading()  # a client pipelining too far ahead waits
        self.pump()

    # -- answering, in request order
    def pump(self) -> None:
        while self.queue and not self.busy and not self.closing:
            item = self.queue.popleft()
            if isinstance(item, Response):
                self.write(item)
                continue
            handler = self.server.app.route(item)
            res = handler(item)
            if isinstance(res, Response):
                self.finish(item, res)
            else:
                self.busy = True
                self.deadline(None)
                task = self.loop.create_task(res)
                self.server.tasks.add(task)
                task.add_done_callback(functools.partial(self.done, req=item))

    def done(self, task: asyncio.Task[Response], *, req: Request) -> None:
        self.server.tasks.discard(task)
        self.busy = False
        if task.cancelled():
            res = error(503, "shutting_down", "the server is stopping", close=True)
        elif task.exception() is not None:
            exc = task.exception()
            log.error("request handler failed: %r", exc, exc_info=exc)
            res = error(500, "internal", f"{type(exc).__name__}: {exc}")
        else:
            res = task.result()
        self.finish(req, res)
        if self.transport is not None and not self.closing and len(self.queue) <= 8:
            self.transport.resume_reading()
        self.pump()

    def finish(self, req: Request, res: Response) -> None:
        self.server.count(res.status, time.perf_counter() - req.started)
        if not req.keep_alive or self.server.stopping:
            res.close = True
        self.write(res)

    def write(self, res: Response) -> None:
        t = self.transport
        if t is None or self.closing:
            return
        extra = "".join(f"{k}: {v}\r\n" for k, v in res.headers) if res.headers else ""
        head = (
            f"HTTP/1.1 {res.status} {_REASONS.get(res.status, 'Unknown')}\r\n"
            f"Content-Type: {res.content_type}\r\nContent-Length: {len(res.body)}\r\n"
            f"{self.server.date()}{extra}"
            f"{'Connection: close' if res.close else 'Connection: keep-alive'}\r\n\r\n"
        )
        t.write(head.encode("latin-1") + res.body)
        if res.close and self.reject is res and self.in_message:
            # refused before its body was read: read the rest and drop it, then close
            # (closing now would reset the connection under a client still sending,
            # and it would never see the answer); bounded by the body deadline
            self.discarding = True
        elif res.close:
            self.closing = True
            self.deadline(None)
            t.close()
        elif not self.busy and not self.queue:
            # the next request may have started arriving while this one was handled
            self.deadline(self.cfg.header_timeout if self.in_message else self.cfg.keepalive_timeout)

    def idle(self) -> bool:
        """No request is being read or handled (safe to close at shutdown)."""
        return not self.busy and not self.queue and not self.in_message

    def close_if_idle(self) -> None:
        """At shutdown: close a connection that is between requests."""
        if self.idle() and self.transport is not None and not self.closing:
            self.closing = True
            self.transport.close()


MAX_HEAD_BYTES = 64 * 1024  # request line + headers
MAX_DISCARD = 16 << 20  # body bytes read and dropped after a refusal before cutting the connection


class _HeadTooLarge(Exception):
    """Raised inside a parser callback; httptools wraps it in HttpParserCallbackError."""


_WANTED_HEADERS = frozenset(
    {"content-type", "content-encoding", "content-length", "authorization", "accept", "expect", "transfer-encoding"}
)


class HttpServer:
    """The listening socket, its connections and the HTTP-level counters."""

    def __init__(self, app: App, cfg: ServerConfig) -> None:
        self.app = app
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task[Response]] = set()
        self.server: asyncio.base_events.Server | None = None
        self.stopping = False
        self.by_status: dict[int, int] = {}
        self.slow_clients = 0
        # request latency histogram (seconds), same bounds as the engine's, in seconds
        from ..stats import LATENCY_BOUNDS_MS

        self.bounds = [b / 1000.0 for b in LATENCY_BOUNDS_MS]
        self.lat_buckets = [0] * len(self.bounds)
        self.lat_sum = 0.0
        self._date = ("", 0)
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and listen; the bound port."""
        self.server = await self.loop.create_server(
            lambda: HttpProtocol(self), self.cfg.host, self.cfg.port, reuse_address=True, backlog=1024
        )
        sock = self.server.sockets[0]
        self._sweeper = self.loop.create_task(self.sweep())
        return int(sock.getsockname()[1])

    async def sweep(self, every: float = 0.25) -> None:
        """Run the deadlines of all connections (slow clients, idle keep-alives)."""
        while True:
            await asyncio.sleep(every)
            now = self.loop.time()
            for c in [c for c in self.connections if 0.0 < c.deadline_at <= now]:
                c.expired()

    def date(self) -> str:
        """The ``Date`` and ``Server`` header lines, formatted once per second."""
        now = int(time.time())
        if self._date[1] != now:
            self._date = (f"Date: {formatdate(now, usegmt=True)}\r\nServer: collector\r\n", now)
        return self._date[0]

    def count(self, status: int, latency: float | None = None) -> None:
        """Account one answer (and its latency, when it was a handled request)."""
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if latency is not None:
            self.lat_sum += latency
            self.lat_buckets[bisect.bisect_left(self.bounds, latency)] += 1  # the last bound is +inf

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections go on."""
        self.stopping = True
        if self.server is not None:
            self.server.close()

    async def drain(self, timeout: float) -> bool:
        """Wait for in-flight requests (bounded), then close every connection."""
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline:
            for c in list(self.connections):
                c.close_if_idle()
            if not self.tasks and all(c.idle() for c in self.connections):
                break
            await asyncio.sleep(0.02)
        clean = not self.tasks
        if self._sweeper is not None:
            self._sweeper.cancel()
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
        for t in list(self.tasks):
            t.cancel()
        return clean


# ---------------------------------------------------------------------- application
class App:
    """Routes and handlers. ``engine()`` gives the current (collector, coalescer):
    a reload swaps them, requests already running finish on the old pair."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.server: HttpServer | None = None
        self.tokens: frozenset[bytes] = frozenset()
        self.cfg: ServerConfig = daemon.config.server
        self._dec_batch = msgspec.json.Decoder(BatchRequest)
        self._reader: tuple[Any, _Reader] | None = None  # (pipeline, its reader): a reload may change it
        self.routes: dict[tuple[str, str], Callable[[Request], Any]] = {
            ("POST", "/events"): self.post_event,
            ("POST", "/events/batch"): self.post_batch,
            ("GET", "/metrics"): self.get_metrics,
            ("GET", "/metrics/prometheus"): self.get_prometheus,
            ("GET", "/health"): self.get_health,
            ("GET", "/ready"): self.get_ready,
            ("GET", "/openapi.json"): self.get_openapi,
        }
        self._paths = {p for _, p in self.routes}
        self._openapi: tuple[Any, Any, bytes] | None = None  # (pipeline, server config, document)
        self.configure(daemon.config)

    def configure(self, config: Any) -> None:
        """Apply the server options that can change on reload (limits, tokens)."""
        self.cfg = config.server
        self.tokens = frozenset(t.encode() for t in config.tokens())
        if self.server is not None:
            self.server.cfg = config.server

    def route(self, req: Request) -> Callable[[Request], Any]:
        h = self.routes.get((req.method, req.path))
        if h is not None:
            return h
        if req.path in self._paths:
            allow = ", ".join(sorted(m for m, p in self.routes if p == req.path))
            return lambda r: Response(405, _enc.encode(ErrorResponse("method_not_allowed", f"{r.method} is not allowed on {r.path}; use {allow}")), headers=[("Allow", allow)])
        return lambda r: error(404, "not_found", f"no route {r.method} {r.path}; see GET /openapi.json")

    def precheck(self, method: str, url: bytes, headers: dict[str, str]) -> Response | None:
        """Refuse before the body is read: size (Content-Length), media type, token."""
        path = url.split(b"?", 1)[0]
        if method != "POST" or path not in (b"/events", b"/events/batch"):
            return None
        if self.tokens:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            ok = False
            if scheme.lower() == "bearer" and token:
                t = token.strip().encode()
                for good in self.tokens:  # compare with every token: timing says nothing
                    ok |= hmac.compare_digest(t, good)
            if not ok:
                r = error(401, "unauthorized", "send `Authorization: Bearer <token>` with a configured token")
                r.headers.append(("WWW-Authenticate", 'Bearer realm="collector"'))
                return r
        cl = headers.get("content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                return error(400, "bad_request", f"Content-Length {cl!r} is not a number")
            if n > self.cfg.max_body_bytes:
                return error(413, "body_too_large",
                             f"the body has {n} bytes, more than max_body_bytes={self.cfg.max_body_bytes}; split it")
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return error(415, "unsupported_media_type",
                         f"Content-Type must be application/json (got {ctype or 'none'!r})")
        enc = headers.get("content-encoding", "").strip().lower()
        if enc not in _ENCODINGS:
            r = error(415, "unsupported_encoding",
                      f"Content-Encoding {enc!r} is not supported; send gzip, deflate or an uncompressed body")
            r.headers.append(("Accept-Encoding", "gzip, deflate"))  # RFC 9110 15.5.16
            return r
        return None

    # -- ingest
    def _decoded(self, req: Request) -> Response | None:
        """Undo ``Content-Encoding`` in place; the error answer if the body is refused."""
        wbits = _ENCODINGS[req.headers.get("content-encoding", "").strip().lower()]
        if wbits is None:
            return None
        limit = self.cfg.max_body_bytes
        try:
            req.body = _inflate(req.body, wbits, limit)
        except zlib.error as e:
            return error(400, "bad_encoding", f"the body is not valid {req.headers['content-encoding'].strip()}: {e}")
        except _TooLarge:
            return error(413, "body_too_large",
                         f"the body decompresses to more than max_body_bytes={limit} bytes; split it")
        return None

    def _check_body(self, body: bytes) -> Response | None:
        if not body.strip():
            return error(400, "malformed_json", "the body is empty; send a JSON object")
        d = json_depth(body, self.cfg.max_json_depth)
        if d > self.cfg.max_json_depth:
            return error(400, "too_deep", f"JSON nesting deeper than max_json_depth={self.cfg.max_json_depth}")
        return None

    def reader(self) -> _Reader:
        """The reader for the pipeline now running."""
        p = self.daemon.engine()[0].pipeline
        if self._reader is None or self._reader[0] is not p:
            self._reader = (p, _Reader(p))
        return self._reader[1]

    def _with_id(self, raw: msgspec.Raw | bytes, rd: _Reader) -> tuple[msgspec.Raw | bytes, Any, Any, str | None]:
        """(item, shard key, id, error) of one event; the id is generated when absent.

        Raises ``msgspec.DecodeError`` when ``raw`` is not JSON at all.
        """
        try:
            head = rd.one.decode(raw)
        except msgspec.ValidationError as e:
            return raw, None, None, str(e).split(" - at ")[0]
        items, ids, keys = rd.ids_and_keys([head], [raw])
        eid = ids[0]
        return items[0], keys[0], eid if type(eid) in _ID_TYPES else None, None

    async def _submit(self, items: list[Any], keys: list[Any]) -> Any:
        _, coalescer = self.daemon.engine()
        return await coalescer.submit(items, keys)

    def _overloaded(self, e: BaseException) -> Response:
        ra = max(1, int(getattr(e, "retry_after", self.cfg.retry_after) or self.cfg.retry_after))
        return error(503, "overloaded", f"{e}; retry after {ra} s", retry_after=ra)

    async def post_event(self, req: Request) -> Response:
        """``POST /events``: one event → 202 stored, 200 duplicate, 422 invalid."""
        bad = self._decoded(req) or self._check_body(req.body)
        if bad is not None:
            return bad
        try:
            # the head decoder reads the id and key and checks the whole body is JSON
            item, key, eid, why = self._with_id(req.body, self.reader())
        except msgspec.DecodeError as e:
            return error(400, "malformed_json", f"the body is not valid JSON: {e}")
        if why is not None:
            self.daemon.rejected += 1
            return error(422, "invalid", f"{why}: the body must be one event object", path="$")
        if self.daemon.stopping:
            return error(503, "shutting_down", "the server is stopping", retry_after=self.cfg.retry_after)
        try:
            res = await self._submit([item], [key])
        except (Overloaded, CollectorClosed) as e:
            return self._overloaded(e)
        if res.errors:
            err = res.errors[0]
            if err.kind == "duplicate":
                return Response(200, _enc.encode(EventResponse("duplicate", eid)))
            if err.kind == "invalid":
                return Response(422, _enc.encode(EventResponse("invalid", eid, err.path, err.reason)))
            return Response(503, _enc.encode(EventResponse("failed", eid, err.path, err.reason)),
                            headers=[("Retry-After", str(self.cfg.retry_after))])
        return Response(202, _enc.encode(EventResponse("accepted", eid)))

    async def post_batch(self, req: Request) -> Response:
        """``POST /events/batch``: ``{"events": [...]}`` → per-item results."""
        bad = self._decoded(req) or self._check_body(req.body)
        if bad is not None:
            return bad
        try:
            env = self._dec_batch.decode(req.body)
        except msgspec.ValidationError as e:
            msg = str(e)
            reason, _, path = msg.partition(" - at ")
            return error(422, "invalid", f"{reason}; send {{\"events\": [...]}}", path=path.strip("`") or "$")
        except msgspec.DecodeError as e:
            return error(400, "malformed_json", f"the body is not valid JSON: {e}")
        raws = env.events
        if len(raws) > self.cfg.max_batch_items:
            return error(413, "too_many_events",
                         f"{len(raws)} events in one batch, more than max_batch_items={self.cfg.max_batch_items}; split it",
                         path="$.events")
        rd = self.reader()
        try:
            # every item's id and key in one C pass, when all items are objects
            heads: list[Any] | None = rd.many.decode(req.body).events
        except msgspec.ValidationError:
            heads = None  # some item is not an object: the loop below says which
        results: list[ItemResult]
        items: list[Any]
        keys: list[Any]
        where: list[int] | range
        if heads is not None:
            items, ids, keys = rd.ids_and_keys(heads, raws)
            results = [ItemResult(i, "accepted", k if type(k) in _ID_TYPES else None) for i, k in enumerate(ids)]
            where = range(len(items))
        else:
            results, items, keys, where = [], [], [], []
            for i, raw in enumerate(raws):
                item, key, eid, why = self._with_id(raw, rd)
                if why is not None:  # not an object: no worker could read it
                    self.daemon.rejected += 1
                    results.append(ItemResult(i, "invalid", None, f"$.events[{i}]", why))
                else:
                    results.append(ItemResult(i, "accepted", eid))
                    items.append(item)
                    keys.append(key)
                    where.append(i)
        if items:
            if self.daemon.stopping:
                return error(503, "shutting_down", "the server is stopping", retry_after=self.cfg.retry_after)
            try:
                res = await self._submit(items, keys)
            except (Overloaded, CollectorClosed) as e:
                return self._overloaded(e)
            for err in res.errors:
                i = where[err.index]
                r = results[i]
                r.status = "failed" if err.kind not in ("invalid", "duplicate") else err.kind
                if err.kind != "duplicate":
                    r.path = f"$.events[{i}]" + err.path[1:]
                    r.reason = err.reason
        counts = {"accepted": 0, "duplicate": 0, "invalid": 0, "failed": 0}
        for r in results:
            counts[r.status] += 1
        body = _enc.encode(BatchResponse(counts["accepted"], counts["duplicate"], counts["invalid"], counts["failed"], results))
        if counts["failed"] and not (counts["accepted"] or counts["duplicate"]):
            return Response(503, body, headers=[("Retry-After", str(self.cfg.retry_after))])
        # a well-formed batch is answered per item, even when no item was valid: the
        # envelope was right, and `results` says what was wrong with each event
        return Response(202, body)

    # -- metrics and health
    def get_metrics(self, req: Request) -> Response:
        """JSON unless the client asks for Prometheus text (``Accept: text/plain``/OpenMetrics)."""
        accept = req.headers.get("accept", "")
        if "text/plain" in accept or "openmetrics" in accept:
            return self.get_prometheus(req)
        return Response(200, _enc.encode(self.daemon.metrics()))

    def get_prometheus(self, req: Request) -> Response:
        """Prometheus text exposition 0.0.4."""
        from .promtext import render

        return Response(200, render(self.daemon, self.server).encode(), content_type="text/plain; version=0.0.4; charset=utf-8")

    def get_health(self, req: Request) -> Response:
        """Liveness: the supervisor answers and its workers are alive with fresh heartbeats."""
        h = self.daemon.health()
        return Response(200 if h.status == "ok" else 503, _enc.encode(h))

    async def get_ready(self, req: Request) -> Response:
        """Readiness: workers up and every sink reachable."""
        h = await self.daemon.ready()
        return Response(200 if h.status == "ready" else 503, _enc.encode(h))

    def get_openapi(self, req: Request) -> Response:
        """The OpenAPI 3.1 document, generated from the Structs above and the pipeline's event."""
        p = self.daemon.engine()[0].pipeline
        if self._openapi is None or self._openapi[0] is not p or self._openapi[1] is not self.cfg:
            from .openapi import document

            self._openapi = (p, self.cfg, _enc.encode(document(self.cfg, p.event_type)))
        return Response(200, self._openapi[2])
