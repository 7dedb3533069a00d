"""Loopback HTTP load generator for ``collector serve``: ``python bench/http_load.py``.

It starts the daemon itself (``python -m collector serve --port 0 --data-dir TMP``,
its own session, stopped with SIGTERM) or hits a running one (``--target URL``), and
runs, in client processes separate from the server:

* **batched**: N keep-alive connections POST ``/events/batch`` with 100 events each,
  closed loop, for D seconds -> accepted events/s (non-2xx counted apart);
* **single max**: closed loop of ``POST /events`` -> the maximum accepted requests/s;
* **single 50 %**: open loop at half of that rate on a fixed arrival schedule. Latency
  is measured from each request's *scheduled* send time, so a server that stalls
  cannot hide its queue by slowing the client down (coordinated omission);
* **peer batched** (default on when uvicorn is installed, off with ``--no-peer``): the
  same batched load against what a Python user would deploy instead, a plain ASGI app
  under ``uvicorn --workers 2`` that validates the same body with the same Struct and
  appends it to a JSONL file (``collector.benchmarks.asgi_peer``), in the same rounds;
  the ratio collector ÷ peer is printed and written;
* **floor** (default on, off with ``--quick``): the same clients against a canned
  do-nothing server in its own process, for the client's ceiling and the latency
  floor the machine itself gives at the same rate.

Rounds alternate the scenarios; figures are medians over rounds
(``--restart-each-round``: a fresh daemon per round). Without ``--ids`` events carry
no id (the daemon generates them); with it each event gets a new one.

The clients are raw asyncio (uvloop) protocols sending pre-encoded requests; they read
only the status line and Content-Length (and, for batches, the body's accepted count).
Client CPU, server CPU (the daemon's process tree) and the whole machine's busy CPU
are reported for every run, so a reader can tell which side saturated. ``--wrk``
cross-checks the closed-loop figures with ``wrk`` (Debian package) and a Lua script.
``--profile DIR`` attaches py-spy to the daemon in extra runs that are not counted.

Every wait and loop is bounded; traffic goes only to 127.0.0.1. ``--quick`` takes
well under a minute; the default (3 alternating rounds, medians) a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import psutil

from collector.benchmarks.asgi_peer import PeerServer, uvicorn_missing
from collector.benchmarks.servers import HOST, ServerProcess, http_get

ROOT = Path(__file__).resolve().parent.parent

# ============================================================================ payloads

TYPES = ("user_action", "sensor_data", "system_log")
SOURCES = ("web", "mobile", "iot_device", "system")
ACTIONS = ("login", "purchase", "click", "error")


def make_event(rng: random.Random, users: int) -> dict[str, Any]:
    """One seed-004 event without ``id`` and ``timestamp`` (the server fills both).

    No id on purpose: the same pre-encoded bodies are sent again and again, and ids
    would turn every repeat into a duplicate instead of an accepted event.
    """
    return {
        "type": rng.choice(TYPES),
        "source": rng.choice(SOURCES),
        "user_id": f"u{rng.randrange(users)}",
        "data": {"action": rng.choice(ACTIONS), "value": round(rng.uniform(0, 500), 2), "metadata": {}},
    }


def build_request(path: str, body: bytes, port: int, token: str | None) -> bytes:
    """A complete HTTP/1.1 keep-alive POST, encoded once before the run."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n")
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    return head.encode() + b"\r\n" + body


# with --ids every event carries this slot; each client process writes its own random
# prefix and a counter into it before sending, so every id is new (fixed width: the
# Content-Length of the pre-encoded request does not change)
ID_SLOT = "00000000-0000-7000-8000-000000000000"


def make_requests(kind: str, port: int, batch: int, users: int, token: str | None, count: int = 64,
                  seed: int = 4, ids: bool = False, payload: str = "generic",
                  tokens: dict[str, str] | None = None) -> tuple[list[bytes], list[bytes]]:
    """``count`` distinct pre-encoded requests (and their bodies) for ``batched`` or ``single``.

    ``payload="clickstream"``: seed 002's sessions (``collector.clickstream.SessionStream``,
    ``tokens`` as the users' tokens), without ids."""
    rng = random.Random(seed)
    bodies = []
    make = lambda: make_event(rng, users)  # noqa: E731
    if payload == "clickstream":
        from collector.clickstream import SessionStream

        stream = SessionStream(seed=seed, tokens=tokens)

        def make() -> dict[str, Any]:
            e = stream.take(1)[0]
            del e["id"]
            return e

    def event() -> dict[str, Any]:
        return {"id": ID_SLOT, **make()} if ids else make()

    for _ in range(count):
        if kind == "batched":
            bodies.append(msgspec.json.encode({"events": [event() for _ in range(batch)]}))
        else:
            bodies.append(msgspec.json.encode(event()))
    path = "/events/batch" if kind == "batched" else "/events"
    return [build_request(path, b, port, token) for b in bodies], bodies


class _Counts(msgspec.Struct):
    """The count fields of a batch response; msgspec skips the per-item results unread."""

    accepted: int | None = None


_counts = msgspec.json.Decoder(_Counts)


def accepted_in(body: bytes | None, n: int) -> int:
    """Accepted events in a 2xx batch response; ``n`` when the body does not say.

    The daemon answers ``{"accepted": N, ..., "results": [...]}``; reading only the count
    keeps the client's cost per response small. Other shapes: per-item results whose
    ``status`` is ``accepted`` are counted.
    """
    if not body:
        return n
    try:
        c = _counts.decode(body)
    except msgspec.DecodeError:
        return n
    if c.accepted is not None:
        return c.accepted
    d = msgspec.json.decode(body)
    items = d.get("results", d.get("items")) if isinstance(d, dict) else None
    if isinstance(items, list):
        return sum(1 for it in items if (it.get("status") if isinstance(it, dict) else it) == "accepted")
    return n


# ============================================================================ client


