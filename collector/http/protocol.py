"""The transport: an asyncio protocol on httptools, in the supervisor.

::

    socket ─► HttpProtocol (httptools, C parser)
               │ header deadline, body deadline, keep-alive idle deadline (HttpServer.sweep)
               │ app.precheck(method, url, headers): refuse before the body is read
               │ pipelined requests queue up; answers go out in request order
               ▼
              app.route(request)(request) ─► Response, or a task that gives one
               ▼
    socket ◄── status line, Date/Server, Content-Length, keep-alive or close

Nothing here knows a route: the application is anything with ``precheck`` and
``route`` (:class:`Application`; the daemon's is :class:`collector.http.app.App`).
:class:`HttpServer` owns the listening socket, its connections, the HTTP-level
counters (answers by status, request latency, slow clients) and the drain at shutdown.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

import httptools

from ..stats import LATENCY_BOUNDS_MS
from .schemas import ErrorResponse, json_encoder

if TYPE_CHECKING:
    from ..config import ServerConfig

__all__ = ["Application", "Deferred", "Handler", "HttpProtocol", "HttpServer", "Request", "Response", "error"]

log = logging.getLogger("collector.server")

_REASONS = {
    200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
    415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}


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


def error(status: int, code: str, detail: str, *, path: str | None = None, retry_after: int | None = None, close: bool = False) -> Response:
    """A JSON error response (with ``Retry-After`` when ``retry_after`` is set)."""
    headers = [("Retry-After", str(retry_after))] if retry_after is not None else None
    body = json_encoder.encode(ErrorResponse(code, detail, path, retry_after))
    return Response(status, body, headers=headers, close=close)


class Deferred:
    """An answer that waits for a future: ``then(fut)`` makes it once ``fut`` is done.

    What the ingest routes return: the connection answers from ``fut``'s done
    callback, where a coroutine would need a task per request and two more loop turns
    (the task's step when the future is done, then its own done callback). ``then``
    calls ``fut.result()`` and turns what it raises into its answer; anything else it
    raises is answered 500, as a failed coroutine is.
    """

    __slots__ = ("fut", "then")

    def __init__(self, fut: asyncio.Future[Any], then: Callable[[asyncio.Future[Any]], Response]) -> None:
        self.fut = fut
        self.then = then


Handler = Callable[[Request], Response | Deferred | Coroutine[Any, Any, Response]]
"""A route: answers at once, gives a :class:`Deferred`, or a coroutine whose result is the answer."""


class Application(Protocol):
    """What the transport asks of the application."""

    def precheck(self, method: str, url: bytes, headers: dict[str, str]) -> Response | None:
        """An answer that refuses the request before its body is read, or None."""
        ...

    def route(self, req: Request) -> Handler:
        """The handler for ``req`` (404 and 405 included)."""
        ...


class HttpProtocol(asyncio.Protocol):
    """One connection: parse with httptools, enforce deadlines and limits, answer in order."""

    def __init__(self, server: HttpServer) -> None:
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
                continue
            self.busy = True
            self.deadline(None)
            if isinstance(res, Deferred):
                fut, then = res.fut, res.then
            else:
                fut, then = self.loop.create_task(res), _result
            self.server.tasks.add(fut)
            fut.add_done_callback(functools.partial(self.done, req=item, then=then))

    def done(
        self, fut: asyncio.Future[Any], *, req: Request, then: Callable[[asyncio.Future[Any]], Response]
    ) -> None:
        self.server.tasks.discard(fut)
        self.busy = False
        if fut.cancelled():
            res = error(503, "shutting_down", "the server is stopping", close=True)
        else:
            try:
                res = then(fut)
            except Exception as exc:
                log.error("request handler failed: %r", exc, exc_info=exc)
                res = error(500, "internal", f"{type(exc).__name__}: {exc}")
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
            # refused before its body was read: a lingering close, as nginx does. Closing
            # now, with the client's bytes unread, would make the kernel reset the
            # connection under a client still sending, and it would never read the
            # answer. So: send FIN after the answer (nothing more comes from us), read
            # and drop the rest of the body, close when it ends; bounded by the body
            # deadline and MAX_DISCARD bytes
            self.discarding = True
            if t.can_write_eof():
                t.write_eof()
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


def _result(fut: asyncio.Future[Response]) -> Response:
    """A coroutine handler's answer: its task's result."""
    return fut.result()


MAX_HEAD_BYTES = 64 * 1024  # request line + headers
MAX_DISCARD = 1 << 30  # body bytes read and dropped after a refusal before cutting the connection


class _HeadTooLarge(Exception):
    """Raised inside a parser callback; httptools wraps it in HttpParserCallbackError."""


_WANTED_HEADERS = frozenset(
    {"content-type", "content-encoding", "content-length", "authorization", "accept", "expect", "transfer-encoding"}
)


class HttpServer:
    """The listening socket, its connections and the HTTP-level counters."""

    def __init__(self, app: Application, cfg: ServerConfig) -> None:
        self.app = app
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Future[Any]] = set()  # requests being handled: tasks and deferred answers
        self.server: asyncio.base_events.Server | None = None
        self.stopping = False
        self.by_status: dict[int, int] = {}
        self.slow_clients = 0
        # request latency histogram (seconds), same bounds as the engine's, in seconds
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
