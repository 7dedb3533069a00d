"""``collector demo``: the daemon on embedded defaults, driven for a few seconds.

::

    demo ──Popen──► collector serve --port 0 (its own process, workers under it)
      │  GET /ready (bounded wait)
      ├─► N keep-alive connections: POST /events/batch (100 generated events each)
      │     a live line: events/s, request latency, queue, per worker
      ├─► GET /metrics: the final figures; where the events went
      └─► SIGTERM: the daemon drains and exits 0
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
from pathlib import Path
from typing import Any

__all__ = ["HttpClient", "add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``collector demo``."""
    p.add_argument("--duration", type=float, default=5.0, help="seconds of load (default 5)")
    p.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections (default 8)")
    p.add_argument("--batch", type=int, default=100, help="events per POST /events/batch (default 100)")
    p.add_argument("--workers", type=int, default=None, help="daemon workers (default: one per CPU)")
    p.add_argument("--data-dir", default="collector-data", help="where the daemon writes (default ./collector-data)")
    p.add_argument("--invalid-every", type=int, default=500,
                   help="one event in this many is invalid, to show validation and the dead-letter file (0: none)")


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


def _bodies(batch: int, invalid_every: int, n: int = 64) -> list[bytes]:
    """Pre-encoded batch bodies (the server generates ids, so none repeat)."""
    from collector.packs.generic import generate_generic

    out = []
    k = 0
    for b in range(n):
        evs = generate_generic(batch, users=5000, seed=b, with_ids=False)
        for e in evs:
            k += 1
            if invalid_every and k % invalid_every == 0:
                e["type"] = "not_a_type"
        out.append(json.dumps({"events": evs}).encode())
    return out


async def _drive(port: int, args: argparse.Namespace, out: Any) -> dict[str, Any]:
    bodies = _bodies(args.batch, args.invalid_every)
    lat: list[float] = []
    counts = {"accepted": 0, "invalid": 0, "requests": 0, "errors": 0}
    stop = time.monotonic() + args.duration

    async def conn(i: int) -> None:
        c = HttpClient("127.0.0.1", port)
        j = i
        try:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                status, _, data = await c.request("POST", "/events/batch", bodies[j % len(bodies)])
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

    async def status_line() -> None:
        c = HttpClient("127.0.0.1", port)
        t_start = time.monotonic()
        seen = 0
        try:
            while time.monotonic() < stop:
                await asyncio.sleep(0.5)
                _, _, data = await c.request("GET", "/metrics")
                m = json.loads(data)
                recent = sorted(lat[seen:]) or [0.0]
                seen = len(lat)
                per = " ".join(f"w{w['index']} {w['events_per_second']:,.0f}/s" for w in m["workers"])
                print(f"\r  {time.monotonic() - t_start:4.1f}s  {m['events_per_second']:>9,.0f} events/s  "
                      f"request p50 {recent[len(recent) // 2] * 1000:5.1f} ms p99 "
                      f"{recent[int(len(recent) * 0.99)] * 1000:5.1f} ms  queue {m['current_queue_depth']:>6}  {per}   ",
                      end="", file=out, flush=True)
        finally:
            await c.close()
            print(file=out)

    t0 = time.monotonic()
    await asyncio.gather(status_line(), *(conn(i) for i in range(args.connections)))
    wall = time.monotonic() - t0
    lat.sort()
    return {"wall": wall, "latency": lat, **counts}


def run(args: argparse.Namespace) -> int:
    """Start the daemon, drive it, print what happened, stop it."""
    import uvloop

    out = sys.stderr
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port_file = Path(tempfile.mkdtemp(prefix="collector-demo-")) / "port"
    cmd = [sys.executable, "-m", "collector", "serve", "--port", "0", "--data-dir", str(data_dir),
           "--port-file", str(port_file)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    log_path = data_dir / "demo-daemon.log"
    print(f"collector demo: starting the daemon: {' '.join(cmd[1:])}", file=out)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=log_file, start_new_session=True)
        try:
            port = _wait_ready(proc, port_file, timeout=60)
            if port is None:
                print(f"collector demo: the daemon did not become ready; its log: {log_path}", file=out)
                print(log_path.read_text()[-3000:], file=out)
                return 1
            print(f"collector demo: daemon pid {proc.pid} ready on http://127.0.0.1:{port}; "
                  f"{args.connections} connections x {args.batch}-event batches for {args.duration:.0f} s", file=out)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                res = runner.run(_drive(port, args, out))
                m = runner.run(_metrics(port))
        finally:
            code = _stop(proc)
    lat = res["latency"] or [0.0]
    print(f"\nsent {res['requests']:,} requests in {res['wall']:.1f} s: {res['accepted']:,} events accepted "
          f"({res['accepted'] / res['wall']:,.0f} events/s), {res['invalid']:,} invalid, "
          f"{res['errors']} non-2xx requests; request latency p50 {lat[len(lat) // 2] * 1000:.1f} ms, "
          f"p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms", file=out)
    print("final /metrics:", file=out)
    print(json.dumps({k: v for k, v in m.items() if k not in ("workers", "sinks")}, indent=2))
    for s in m.get("sinks", []):
        print(f"  sink {s['name']}: {s['rows']:,} rows in {s['batches']:,} batches, {s['errors']} errors", file=out)
    files = sorted(p for p in data_dir.iterdir() if p.suffix == ".jsonl")
    print(f"output in {data_dir}:", file=out)
    for f in files:
        print(f"  {f.name}: {f.stat().st_size:,} bytes", file=out)
    print(f"  daemon log: {log_path.name}", file=out)
    print(f"the daemon stopped with exit code {code}", file=out)
    return 0 if code == 0 and res["accepted"] > 0 else 1


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


async def _metrics(port: int) -> dict[str, Any]:
    c = HttpClient("127.0.0.1", port)
    try:
        _, _, data = await c.request("GET", "/metrics")
    finally:
        await c.close()
    return dict(json.loads(data))


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)
    return proc.returncode