class _Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight (no pipelining)."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # the start of a response split across segments
        self.close_after = False
        self.t_send = 0.0
        self.sched = 0.0
        self.busy = False
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        self.run.on_lost(self)

    def send(self, req: bytes, sched: float) -> None:
        """Write one request; ``sched`` is when it should have gone (open loop) or now."""
        self.busy = True
        self.sched = sched
        self.t_send = time.perf_counter()
        assert self.transport is not None
        self.transport.write(req)

    def data_received(self, data: bytes) -> None:
        if self.buf:  # rare: the previous segment ended inside a response
            self.buf += data
            data = bytes(self.buf)
            self.buf.clear()
        pos, n = 0, len(data)
        # bounded: each pass consumes one whole response or keeps the rest for the next segment
        for _ in range(1000):
            i = data.find(b"\r\n\r\n", pos)
            if i < 0:
                break
            head = data[pos:i].lower()
            j = head.find(b"\ncontent-length:")
            if j >= 0:
                k = head.find(b"\r", j + 16)
                end = i + 4 + int(head[j + 16 : k if k >= 0 else len(head)])
            elif b"transfer-encoding: chunked" in head:  # rare: wait for the last chunk
                k = data.find(b"0\r\n\r\n", i + 4)
                if k < 0:
                    break
                end = k + 5
            else:
                end = i + 4
            if end > n:
                break
            self.close_after = b"\nconnection: close" in head
            self.busy = False
            self.run.on_response(self, int(head[9:12]), data[i + 4 : end] if self.run.want_body else None)
            if self.close_after and self.transport is not None:
                self.transport.close()
            pos = end
            if pos >= n:
                return
        self.buf += data[pos:]


class _Run:
    """One client process's share of one run: its connections, schedule and counters."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.reqs: list[bytes] = spec["reqs"]
        self.seq = 0
        self.id_offsets: list[list[int]] | None = None
        if spec.get("ids"):
            # where the id slots are, and a random prefix for this process and run
            slot, prefix = ID_SLOT.encode(), os.urandom(4).hex().encode()
            self.id_offsets, reqs = [], []
            for req in self.reqs:
                offs, j = [], req.find(slot)
                while j >= 0:
                    offs.append(j)
                    j = req.find(slot, j + len(slot))
                b = bytearray(req)
                for o in offs:
                    b[o : o + 8] = prefix
                self.id_offsets.append(offs)
                reqs.append(bytes(b))
            self.reqs = reqs
        self.n_per_req: int = spec["events_per_request"]
        self.want_body = spec["kind"] == "batched"
        self.mode: str = spec["mode"]
        self.rate: float = spec.get("rate", 0.0)
        self.offset: float = spec.get("offset", 0.0)
        self.port: int = spec["port"]
        self.nconn: int = spec["connections"]
        self.duration: float = spec["duration"]
        self.grace: float = spec.get("grace", 5.0)
        self.t0 = 0.0
        self.deadline = 0.0
        self.i = 0
        self.ok_in_window = 0
        self.events_in_window = 0
        self.responses = 0
        self.status: collections.Counter[int] = collections.Counter()
        self.lat = array("d")  # seconds, responses completed to requests sent (or scheduled) in the window
        self.lag = array("d")  # open loop: send time minus scheduled time
        self.late = array("d")  # open loop: scheduler wake-up lateness
        self.conns: list[_Conn] = []
        self.idle: collections.deque[_Conn] = collections.deque()
        self.pending: collections.deque[float] = collections.deque()
        self.max_pending = 0
        self.lost_in_flight = 0
        self.reconnects = 0
        self.issued = 0
        self.total = 0
        self.t0s = 0.0
        self.stopping = False

    # ---------------------------------------------------------------- callbacks

    def _next(self) -> bytes:
        self.i += 1
        k = self.i % len(self.reqs)
        offs = self.id_offsets[k] if self.id_offsets else None
        if not offs:
            return self.reqs[k]
        b = bytearray(self.reqs[k])
        seq = self.seq
        for o in offs:
            seq += 1
            b[o + 24 : o + 36] = b"%012x" % seq
        self.seq = seq
        return bytes(b)

    def on_response(self, c: _Conn, status: int, body: bytes | None) -> None:
        """Count the response, then keep the connection busy (closed) or serve the queue (open)."""
        now = time.perf_counter()
        self.responses += 1
        self.status[status] += 1
        in_window = c.sched < self.deadline
        if in_window:
            self.lat.append(now - (c.sched if self.mode == "open" else c.t_send))
            if self.mode == "open":
                self.lag.append(c.t_send - c.sched)
        if 200 <= status < 300 and (self.mode == "open" or now <= self.deadline):
            self.ok_in_window += 1
            self.events_in_window += accepted_in(body, self.n_per_req) if self.want_body else 1
        if c.close_after or self.stopping:
            return
        if self.mode == "closed":
            if now < self.deadline:
                c.send(self._next(), now)
        elif self.pending or self._fill(now):
            c.send(self._next(), self.pending.popleft())
        else:
            self.idle.append(c)

    def _fill(self, now: float) -> int:
        """Open loop: queue every arrival due by ``now``; how many are queued."""
        due = min(self.total, int((now - self.t0s) * self.rate) + 1)
        if due > self.issued:
            t0s, rate, pending = self.t0s, self.rate, self.pending
            for k in range(self.issued, due):
                pending.append(t0s + k / rate)
            self.issued = due
        return len(self.pending)

    def on_lost(self, c: _Conn) -> None:
        """A connection closed: count its request as lost and replace it (bounded) while running."""
        if c.busy:
            self.lost_in_flight += 1
            c.busy = False
        if c in self.conns:
            self.conns.remove(c)
        if not self.stopping and self.reconnects < 1000 and time.perf_counter() < self.deadline:
            self.reconnects += 1
            asyncio.get_running_loop().create_task(self._replace())

    async def _replace(self) -> None:
        try:
            c = await self._connect()
        except OSError:
            return
        if self.mode == "closed" and time.perf_counter() < self.deadline:
            c.send(self._next(), time.perf_counter())
        elif self.mode == "open" and self.pending:
            c.send(self._next(), self.pending.popleft())
        else:
            self.idle.append(c)

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, c = await asyncio.wait_for(loop.create_connection(lambda: _Conn(self), HOST, self.port), 10)
        self.conns.append(c)
        return c

    # ---------------------------------------------------------------- phases

    async def connect_all(self) -> None:
        """Open every connection before the start signal (not part of the timed window)."""
        for _ in range(self.nconn):
            await self._connect()

    async def go(self, t0: float) -> None:
        """Run from ``t0`` (perf_counter, shared by all client processes) for ``duration``."""
        self.t0 = t0
        self.deadline = t0 + self.duration
        await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
        if self.mode == "closed":
            for c in list(self.conns):
                c.send(self._next(), time.perf_counter())
        else:
            self.idle.extend(self.conns)
            await self._schedule()
        # in-flight requests finish (bounded); what is still out after the grace is "unfinished"
        end = self.deadline + self.grace
        while time.perf_counter() < end and any(c.busy for c in self.conns):
            await asyncio.sleep(0.005)
        self.stopping = True

    async def _schedule(self) -> None:
        """Open loop: request k is due at t0 + offset + k / rate whatever the server does."""
        rate = self.rate
        self.t0s = self.t0 + self.offset
        self.total = int(self.duration * rate)
        pending, idle = self.pending, self.idle
        while self.issued < self.total:
            self._fill(time.perf_counter())
            while pending and idle:
                idle.popleft().send(self._next(), pending.popleft())
            if len(pending) > self.max_pending:
                self.max_pending = len(pending)
            # uvloop timers have 1 ms resolution and a shorter sleep only spins, so arrivals
            # closer than 1 ms go out in small bursts (responses also pull due arrivals in
            # on_response); the delay is in the measured latency, which runs from the schedule
            wake = max(0.001, self.t0s + self.issued / rate - time.perf_counter())
            t = time.perf_counter()
            await asyncio.sleep(wake)
            # how late this process woke: the client's own stalls (CPU taken by the server or
            # other load), as opposed to waiting for a free connection (server queueing)
            self.late.append(time.perf_counter() - t - wake)
        # requests still queued when the window closes are sent as connections free up
        end = self.deadline + self.grace
        while pending and time.perf_counter() < end:
            while pending and idle:
                idle.popleft().send(self._next(), pending.popleft())
            await asyncio.sleep(0.001)

    def result(self, cpu: float) -> dict[str, Any]:
        """What goes back to the parent process."""
        return {
            "ok": self.ok_in_window, "events": self.events_in_window, "responses": self.responses,
            "status": dict(self.status), "lat": self.lat.tobytes(), "lag": self.lag.tobytes(),
            "late": self.late.tobytes(),
            "cpu": cpu, "lost_in_flight": self.lost_in_flight, "reconnects": self.reconnects,
            "unfinished": sum(1 for c in self.conns if c.busy) + len(self.pending),
            "max_pending": self.max_pending, "issued": self.issued,
        }


async def _client_async(pipe: Any, spec: dict[str, Any]) -> None:
    run = _Run(spec)
    try:
        await run.connect_all()
    except (TimeoutError, OSError) as e:
        pipe.send({"error": f"connect: {e!r}"})
        return
    pipe.send("ready")
    if not pipe.poll(60):  # the parent sends the common start time once every client is ready
        return
    t0 = pipe.recv()
    if t0 is None:
        return
    await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
    cpu0 = time.process_time()
    run.deadline = t0 + run.duration  # go() sets it too; needed here for the CPU window below
    task = asyncio.ensure_future(run.go(t0))
    await asyncio.sleep(max(0.0, run.deadline - time.perf_counter()))
    cpu = time.process_time() - cpu0  # CPU inside the measured window only
    await asyncio.wait_for(task, run.grace + 30)
    for c in run.conns:
        if c.transport is not None:
            c.transport.close()
    pipe.send(run.result(cpu))


def _client_main(pipe: Any, spec: dict[str, Any]) -> None:
    """Entry point of one spawned client process."""
    try:
        import uvloop
    except ImportError:  # plain asyncio still works, only slower
        asyncio.run(_client_async(pipe, spec))
    else:
        uvloop.run(_client_async(pipe, spec))


# ============================================================================ floor

_CANNED = (b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 21\r\n\r\n"
           b'{"status":"accepted"}')
_CANNED_GET = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class _CannedServer(asyncio.Protocol):
    """Answers every request with a fixed 202 (GET: 200) after reading its body: no work at all."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        for _ in range(10_000):  # bounded: one request per pass
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = bytes(buf[:i]).lower()
            j = head.find(b"\ncontent-length:")
            k = head.find(b"\r", j + 16) if j >= 0 else -1
            n = int(head[j + 16 : k if k >= 0 else len(head)]) if j >= 0 else 0
            if len(buf) < i + 4 + n:
                return
            del buf[: i + 4 + n]
            self.transport.write(_CANNED_GET if head.startswith(b"get") else _CANNED)


