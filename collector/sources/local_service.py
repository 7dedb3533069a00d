"""Built-in local HTTP services (the rates and auth services): one small server for both.

::

    LocalService subclass: async answer(method, target, headers, body) -> (status, bytes)
      .start() / .close()        on the caller's loop (close also ends kept-alive connections)
      .running()                 on a thread of its own for a ``with`` block (serve_on_thread)
      .shared()                  one started instance per process, kept for its life (the
                                 daemon's built-in service when no URL is configured)
      .serve_forever(port_file)  in the foreground until SIGTERM / SIGINT (the CLI commands)

stdlib asyncio only: HTTP/1.1 keep-alive, ``Content-Length`` bodies up to 64 KiB, JSON
answers. For tests, the demo and machines without the real service; not a web server.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, ClassVar, TypeVar

__all__ = ["LocalService", "serve_on_thread"]

_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found", 503: b"Service Unavailable"}
_MAX_BODY = 65536
S = TypeVar("S", bound="LocalService")


@contextlib.contextmanager
def serve_on_thread(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]], name: str, timeout: float = 10.0
) -> Iterator[None]:
    """Run a server on an event loop of its own thread for the ``with`` block (bounded start and stop)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(stop())
        loop.close()

    th = threading.Thread(target=run, name=name, daemon=True)
    th.start()
    if not ready.wait(timeout):
        raise RuntimeError(f"{name} did not start within {timeout}s")
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        th.join(timeout)


class LocalService:
    """A tiny HTTP/1.1 server on ``host:port`` (0: a free port) answering with :meth:`answer`."""

    name = "local-service"
    _shared: ClassVar[dict[type, tuple[Any, Any]]] = {}

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests = 0  # every request served
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[Any]] = set()  # open connections, ended by close()

    async def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """The status and JSON body for one request (``headers`` have lower-case names)."""
        raise NotImplementedError

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                                     ValueError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    method, target, _ = lines[0].split(" ", 2)
                    headers = {}
                    for line in lines[1:]:
                        name, sep, value = line.partition(":")
                        if sep:
                            headers[name.strip().lower()] = value.strip()
                    n = int(headers.get("content-length", "0") or 0)
                    if n > _MAX_BODY:
                        break
                    body = await reader.readexactly(n) if n else b""
                    self.requests += 1
                    status, out = await self.answer(method, target, headers, body)
                    writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (status, _REASONS.get(status, b"Error"), len(out), out))
                    await writer.drain()
        finally:
            writer.close()

    async def start(self) -> None:
        """Listen (on a free port when ``port`` is 0)."""
        self.server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and end the open connections."""
        if self.server is not None:
            self.server.close()
            for t in list(self.handlers):  # kept-alive connections: Python 3.11 does not end them
                t.cancel()
            if self.handlers:
                await asyncio.wait(self.handlers, timeout=5)
            await self.server.wait_closed()

    def running(self, timeout: float = 10.0) -> contextlib.AbstractContextManager[None]:
        """Serve on a thread of its own for the ``with`` block."""
        return serve_on_thread(self.start, self.close, self.name, timeout)

    @classmethod
    def shared(cls: type[S]) -> S:
        """This class's instance for the whole process: started on first use on a free
        127.0.0.1 port, on a thread of its own, and kept for the process's life."""
        got = LocalService._shared.get(cls)
        if got is None:
            svc = cls()
            cm = svc.running()
            cm.__enter__()
            got = LocalService._shared[cls] = (svc, cm)
        svc = got[0]
        assert isinstance(svc, cls)
        return svc

    def serve_forever(self, banner: str, port_file: str | None = None) -> int:
        """Serve in the foreground until SIGTERM or SIGINT, printing ``banner`` (formatted
        with the service) once listening; 0, or 1 when the address is taken."""

        async def serve() -> int:
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            try:
                await self.start()
            except OSError as e:
                print(f"{self.name}: cannot listen on {self.host}:{self.port}: {e}", file=sys.stderr)
                return 1
            if port_file:
                with open(port_file, "w") as f:
                    f.write(f"{self.port}\n")
            print(banner.format(svc=self), flush=True)
            await stop.wait()
            await self.close()
            print(f"{self.name} stopped after {self.requests} request(s)", file=sys.stderr, flush=True)
            return 0

        return asyncio.run(serve())
