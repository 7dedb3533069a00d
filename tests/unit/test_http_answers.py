"""The HTTP layer's ways to answer: at once, a Deferred (a future and what to make of
it), or a coroutine; each in request order on a keep-alive connection, a handler that
fails answers 500 without closing the connection, and a request still waiting at the
end of the drain is answered 503."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from collector.config import ServerConfig
from collector.http.protocol import Deferred, HttpServer, Request, Response


class App:
    """Routes by path: /now, /later?ms (Deferred), /coro?ms (coroutine), /broken, /never."""

    def __init__(self) -> None:
        self.waiting: asyncio.Future[Any] | None = None

    def precheck(self, method: str, url: bytes, headers: dict[str, str]) -> Response | None:
        return None

    def route(self, req: Request) -> Any:
        return getattr(self, req.path.strip("/"))

    def now(self, req: Request) -> Response:
        return Response(200, b'{"via":"now"}')

    def later(self, req: Request) -> Deferred:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_later(int(req.query) / 1000, fut.set_result, req.query)
        return Deferred(fut, lambda f: Response(200, json.dumps({"via": "later", "ms": f.result()}).encode()))

    async def coro(self, req: Request) -> Response:
        await asyncio.sleep(int(req.query) / 1000)
        return Response(200, json.dumps({"via": "coro", "ms": req.query}).encode())

    def broken(self, req: Request) -> Deferred:
        fut = asyncio.get_running_loop().create_future()
        fut.set_exception(KeyError("gone"))
        return Deferred(fut, lambda f: Response(200, repr(f.result()).encode()))  # result() raises

    def never(self, req: Request) -> Deferred:
        self.waiting = asyncio.get_running_loop().create_future()
        return Deferred(self.waiting, lambda f: Response(200, b"{}"))


async def _exchange(port: int, paths: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """Pipeline ``paths`` as GETs on one connection; the (status, JSON body) answers in order."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths))
    out = []
    for _ in paths:
        status = int((await r.readline()).split()[1])
        length = 0
        while (line := await r.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        out.append((status, json.loads(await r.readexactly(length))))
    w.close()
    return out


def test_immediate_deferred_and_coroutine_answers_keep_request_order_and_failures_answer_500() -> None:
    async def main() -> None:
        server = HttpServer(App(), ServerConfig(port=0))
        port = await server.start()
        try:
            got = await asyncio.wait_for(
                _exchange(port, ["/later?60", "/now", "/coro?30", "/broken", "/later?0", "/now"]), 10)
        finally:
            server.stop_accepting()
            await server.drain(1.0)
        assert [s for s, _ in got] == [200, 200, 200, 500, 200, 200]
        assert [b.get("via") for _, b in got] == ["later", "now", "coro", None, "later", "now"]
        assert got[0][1]["ms"] == "60" and got[2][1]["ms"] == "30"
        assert got[3][1]["error"] == "internal" and "KeyError" in got[3][1]["detail"]
        assert server.by_status == {200: 5, 500: 1}
        assert not server.tasks

    asyncio.run(main())


def test_a_deferred_answer_still_waiting_when_the_drain_ends_is_answered_503() -> None:
    async def main() -> None:
        app = App()
        server = HttpServer(app, ServerConfig(port=0))
        port = await server.start()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
        await w.drain()
        for _ in range(200):  # bounded: until the server holds the request
            if server.tasks:
                break
            await asyncio.sleep(0.01)
        assert server.tasks, "the request never reached its handler"
        server.stop_accepting()
        clean = await server.drain(0.2)
        assert not clean and app.waiting is not None and app.waiting.cancelled()
        await asyncio.sleep(0)  # the cancelled future's callback answers
        assert server.by_status == {503: 1}
        assert await asyncio.wait_for(r.read(), 5) == b"", "the drain closes the connection"
        w.close()
        await asyncio.sleep(0)

    asyncio.run(main())