async def _canned_async(pipe: Any) -> None:
    server = await asyncio.get_running_loop().create_server(_CannedServer, HOST, 0)
    pipe.send(server.sockets[0].getsockname()[1])
    # serve until the parent says stop (or is gone), bounded by a day
    await asyncio.get_running_loop().run_in_executor(None, pipe.poll, 86400)
    server.close()


def _canned_main(pipe: Any) -> None:
    """Entry point of the canned server process (the measurement floor)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_canned_async(pipe))
    else:
        uvloop.run(_canned_async(pipe))


class CannedServer:
    """A do-nothing HTTP server in its own process: what the client and machine alone cost."""

    def __enter__(self) -> CannedServer:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_canned_main, args=(child,), daemon=True)
        self.proc.start()
        if not self.pipe.poll(60):
            self.proc.kill()
            raise RuntimeError("the canned server did not start within 60 s")
        self.port: int = self.pipe.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        self.pipe.send("stop")
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# ============================================================================ measuring


def tree_cpu(pid: int | None) -> tuple[float, float]:
    """CPU seconds (user + system) of a process and of its live children; zeros when unknown.

    Apart, because the daemon's own process (the supervisor: HTTP and routing) is its
    serial part, and whether it or the workers saturate says what limits the server.
    """
    if not pid:
        return 0.0, 0.0
    try:
        p = psutil.Process(pid)
        kids = p.children(recursive=True)
        t = p.cpu_times()
        own = t.user + t.system
    except psutil.Error:
        return 0.0, 0.0
    rest = 0.0
    for q in kids:
        try:
            t = q.cpu_times()
            rest += t.user + t.system
        except psutil.Error:
            pass
    return own, rest


def machine_busy() -> tuple[float, float, float]:
    """(busy, steal, softirq) CPU seconds of the whole machine since boot.

    Busy leaves out idle, iowait and steal; steal (the hypervisor running someone else)
    is returned apart because on a small VM it is a large share of the noise. Softirq is
    inside busy and charged to no process: on loopback it is mostly TCP delivery.
    """
    t = psutil.cpu_times()
    steal = getattr(t, "steal", 0.0)
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0) - steal - getattr(t, "guest", 0.0)
    return busy, steal, getattr(t, "softirq", 0.0)


def pct(xs: list[float] | array, q: float) -> float:
    """Nearest-rank percentile of a sorted sequence; nan when empty."""
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def run_load(kind: str, mode: str, port: int, reqs: list[bytes], *, connections: int, clients: int,
             duration: float, server_pid: int | None, events_per_request: int, rate: float = 0.0,
             label: str = "", ids: bool = False) -> dict[str, Any]:
    """One timed run with ``clients`` spawned processes; returns rates, latencies and CPU."""
    ctx = mp.get_context("spawn")  # explicit start method (no forked copy of this process's state)
    conns = [connections // clients + (1 if i < connections % clients else 0) for i in range(clients)]
    procs, pipes = [], []
    for i in range(clients):
        spec = {"kind": kind, "mode": mode, "port": port, "reqs": reqs[i::clients] or reqs,
                "events_per_request": events_per_request, "connections": max(1, conns[i]),
                "duration": duration, "rate": rate / clients, "offset": i / rate if rate else 0.0,
                "ids": ids}
        a, b = ctx.Pipe()
        p = ctx.Process(target=_client_main, args=(b, spec), daemon=True)
        p.start()
        procs.append(p)
        pipes.append(a)
    try:
        for a in pipes:
            if not a.poll(60):
                raise RuntimeError("a client process did not connect within 60 s")
            msg = a.recv()
            if msg != "ready":
                raise RuntimeError(f"client failed: {msg}")
        t0 = time.perf_counter() + 0.2
        for a in pipes:
            a.send(t0)
        time.sleep(max(0.0, t0 - time.perf_counter()))
        s0, m0, c0 = tree_cpu(server_pid), machine_busy(), time.process_time()
        time.sleep(max(0.0, t0 + duration - time.perf_counter()))
        s1, m1, c1 = tree_cpu(server_pid), machine_busy(), time.process_time()
        results = []
        for a in pipes:
            if not a.poll(duration + 60):
                raise RuntimeError("a client process did not report within its bound")
            results.append(a.recv())
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    for r in results:
        if "error" in r:
            raise RuntimeError(r["error"])
    lat = sorted(x for r in results for x in array("d", r["lat"]))
    lag = sorted(x for r in results for x in array("d", r["lag"]))
    late = sorted(x for r in results for x in array("d", r["late"]))
    status: collections.Counter[int] = collections.Counter()
    for r in results:
        status.update({int(k): v for k, v in r["status"].items()})
    ok = sum(r["ok"] for r in results)
    events = sum(r["events"] for r in results)
    wall = duration
    ncpu = psutil.cpu_count() or 1
    client_cpu = sum(r["cpu"] for r in results) + (c1 - c0)
    # a worker replaced mid-run would make its share negative; clamp rather than mislead
    sup_cpu, kids_cpu = max(0.0, s1[0] - s0[0]), max(0.0, s1[1] - s0[1])
    server_cpu = sup_cpu + kids_cpu
    busy = (m1[0] - m0[0])
    out = {
        "scenario": label or f"{kind} {mode}", "kind": kind, "mode": mode, "duration_s": duration,
        "connections": connections, "clients": clients, "offered_rate": rate or None,
        "requests_ok": ok, "requests_per_s": ok / wall, "events_accepted": events,
        "events_per_s": events / wall if kind == "batched" else ok / wall,
        "non_2xx": sum(v for k, v in status.items() if not 200 <= k < 300), "status": dict(status),
        "lost_in_flight": sum(r["lost_in_flight"] for r in results),
        "reconnects": sum(r["reconnects"] for r in results),
        "unfinished": sum(r["unfinished"] for r in results),
        "max_pending": max(r["max_pending"] for r in results),
        "latency_ms": {f"p{q:g}": pct(lat, q) * 1e3 for q in (50, 90, 99, 99.9)} | {
            "max": (lat[-1] * 1e3) if lat else float("nan"), "n": len(lat)},
        # open loop: send lag = scheduled to written (no free connection, or the client stalled);
        # client_late = how late the client's scheduler woke (its own stalls alone)
        "send_lag_ms": {"p50": pct(lag, 50) * 1e3, "p99": pct(lag, 99) * 1e3} if lag else None,
        "client_late_ms": {"p99": pct(late, 99) * 1e3, "max": late[-1] * 1e3} if late else None,
        # CPU as cores busy during the window: client processes (+ this parent), server tree, machine
        "client_cores": client_cpu / wall,
        "server_cores": server_cpu / wall,
        "supervisor_cores": sup_cpu / wall,
        "workers_cores": kids_cpu / wall,
        # CPU per accepted event (per request for single): steadier than rates when other
        # load takes the machine, and the way to read how far a target is
        "server_us_per_event": 1e6 * server_cpu / events if events else None,
        "supervisor_us_per_event": 1e6 * sup_cpu / events if events else None,
        "workers_us_per_event": 1e6 * kids_cpu / events if events else None,
        "client_us_per_event": 1e6 * client_cpu / events if events else None,
        "machine_cores": busy / wall,
        "other_cores": max(0.0, busy / wall - client_cpu / wall - server_cpu / wall),
        "steal_cores": (m1[1] - m0[1]) / wall,
        "softirq_cores": (m1[2] - m0[2]) / wall,
        "ncpu": ncpu,
    }
    return out


# ============================================================================ wrk


def run_wrk(url: str, body: bytes, connections: int, duration: float, token: str | None) -> dict[str, Any] | None:
    """Closed-loop cross-check with ``wrk`` (1 thread); None when wrk is not installed."""
    wrk = shutil.which("wrk")
    if not wrk:
        return None
    with tempfile.TemporaryDirectory(prefix="http-load-wrk-") as d:
        script = Path(d) / "post.lua"
        lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
        if token:
            lines.append(f'wrk.headers["Authorization"] = "Bearer {token}"')
        # long bracket with a level no JSON body contains
        lines.append("wrk.body = [==[" + body.decode() + "]==]")
        script.write_text("\n".join(lines) + "\n")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        m0 = machine_busy()
        proc = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
                               "-s", str(script), url], capture_output=True, text=True,
                              timeout=duration + 60)
        m1 = machine_busy()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = proc.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", text)
    lat = dict(re.findall(r"^\s+(50|90|99)%\s+([\d.]+\w+)", text, re.M))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    n = int(total.group(1)) if total else 0
    bad = int(non2xx.group(1)) if non2xx else 0
    return {
        "tool": "wrk", "connections": connections, "duration_s": duration, "returncode": proc.returncode,
        "requests_per_s": float(rps.group(1)) if rps else None,
        "ok_per_s": (float(rps.group(1)) * (n - bad) / n) if rps and n else None,
        "non_2xx": bad, "latency_closed_loop": lat,
        "client_cores": cpu / duration, "machine_cores": (m1[0] - m0[0]) / duration,
        "stdout": text[-2000:],
    }


# ============================================================================ daemon


class Daemon(ServerProcess):
    """``collector serve`` in its own session: its port from its JSON log line, ready on ``/ready``."""

    what = "daemon"

    def port_from_log(self, text: bytes) -> int:
        """The port of the daemon's "listening" log line."""
        for line in text.splitlines():
            if b"listening" not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            said = (str(rec.get("msg", "")), str(rec.get("event", "")))
            if any(x.startswith("listening") for x in said) and isinstance(rec.get("port"), int):
                return int(rec["port"])
        return 0

    def is_ready(self) -> bool:
        """``GET /ready`` answers 200."""
        return http_get(self.port, "/ready")[0] == 200


