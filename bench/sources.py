"""Enrichment sources in one worker's loop: ``python bench/sources.py [--events N] [--keys K]``.

A benchmark, not a test; run it briefly. Two figures, both through the worker's real
``Enricher`` in one process (no supervisor, no sinks):

* ``http``: an aiohttp service (in this process) answering after ``--latency``
  seconds, the source with batch mode off and on, a cold cache: wall time, CPU time
  (client and server), requests, and the bound ``max(latency x ceil(distinct keys /
  (concurrency x keys per call)), CPU time)``.
* ``warm``: a warm local cache, the source path against the client-method path
  (``Lookup(method=...)``): events/s of the fill pass, chunks of 1,000 events.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
from aiohttp import web

from collector.pipeline import Lookup
from collector.sources.client import ClientSource
from collector.sources.config import HttpBatch, ResilienceConfig
from collector.sources.http import HttpSource
from collector.sources.runtime import Enricher, LookupRuntime, SourceRuntime


class Ev(msgspec.Struct):
    id: int
    k: str
    out: Any = None


def chunks(n: int, keys: int, size: int = 1000) -> list[list[Ev]]:
    evs = [Ev(i, f"k{(i * 7919) % keys}") for i in range(n)]
    return [evs[i : i + size] for i in range(0, n, size)]


async def http_case(n: int, keys: int, latency: float, batch: bool, concurrency: int) -> dict[str, Any]:
    requests = [0]

    async def one(req: web.Request) -> web.Response:
        requests[0] += 1
        await asyncio.sleep(latency)
        return web.json_response({"value": req.match_info["key"]})

    async def many(req: web.Request) -> web.Response:
        requests[0] += 1
        await asyncio.sleep(latency)
        return web.json_response({k: {"value": k} for k in req.query["ids"].split(",")})

    app = web.Application()
    app.router.add_get("/v/{key}", one)
    app.router.add_get("/batch", many)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    res = ResilienceConfig(timeout=30, concurrency=concurrency, breaker_failures=0)
    per_call = 100 if batch else 1
    if batch:
        src = HttpSource(url=f"http://127.0.0.1:{port}/batch", value_path="value",
                         batch=HttpBatch(max_keys=per_call), resilience=res, connections=concurrency)
    else:
        src = HttpSource(url=f"http://127.0.0.1:{port}/v/{{key}}", value_path="value",
                         resilience=res, connections=concurrency)
    rt = SourceRuntime(Lookup(name="x", key="k", target="out", source=src), src)
    en = Enricher([rt])
    cs = chunks(n, keys)
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(en.enrich(c) for c in cs))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await rt.close()
    await runner.cleanup()
    assert all(e.out == e.k for c in cs for e in c)
    # without batching the source cuts a chunk's misses into calls of 256 keys, each
    # sending its keys' requests at once through `concurrency` connections
    bound = latency * math.ceil(keys / (concurrency * per_call))
    # the bound is max(latency bound, CPU time); CPU here includes the in-process
    # server's share, so the ratio against it is on the kind side
    bound = max(bound, cpu)
    return {"case": f"http batch={'on' if batch else 'off'}", "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "requests": requests[0], "bound_s": round(bound, 3), "ratio": round(wall / bound, 2)}


async def warm_case(n: int, keys: int) -> list[dict[str, Any]]:
    data = {f"k{i}": f"v{i}" for i in range(keys)}

    class Client:
        async def get(self, k: str) -> str | None:
            return data.get(k)

    out = []
    with ThreadPoolExecutor(1) as ex:
        src = ClientSource.of(Client(), "get")
        rts: dict[str, Any] = {
            "client method": LookupRuntime(Lookup("x", "k", "out", "get"), Client().get, ex),
            "source": SourceRuntime(Lookup(name="x", key="k", target="out", source=src), src),
        }
        for name, rt in rts.items():
            en = Enricher([rt])
            cs = chunks(n, keys)
            for c in cs:  # warm
                await en.enrich(c)
            t0 = time.perf_counter()
            for c in cs:
                await en.enrich(c)
            dt = time.perf_counter() - t0
            out.append({"case": f"warm {name}", "events_per_s": round(n / dt)})
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--keys", type=int, default=4_000)
    ap.add_argument("--latency", type=float, default=0.002)
    ap.add_argument("--concurrency", type=int, default=64)
    a = ap.parse_args()
    for batch in (False, True):
        print(await http_case(a.events, a.keys, a.latency, batch, a.concurrency))
    for row in await warm_case(a.events * 5, a.keys):
        print(row)


if __name__ == "__main__":
    asyncio.run(main())
