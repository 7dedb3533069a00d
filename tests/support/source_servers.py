"""A real aiohttp test service with fault modes, run on a thread of its own.

::

    GET  /v/<key>            {"data": {"value": "v-<key>"}}     (404 for keys starting "missing")
    GET  /batch?ids=a,b,c    {"data": {"a": {"value": "v-a"}, ...}}   (missing keys left out)
    POST /batch {"ids": [...]}  the same

``mode`` switches every answer to a fault: ``slow`` (``delay`` seconds first), ``500``,
``badjson``, ``huge`` (2 MiB), ``trickle`` (a byte every 0.2 s), ``shape`` (valid JSON,
wrong shape). ``requests`` and ``keys_per_request`` count what arrived. Workers of a
``Collector`` reach it over TCP like any service.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from collector.sources.local_service import serve_on_thread


def free_port() -> int:
    """A port nothing listens on (for the "connection refused" case)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultServer:
    """See the module docstring."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay = 0.0
        self.requests = 0
        self.keys_per_request: list[int] = []
        self.values: dict[str, Any] = {}
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def value(self, key: str) -> Any:
        return self.values.get(key, f"v-{key}")

    async def answer(self, request: web.Request, doc: Any) -> web.StreamResponse:
        mode = self.mode
        if mode == "slow" or self.delay:
            await asyncio.sleep(self.delay)
        if mode == "500":
            return web.Response(status=500, text="boom")
        if mode == "badjson":
            return web.Response(body=b'{"data": {"value": ', content_type="application/json")
        if mode == "huge":
            return web.Response(body=b'{"pad": "' + b"x" * (2 << 20) + b'"}', content_type="application/json")
        if mode == "shape":
            return web.json_response(["not", "an", "object"])
        if mode == "trickle":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            for b in b'{"data": {"value": "late"}}':
                await resp.write(bytes([b]))
                await asyncio.sleep(0.2)
            return resp
        return web.json_response(doc)

    async def one(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.keys_per_request.append(1)
        key = request.match_info["key"]
        if key.startswith("missing") and self.mode == "ok":
            return web.json_response({"error": "no such key"}, status=404)
        return await self.answer(request, {"data": {"value": self.value(key)}})

    async def batch(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if request.method == "POST":
            keys = [str(k) for k in (await request.json())["ids"]]
        else:
            keys = request.query.get("ids", "").split(",")
        self.keys_per_request.append(len(keys))
        data = {k: {"value": self.value(k)} for k in keys if not k.startswith("missing")}
        return await self.answer(request, {"data": data})

    @contextmanager
    def running(self) -> Iterator[FaultServer]:
        app = web.Application()
        app.router.add_get("/v/{key}", self.one)
        app.router.add_get("/batch", self.batch)
        app.router.add_post("/batch", self.batch)
        runner = web.AppRunner(app, handle_signals=False)

        async def start() -> None:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.port = runner.addresses[0][1]

        with serve_on_thread(start, runner.cleanup, "fault-server"):
            yield self