def server_pid_for(port: int) -> int | None:
    """The pid listening on 127.0.0.1:port (``--target`` mode), if this user may see it."""
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return c.pid
    except (psutil.Error, OSError):
        pass
    return None


def metrics(port: int) -> dict[str, Any] | None:
    """``GET /metrics`` as JSON, or None."""
    status, body = http_get(port, "/metrics")
    if status != 200:
        return None
    try:
        d = json.loads(body)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


# ============================================================================ profile


_PROC = re.compile(r'process (\d+):"[^"]*";?')
_LINE = re.compile(r":\d+\)$")


def profile_summary(raw: Path, root_pid: int, rate: float, duration: float, top: int = 15) -> dict[str, Any]:
    """Where the daemon's time goes, from py-spy's collapsed (``--format raw``) stacks.

    Per role (``supervisor``: the daemon's own process; ``workers``: its children), the
    share of all samples, the cores it kept busy (samples / rate / duration; py-spy
    samples only threads that are running, not idle ones), and the top functions by self
    time (the sampled frame) and inclusive time (anywhere on the stack), each as a share
    of that role's samples.
    """
    roles: dict[str, dict[str, Any]] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        # the process frames come first and their command lines may hold ';', so cut them out
        pids = [int(m.group(1)) for m in _PROC.finditer(stack)]
        # one entry per function, not per line: "f (path:123)" -> "f (path)"
        frames = [_LINE.sub(")", f) for f in _PROC.sub("", stack).split(";") if f]
        if not frames:
            continue
        k = int(n)
        total += k
        role = "supervisor" if not pids or pids[-1] == root_pid else "workers"
        r = roles.setdefault(role, {"n": 0, "self": collections.Counter(), "incl": collections.Counter(),
                                    "pids": set()})
        r["n"] += k
        r["pids"].add(pids[-1] if pids else root_pid)
        r["self"][frames[-1]] += k
        for f in set(frames):
            r["incl"][f] += k
    out: dict[str, Any] = {"samples": total, "rate_hz": rate, "duration_s": duration, "roles": {}}
    for role, r in sorted(roles.items()):
        n = r["n"]
        out["roles"][role] = {
            "processes": len(r["pids"]), "share": round(100 * n / total, 1) if total else 0,
            "cores": round(n / rate / duration, 2),
            "self": [(f, round(100 * v / n, 1)) for f, v in r["self"].most_common(top)],
            "inclusive": [(f, round(100 * v / n, 1)) for f, v in r["incl"].most_common(top)],
        }
    return out


