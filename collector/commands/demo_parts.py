"""The demos' parts: start the daemon, drive it over HTTP with a live line, stop it.

``collector demo`` (generic, seed 004) and ``collector demo casino`` (seed 001) use them;
``HttpClient`` is also the tests' keep-alive client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["HttpClient", "drive", "get_json", "jetstream_stream", "live_line", "start_daemon", "stop_daemon"]


class HttpClient:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams (for the demo and tests)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                      timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); reconnects when the server closed the connection."""
        async with asyncio.timeout(timeout):
            if self.writer is None or self.writer.is_closing():
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None and self.writer is not None
            h = {"Host": f"{self.host}:{self.port}", "Content-Length": str(len(body))}
            if body:
                h["Content-Type"] = "application/json"
            h.update(headers or {})
            head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
            self.writer.write(head.encode() + body)
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            hdrs = {}
            for ln in lines[1:]:
                if ":" in ln:
                    k, v = ln.split(":", 1)
                    hdrs[k.strip().lower()] = v.strip()
            data = await self.reader.readexactly(int(hdrs.get("content-length", "0")))
            if hdrs.get("connection", "").lower() == "close":
                await self.close()
            return status, hdrs, data

    async def close(self) -> None:
        """Close the connection."""
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = None


async def drive(port: int, args: argparse.Namespace, out: Any, body: Callable[[int], bytes],
                rate: float = 0.0) -> dict[str, Any]:
    """``args.connections`` keep-alive connections POSTing ``body(j)`` (request j, j = 0, 1, ...
    across the connections, ``args.batch`` events each) for ``args.duration`` seconds, at
    most ``rate`` events/s (0: no limit), with the live line; the counts and latencies."""
    lat: list[float] = []
    counts = {"accepted": 0, "invalid": 0, "requests": 0, "errors": 0}
    t_start = time.monotonic()
    stop = t_start + args.duration
    sent = [0]  # events sent, for the pace

    async def conn(i: int) -> None:
        c = HttpClient("127.0.0.1", port)
        j = i
        try:
            while time.monotonic() < stop:
                if rate > 0:
                    ahead = t_start + sent[0] / rate - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                        continue
                sent[0] += args.batch
                t0 = time.perf_counter()
                status, _, data = await c.request("POST", "/events/batch", body(j))
                lat.append(time.perf_counter() - t0)
                j += args.connections
                counts["requests"] += 1
                if status in (202, 422):
                    r = json.loads(data)
                    counts["accepted"] += r["accepted"]
                    counts["invalid"] += r["invalid"]
                else:
                    counts["errors"] += 1
                    await asyncio.sleep(0.05)
        finally:
            await c.close()

    t0 = time.monotonic()
    await asyncio.gather(live_line(port, stop, out, lat), *(conn(i) for i in range(args.connections)))
    wall = time.monotonic() - t0
    lat.sort()
    return {"wall": wall, "latency": lat, **counts}


async def live_line(port: int, stop: float, out: Any, lat: list[float] | None = None) -> None:
    """Every 0.5 s until ``stop`` (monotonic), one line rewritten in place: events/s, request
    latency (from ``lat``, if given), events in flight, the stream's lag (with a NATS
    source), events/s per worker."""
    c = HttpClient("127.0.0.1", port)
    t_start = time.monotonic()
    seen = 0
    try:
        while time.monotonic() < stop:
            await asyncio.sleep(0.5)
            _, _, data = await c.request("GET", "/metrics")
            m = json.loads(data)
            req = ""
            if lat is not None:
                recent = sorted(lat[seen:]) or [0.0]
                seen = len(lat)
                req = (f"request p50 {recent[len(recent) // 2] * 1000:5.1f} ms p99 "
                       f"{recent[int(len(recent) * 0.99)] * 1000:5.1f} ms  ")
            lag = f"stream lag {m['ingress'].get('num_pending', 0):>6}  " if m.get("ingress") else ""
            per = " ".join(f"w{w['index']} {w['events_per_second']:,.0f}/s" for w in m["workers"])
            print(f"\r  {time.monotonic() - t_start:4.1f}s  {m['events_per_second']:>9,.0f} events/s  {req}"
                  f"in flight {m['current_queue_depth']:>6}  {lag}{per}   ", end="", file=out, flush=True)
    finally:
        await c.close()
        print(file=out)


def start_daemon(serve_args: list[str], data_dir: Path, log_path: Path, out: Any,
                 stdout_path: Path | None = None) -> tuple[subprocess.Popen[bytes], int] | None:
    """``collector serve --port 0 SERVE_ARGS`` in its own session, its logs (and its standard
    output, unless ``stdout_path``) in ``log_path``; (process, port) once ready, else None
    (the daemon stopped, the end of its log printed)."""
    port_file = Path(tempfile.mkdtemp(prefix="collector-demo-")) / "port"
    cmd = [sys.executable, "-m", "collector", "serve", "--port", "0", "--data-dir", str(data_dir),
           "--port-file", str(port_file), *serve_args]
    print(f"collector demo: starting the daemon: {' '.join(cmd[1:])}", file=out)
    with open(log_path, "wb") as log_file, contextlib.ExitStack() as files:
        stdout: IO[bytes] = files.enter_context(open(stdout_path, "wb")) if stdout_path else log_file
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=log_file, start_new_session=True)
    port = _wait_ready(proc, port_file, timeout=60)
    if port is None:
        stop_daemon(proc)
        print(f"collector demo: the daemon did not become ready; its log: {log_path}", file=out)
        print(log_path.read_text()[-3000:], file=out)
        return None
    return proc, port


def _wait_ready(proc: subprocess.Popen[bytes], port_file: Path, timeout: float) -> int | None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        if port_file.exists() and port_file.read_text().strip():
            port = int(port_file.read_text())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    if r.status == 200:
                        return port
            except OSError:
                pass
        time.sleep(0.1)
    return None


async def get_json(port: int, path: str) -> dict[str, Any]:
    """``GET path`` on the daemon, decoded."""
    c = HttpClient("127.0.0.1", port)
    try:
        _, _, data = await c.request("GET", path)
    finally:
        await c.close()
    return dict(json.loads(data))


def stop_daemon(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then wait for the drain (SIGKILL after 60 s); the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)
    return proc.returncode


async def jetstream_stream(url: str, name: str, subjects: list[str], delete: bool = False) -> None:
    """Create JetStream stream ``name`` on ``subjects`` (or delete it): a demo's or bench's own stream."""
    import nats

    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream()
        if delete:
            await js.delete_stream(name)
        else:
            await js.add_stream(name=name, subjects=subjects)
    finally:
        await nc.close()