def with_profile(pid: int, out: Path, name: str, duration: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` while py-spy records the daemon's process tree; add the summary to its result."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = out / f"profile-{name}.txt"
    svg = out / f"profile-{name}.svg"
    base = [spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "200", "--nonblocking",
            "--duration", str(max(1, int(duration)))]
    # two recorders at once (collapsed text for the summary, SVG for people) would double the
    # sampling cost; record text now and draw the SVG from a second, uncounted run
    rec = subprocess.Popen([*base, "--format", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    time.sleep(0.5)  # py-spy attaches before the load starts
    res = fn()
    try:
        _, err = rec.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        rec.kill()
        _, err = rec.communicate(timeout=10)
    if raw.exists():
        res["profile"] = profile_summary(raw, pid, 200, max(1, int(duration))) | {"raw": str(raw)}
    else:
        res["profile"] = {"error": err.decode(errors="replace")[-500:]}
    rec2 = subprocess.Popen([*base, "-o", str(svg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    fn()
    try:
        rec2.wait(duration + 60)
    except subprocess.TimeoutExpired:
        rec2.kill()
    if svg.exists():
        res["profile"]["svg"] = str(svg)
    return res


# ============================================================================ report


def print_profile(pr: dict[str, Any], top: int = 12) -> None:
    """The profile summary, per role."""
    if "error" in pr:
        print(f"  py-spy failed: {pr['error']}")
        return
    for role, r in pr.get("roles", {}).items():
        print(f"  {role} ({r['processes']} process(es)): {r['share']}% of samples, ~{r['cores']} cores")
        for key in ("self", "inclusive"):
            print(f"    {key}: " + "; ".join(f"{f} {v}%" for f, v in r[key][:top]))


def fmt_row(r: dict[str, Any]) -> str:
    """One table line."""
    lat = r.get("latency_ms") or {}

    def ms(k: str) -> str:
        v = lat.get(k)
        return f"{v:8.2f}" if isinstance(v, float) and v == v else f"{'-':>8}"

    rate = f"{r['events_per_s']:>12,.0f}" if r["kind"] == "batched" else f"{r['requests_per_s']:>12,.0f}"
    unit = "ev/s " if r["kind"] == "batched" else "req/s"
    return (f"{r['scenario']:<14} {r.get('round', '-'):>3} {rate} {unit} {r['non_2xx']:>7} "
            f"{ms('p50')} {ms('p90')} {ms('p99')} {ms('max')} {r['client_cores']:6.2f} {r['server_cores']:6.2f} "
            f"{r.get('supervisor_cores', 0):5.2f}+{r.get('workers_cores', 0):4.2f} {r['machine_cores']:6.2f}")


def open_note(r: dict[str, Any]) -> str:
    """The open-loop run's client-side delays, to tell client stalls from server queueing."""
    lag, late = r.get("send_lag_ms") or {}, r.get("client_late_ms") or {}
    return (f"{'':18}offered {r['offered_rate']:,.0f}/s; scheduled-to-sent p50 {lag.get('p50', 0):.2f} "
            f"p99 {lag.get('p99', 0):.2f} ms; client wake-up late p99 {late.get('p99', 0):.2f} "
            f"max {late.get('max', 0):.2f} ms; max queued {r['max_pending']}; unfinished {r['unfinished']}")


HEADER = (f"{'scenario':<14} {'rnd':>3} {'rate':>12} {'':5} {'non2xx':>7} {'p50 ms':>8} {'p90 ms':>8} "
          f"{'p99 ms':>8} {'max ms':>8} {'client':>6} {'server':>6} {'sup+workers':>10} {'machine':>7}")


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median figures per scenario over the rounds, with the spread (max - min) / median."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["scenario"] for r in runs):
        rs = [r for r in runs if r["scenario"] == name]
        key = "events_per_s" if rs[0]["kind"] == "batched" else "requests_per_s"
        vals = [r[key] for r in rs]
        med = statistics.median(vals)
        d = {"runs": len(rs), key: med, "spread": (max(vals) - min(vals)) / med if med else None,
             "client_cores": statistics.median(r["client_cores"] for r in rs),
             "server_cores": statistics.median(r["server_cores"] for r in rs),
             "supervisor_cores": statistics.median(r.get("supervisor_cores", 0.0) for r in rs),
             "workers_cores": statistics.median(r.get("workers_cores", 0.0) for r in rs),
             "machine_cores": statistics.median(r["machine_cores"] for r in rs),
             "softirq_cores": statistics.median(r.get("softirq_cores", 0.0) for r in rs),
             **{f"{w}_us_per_event": statistics.median(r.get(f"{w}_us_per_event") or 0.0 for r in rs)
                for w in ("server", "supervisor", "workers", "client")},
             "steal_cores": statistics.median(r.get("steal_cores", 0.0) for r in rs),
             "non_2xx": sum(r["non_2xx"] for r in rs)}
        for q in ("p50", "p90", "p99", "max"):
            d[f"{q}_ms"] = statistics.median(r["latency_ms"][q] for r in rs)
        out[name] = d
    return out


# ============================================================================ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="URL of a running daemon (http://127.0.0.1:PORT); default: start one")
    p.add_argument("--server-pid", type=int, help="with --target: the daemon's pid for its CPU (else looked up)")
    p.add_argument("--workers", type=int, default=2, help="daemon workers when this script starts it (2)")
    p.add_argument("--config", help="daemon config file (TOML) when this script starts it")
    p.add_argument("--serve-cmd", help="command that starts the daemon; {port} {data_dir} {workers} {config} "
                                       "are filled in (default: python -m collector serve ...)")
    p.add_argument("--quick", action="store_true", help="one short round (well under a minute)")
    p.add_argument("--rounds", type=int, help="alternating rounds; figures are medians (3; --quick 1)")
    p.add_argument("--duration", type=float, help="seconds per closed-loop run (8; --quick 3)")
    p.add_argument("--open-duration", type=float, help="seconds of the open-loop run (12; --quick 4)")
    p.add_argument("--scenarios", default="batched,single", help="batched,single (default both)")
    p.add_argument("--batch-size", type=int, default=100, help="events per /events/batch request (100)")
    p.add_argument("--connections", type=int, default=32, help="batched: keep-alive connections (32)")
    # the daemon coalesces concurrent requests, so its single-event throughput keeps rising
    # with concurrency (8: ~0.9k/s, 32: ~2.9k/s, 128: ~7.2k/s, 512: ~9.7k/s on 2 shared
    # cores); 256 is past the knee with p50 still ~30 ms
    p.add_argument("--single-connections", type=int, default=256, help="single closed loop: connections (256)")
    # enough that a free connection is always there at 50 % load, so queueing is the server's
    p.add_argument("--open-connections", type=int, default=256, help="single open loop: connection pool (256)")
    p.add_argument("--load", type=float, default=0.5, help="open-loop rate as a share of the max (0.5)")
    p.add_argument("--rate", type=float, help="single open loop: this many requests/s instead of --load x max")
    p.add_argument("--clients", type=int, default=1, help="client processes (1)")
    p.add_argument("--users", type=int, default=10_000, help="distinct user_id values in the bodies (10000)")
    p.add_argument("--ids", action="store_true",
                   help="send a new id with every event (default: none, the daemon generates them)")
    p.add_argument("--token", help="bearer token when the daemon requires one")
    p.add_argument("--payload", choices=("generic", "clickstream"), default="generic",
                   help="events sent: seed 004's (generic, default) or seed 002's sessions (clickstream)")
    p.add_argument("--tokens", metavar="JSON", help="clickstream: a file mapping user ids to their tokens")
    p.add_argument("--wrk", action="store_true", help="cross-check the closed-loop runs with wrk")
    p.add_argument("--profile", metavar="DIR", help="after the rounds, py-spy the daemon in extra, uncounted runs")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                   help="each round, also run the batched load against the uvicorn peer (default: on when "
                        "uvicorn is installed and the payload is generic)")
    p.add_argument("--peer-workers", type=int, help="uvicorn workers of the peer (default: --workers)")
    p.add_argument("--peer-fsync", choices=("never", "request"), default="never",
                   help="the peer's durability: never (write() only, default) or request (fdatasync before answering)")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=None,
                   help="each round, also run the clients against a canned do-nothing server (default: on, "
                        "off with --quick)")
    p.add_argument("--out", default="bench-results", help="directory for the JSON results (bench-results)")
    p.add_argument("--result-file", help="write the JSON here instead of a timestamped name in --out")
    p.add_argument("--restart-each-round", action="store_true",
                   help="start a fresh daemon before every round (not with --target)")
    p.add_argument("--keep-data", action="store_true", help="keep the daemon's data directory")
    a = p.parse_args(argv)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.duration = a.duration or (3.0 if a.quick else 8.0)
    a.open_duration = a.open_duration or (4.0 if a.quick else 12.0)
    a.floor = (not a.quick) if a.floor is None else a.floor
    a.scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    if a.clients < 1 or a.rounds < 1 or a.rounds > 20 or a.batch_size < 1:
        p.error("--clients, --rounds (1..20) and --batch-size must be positive")
    return a


def start_peer(a: argparse.Namespace, extra: dict[str, Any]) -> PeerServer | None:
    """The uvicorn peer, started (or None, with the reason in ``extra["peer_skipped"]``)."""
    if a.peer is False or "batched" not in a.scenarios:
        return None
    why = (f"the peer validates the generic pack's events, not --payload {a.payload}" if a.payload != "generic"
           else uvicorn_missing())
    if why and a.peer:
        raise RuntimeError(f"--peer: {why}")
    if why:
        print(f"peer skipped: {why}")  # on stdout: `collector bench http` shows stdout only
        extra["peer_skipped"] = why
        return None
    peer = PeerServer(tempfile.mkdtemp(prefix="http-load-peer-"), a.peer_workers or a.workers, fsync=a.peer_fsync)
    print("starting the peer: " + " ".join(peer.cmd), file=sys.stderr)
    extra["peer"] = {"command": peer.cmd, "workers": peer.workers, "fsync": a.peer_fsync}
    try:
        peer.start()
    except (RuntimeError, OSError):
        stop_peer(peer, extra, False)
        raise
    return peer


def stop_peer(peer: PeerServer, extra: dict[str, Any], keep: bool) -> None:
    """Stop the peer; note its exit code and how many events it stored; remove its files."""
    extra["peer"]["exit"] = rc = peer.stop()
    extra["peer"]["stored_lines"] = sum(p.read_bytes().count(b"\n") for p in Path(peer.data_dir).glob("peer-*.jsonl"))
    if rc not in (0, None):
        print(f"the peer exited with {rc}; its log: {peer.log_path}\n{peer.log_tail()}", file=sys.stderr)
    else:
        with contextlib.suppress(OSError):
            os.unlink(peer.log_path)
    if not keep:
        shutil.rmtree(peer.data_dir, ignore_errors=True)


def target_port(url: str) -> int:
    """The port of a loopback URL; anything but 127.0.0.1/localhost is refused."""
    u = urllib.parse.urlsplit(url)
    if u.hostname not in ("127.0.0.1", "localhost") or not u.port:
        raise SystemExit(f"--target must be http://127.0.0.1:PORT (loopback only), not {url}")
    return u.port


def main(argv: list[str] | None = None) -> int:
    """Start (or find) the daemon, run the rounds, print the table, write the JSON."""
    a = parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    daemon: Daemon | None = None
    data_dir = None
    if a.target:
        port = target_port(a.target)
        pid = a.server_pid or server_pid_for(port)
    else:
        data_dir = tempfile.mkdtemp(prefix="http-load-data-")
        fill = {"port": 0, "data_dir": data_dir, "workers": a.workers, "config": a.config or ""}
        if a.serve_cmd:
            cmd = [x.format(**fill) for x in shlex.split(a.serve_cmd)]
        else:
            cmd = [sys.executable, "-m", "collector", "serve", "--port", "0", "--data-dir", data_dir,
                   "--workers", str(a.workers), *(["--config", a.config] if a.config else [])]
        daemon = Daemon(cmd, data_dir, os.path.join(tempfile.gettempdir(), f"http-load-daemon-{os.getpid()}.log"))
        print("starting: " + " ".join(cmd), file=sys.stderr)
        t = time.perf_counter()
        try:
            port = daemon.start()
        except (RuntimeError, OSError) as e:
            daemon.stop()
            shutil.rmtree(data_dir, ignore_errors=True)
            print(f"http_load: {e}", file=sys.stderr)
            return 1
        pid = daemon.proc.pid if daemon.proc else None
        print(f"daemon ready on port {port} in {time.perf_counter() - t:.1f} s (pid {pid})", file=sys.stderr)
    tokens = json.loads(Path(a.tokens).read_text()) if a.tokens else None
    mk = functools.partial(make_requests, payload=a.payload, tokens=tokens)
    runs: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    code = 0
    peer: PeerServer | None = None
    try:
        peer = start_peer(a, extra)
        peer_reqs = mk("batched", peer.port, a.batch_size, a.users, a.token, ids=a.ids)[0] if peer else []
        batch_reqs, _ = mk("batched", port, a.batch_size, a.users, a.token, ids=a.ids)
        single_reqs, _ = mk("single", port, a.batch_size, a.users, a.token, count=256, ids=a.ids)
        m_before = metrics(port)

        def batched(d: float, label: str = "batched") -> dict[str, Any]:
            return run_load("batched", "closed", port, batch_reqs, connections=a.connections, clients=a.clients,
                            duration=d, server_pid=pid, events_per_request=a.batch_size, ids=a.ids, label=label)

        def single_max(d: float, label: str = "single max") -> dict[str, Any]:
            return run_load("single", "closed", port, single_reqs, connections=a.single_connections,
                            clients=a.clients, duration=d, server_pid=pid, events_per_request=1, ids=a.ids, label=label)

        def peer_batched(d: float, label: str = "peer batched") -> dict[str, Any]:
            assert peer is not None and peer.proc is not None
            return run_load("batched", "closed", peer.port, peer_reqs, connections=a.connections, clients=a.clients,
                            duration=d, server_pid=peer.proc.pid, events_per_request=a.batch_size, ids=a.ids,
                            label=label)

        def warm_up() -> None:
            # not counted: connections, server caches, first-use imports
            if "batched" in a.scenarios:
                batched(1.0, "warm-up")
                if peer:
                    peer_batched(1.0, "warm-up")
            if "single" in a.scenarios:
                single_max(1.0, "warm-up")

        warm_up()
        print(HEADER)
        rate = 0.0
        extra["server_metrics_rounds"] = []
        for rnd in range(1, a.rounds + 1):
            if a.restart_each_round and daemon is not None and data_dir and rnd > 1:
                # a fresh daemon per round: each round starts with empty per-worker state
                # (dedup windows, caches), so rounds are alike instead of ever more loaded
                extra["server_metrics_rounds"].append(metrics(port))
                extra.setdefault("daemon_exits", []).append(daemon.stop())
                shutil.rmtree(data_dir, ignore_errors=True)
                os.makedirs(data_dir, exist_ok=True)
                port = daemon.start()
                pid = daemon.proc.pid if daemon.proc else None
                batch_reqs, _ = mk("batched", port, a.batch_size, a.users, a.token, ids=a.ids)
                single_reqs, _ = mk("single", port, a.batch_size, a.users, a.token,
                                                           count=256, ids=a.ids)
                warm_up()
            # alternate the scenarios inside each round so slow drift of the machine hits all alike
            if "batched" in a.scenarios:
                for r in (batched(a.duration), *([peer_batched(a.duration)] if peer else [])):
                    r["round"] = rnd
                    runs.append(r)
                    print(fmt_row(r), flush=True)
            if "single" in a.scenarios:
                r = single_max(a.duration)
                r["round"] = rnd
                runs.append(r)
                print(fmt_row(r), flush=True)
                maxes = [x["requests_per_s"] for x in runs if x["scenario"] == "single max"]
                rate = a.rate or a.load * statistics.median(maxes)
                if rate >= 1:
                    r = run_load("single", "open", port, single_reqs, connections=a.open_connections,
                                 clients=a.clients, duration=a.open_duration, server_pid=pid,
                                 events_per_request=1, ids=a.ids, rate=rate, label=f"single {a.load:.0%}")
                    r["round"] = rnd
                    runs.append(r)
                    print(fmt_row(r), flush=True)
                    print(open_note(r), flush=True)
            if a.floor:
                # the same clients against a server that does nothing: the client's ceiling and the
                # latency floor this machine gives at the same offered rate
                with CannedServer() as cs:
                    fb, _ = mk("batched", cs.port, a.batch_size, a.users, a.token, ids=a.ids)
                    fs, _ = mk("single", cs.port, a.batch_size, a.users, a.token, count=256, ids=a.ids)
                    floor_runs = []
                    if "batched" in a.scenarios:
                        floor_runs.append(run_load(
                            "batched", "closed", cs.port, fb, connections=a.connections, clients=a.clients,
                            duration=a.duration / 2, server_pid=cs.proc.pid, events_per_request=a.batch_size,
                            label="floor batched"))
                    if "single" in a.scenarios:
                        floor_runs.append(run_load(
                            "single", "closed", cs.port, fs, connections=a.single_connections, clients=a.clients,
                            duration=a.duration / 2, server_pid=cs.proc.pid, events_per_request=1,
                            label="floor max"))
                        if rate >= 1:
                            floor_runs.append(run_load(
                                "single", "open", cs.port, fs, connections=a.open_connections, clients=a.clients,
                                duration=a.open_duration, server_pid=cs.proc.pid, events_per_request=1,
                                rate=rate, label=f"floor {a.load:.0%}"))
                for r in floor_runs:
                    r["round"] = rnd
                    runs.append(r)
                    print(fmt_row(r), flush=True)
                    if r["mode"] == "open":
                        print(open_note(r), flush=True)
        if a.wrk:
            extra["wrk"] = {}
            # wrk sends one fixed body, so always without ids (with ids all but the first would be duplicates)
            _, wrk_batch = mk("batched", port, a.batch_size, a.users, a.token, count=1)
            _, wrk_single = mk("single", port, a.batch_size, a.users, a.token, count=1)
            if "batched" in a.scenarios:
                w = run_wrk(f"http://{HOST}:{port}/events/batch", wrk_batch[0], a.connections, a.duration, a.token)
                if w:
                    w["events_per_s"] = (w["ok_per_s"] or 0) * a.batch_size
                    extra["wrk"]["batched"] = w
                    print(f"wrk batched: {w['events_per_s']:,.0f} ev/s ({w['requests_per_s']} req/s, "
                          f"non-2xx {w['non_2xx']}, wrk {w['client_cores']:.2f} cores, machine {w['machine_cores']:.2f})")
            if "single" in a.scenarios:
                w = run_wrk(f"http://{HOST}:{port}/events", wrk_single[0], a.single_connections, a.duration, a.token)
                if w:
                    extra["wrk"]["single"] = w
                    print(f"wrk single: {w['requests_per_s']} req/s (non-2xx {w['non_2xx']}, closed-loop latency "
                          f"{w['latency_closed_loop']}, wrk {w['client_cores']:.2f} cores, machine {w['machine_cores']:.2f})")
            if not extra["wrk"]:
                print("wrk: not installed (apt-get install wrk)")
        if a.profile and pid:
            prof = Path(a.profile)
            prof.mkdir(parents=True, exist_ok=True)
            extra["profiled"] = []
            for name, fn in (("batched", lambda: batched(a.duration, "batched prof")),
                             ("single", lambda: single_max(a.duration, "single prof"))):
                if name in a.scenarios:
                    r = with_profile(pid, prof, name, a.duration, fn)
                    extra["profiled"].append(r)
                    print(f"profile {name} (py-spy attached, not counted): {fmt_row(r)}")
                    print_profile(r["profile"])
        m_after = metrics(port)
        extra["server_metrics_rounds"].append(m_after)
        extra["server_metrics"] = {"before": m_before, "after": m_after}
    except (RuntimeError, OSError) as e:
        print(f"http_load: {e}", file=sys.stderr)
        code = 1
    finally:
        if peer is not None:
            stop_peer(peer, extra, a.keep_data)
        if daemon is not None:
            rc = daemon.stop()
            extra["daemon_exit"] = rc
            extra.setdefault("daemon_exits", []).append(rc)
            if rc not in (0, None) or code:
                print(f"daemon exited with {rc}; its log: {daemon.log_path}\n{daemon.log_tail()}", file=sys.stderr)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(daemon.log_path)
            if data_dir and not a.keep_data:
                shutil.rmtree(data_dir, ignore_errors=True)
    med = medians(runs) if runs else {}
    if med:
        print(f"\nmedians over {a.rounds} round(s):")
        for name, d in med.items():
            key = "events_per_s" if "events_per_s" in d else "requests_per_s"
            print(f"  {name:<12} {d[key]:>12,.0f} {'ev/s' if key == 'events_per_s' else 'req/s':5} "
                  f"p50 {d['p50_ms']:.2f} ms  p99 {d['p99_ms']:.2f} ms  spread {d['spread'] or 0:.0%}  "
                  f"cores: client {d['client_cores']:.2f} server {d['server_cores']:.2f} (supervisor "
                  f"{d['supervisor_cores']:.2f}, workers {d['workers_cores']:.2f}) "
                  f"machine {d['machine_cores']:.2f} (softirq {d['softirq_cores']:.2f}; steal {d['steal_cores']:.2f})")
            print(f"  {'':<12} CPU µs per {'event' if key == 'events_per_s' else 'request'}: server "
                  f"{d['server_us_per_event']:.1f} (supervisor {d['supervisor_us_per_event']:.1f}, workers "
                  f"{d['workers_us_per_event']:.1f}), client {d['client_us_per_event']:.1f}")
    targets = {}
    if "batched" in med:
        targets["batched >= 300,000 events/s"] = med["batched"]["events_per_s"] >= 300_000
    open_name = f"single {a.load:.0%}"
    if open_name in med:
        targets["single p99 < 10 ms at 50 % load"] = med[open_name]["p99_ms"] < 10
    if "batched" in med and "peer batched" in med and med["peer batched"]["events_per_s"]:
        ratio = med["batched"]["events_per_s"] / med["peer batched"]["events_per_s"]
        extra["peer"]["ratio"] = ratio
        print(f"\ncollector ÷ uvicorn peer, batched: {ratio:.2f}x (collector: answers after the sinks committed, "
              f"JSONL fdatasync per group of chunks, dedup, enrichment; peer: validate + append, "
              f"fsync {extra['peer']['fsync']})")
        targets["batched >= 1.5x the uvicorn peer"] = ratio >= 1.5
    for k, v in targets.items():
        print(f"target {k}: {'met' if v else 'missed'}")
    result = {
        "scenario": "http", "started": started, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "options": {k: v for k, v in vars(a).items() if k != "token"}, "port": port,
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": psutil.cpu_count(), "load_avg": os.getloadavg()},
        "runs": runs, "medians": med, "targets": targets, **extra,
    }
    path = Path(a.result_file) if a.result_file else Path(a.out) / f"http{'-quick' if a.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"results: {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
