"""The peers the collector is measured against, doing the same job on the same bytes.

The job: decode the JSON array → set ``region`` and ``model`` from dicts → count
events per region and per device type (what the collector's playback pipeline does
with no sink). ``output="encode"`` adds encoding the enriched events to JSON and
``output="jsonl"`` writing them to a JSONL file, for when the collector runs a sink.

=====  ==========================================================================
(a)    one process, asyncio (stdlib loop) + stdlib ``json``, one ``await`` per lookup:
       what a first version usually looks like
(b)    one process, msgspec decode into Structs, plain loop: the best serial code
(c)    ``multiprocessing.Pool.imap`` over pickled batches of decoded events
(d)    N processes, each decoding and enriching 1/N of the input, no IPC at all:
       the ceiling for N cores (nobody can beat it on this job)
(e)    Bytewax 0.21 with N processes (when installed): a dataflow engine's cost
=====  ==========================================================================

Every peer but (e) takes its input in the format the collector gets (``fmt``):
``"json"``, one JSON array, or ``"ndjson"``, one event per line (decoded with
``decode_lines``; peer (a) calls ``json.loads`` per line). Peer (e) always reads JSON
lines, one file per process, which is how a Bytewax source reads.

Setup (spawning pools and processes, reading their part of the input) is outside the
timed region, as the collector's start-up is.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import msgspec

from ..playback import PlaybackEvent
from .common import Input, peak_rss

__all__ = [
    "PEERS",
    "BytewaxPeer",
    "PeerRun",
    "PoolPeer",
    "SplitPeer",
    "bytewax_missing",
    "decode",
    "job_msgspec",
    "naive_asyncio",
    "serial_msgspec",
]

PEERS = {
    "a": "asyncio + stdlib json, 1 process",
    "b": "msgspec, 1 process",
    "c": "multiprocessing.Pool.imap, pickled batches",
    "d": "N processes, 1/N of the input each, no IPC (ceiling)",
    "e": "Bytewax 0.21, N processes",
}

_DEC = msgspec.json.Decoder(list[PlaybackEvent])
_LINES = msgspec.json.Decoder(PlaybackEvent)
_ENC = msgspec.json.Encoder()
_region = attrgetter("region")
_device = attrgetter("device_type")


@dataclass
class PeerRun:
    """One timed run of a peer."""

    peer: str
    procs: int
    events: int
    wall: float
    cpu: float  # CPU seconds of every process doing the job, during the timed run
    rss: list[int]  # peak RSS of each process doing the job
    by_region: dict[str, int] = field(default_factory=dict)


def _emit(events: Any, output: str, out_path: str | None) -> None:
    if output == "encode":
        _ENC.encode(events)
    elif output == "jsonl" and out_path:
        with open(out_path, "wb") as f:
            f.write(_ENC.encode_lines(events))


def decode(payload: bytes, fmt: str = "json") -> list[PlaybackEvent]:
    """``payload`` (a JSON array, or NDJSON when ``fmt="ndjson"``) as ``PlaybackEvent`` Structs."""
    return _LINES.decode_lines(payload) if fmt == "ndjson" else _DEC.decode(payload)


def job_msgspec(
    payload: bytes, regions: dict[str, str], models: dict[str, str], output: str = "count",
    out_path: str | None = None, fmt: str = "json",
) -> tuple[int, dict[str, int], dict[str, int]]:
    """The job with msgspec: decode, enrich from the dicts, count; returns (n, by_region, by_device)."""
    events = decode(payload, fmt)
    for e in events:
        e.region = regions[e.user_id]
        e.model = models[e.device_type]
    by_region = Counter(map(_region, events))
    by_dev = Counter(map(_device, events))
    _emit(events, output, out_path)
    return len(events), dict(by_region), dict(by_dev)


# ---------------------------------------------------------------- (a) naive asyncio


class _DictClient:
    """An async client answering from dicts, the way a naive service wrapper looks."""

    def __init__(self, regions: dict[str, str], models: dict[str, str]) -> None:
        self.regions = regions
        self.models = models

    async def get_region(self, user_id: str) -> str:
        return self.regions[user_id]

    async def get_model(self, device_type: str) -> str:
        return self.models[device_type]


async def _naive(inp: Input, output: str, out_path: str | None, fmt: str) -> tuple[int, dict[str, int]]:
    client = _DictClient(inp.regions, inp.models)
    events = [json.loads(line) for line in inp.body(fmt).splitlines()] if fmt == "ndjson" else json.loads(inp.payload)
    by_region: dict[str, int] = {}
    by_dev: dict[str, int] = {}
    for e in events:
        e["region"] = await client.get_region(e["user_id"])
        e["model"] = await client.get_model(e["device_type"])
        by_region[e["region"]] = by_region.get(e["region"], 0) + 1
        by_dev[e["device_type"]] = by_dev.get(e["device_type"], 0) + 1
    if output == "encode":
        json.dumps(events)
    elif output == "jsonl" and out_path:
        with open(out_path, "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in events)
    return len(events), by_region


def naive_asyncio(inp: Input, output: str = "count", out_path: str | None = None, fmt: str = "json") -> PeerRun:
    """Peer (a): stdlib asyncio loop, stdlib json, one await per lookup."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    n, by_region = asyncio.run(_naive(inp, output, out_path, fmt))
    return PeerRun("a", 1, n, time.perf_counter() - t0, time.process_time() - c0, [peak_rss()], by_region)


# ---------------------------------------------------------------- (b) serial msgspec


def serial_msgspec(inp: Input, output: str = "count", out_path: str | None = None, fmt: str = "json") -> PeerRun:
    """Peer (b): one process, msgspec (``decode_lines`` for NDJSON), a plain loop."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    n, by_region, _ = job_msgspec(inp.body(fmt), inp.regions, inp.models, output, out_path, fmt)
    return PeerRun("b", 1, n, time.perf_counter() - t0, time.process_time() - c0, [peak_rss()], by_region)


# ---------------------------------------------------------------- (c) Pool.imap

_pool_state: dict[str, Any] = {}


def _pool_init(regions: dict[str, str], models: dict[str, str], output: str, out_dir: str | None) -> None:
    _pool_state.update(regions=regions, models=models, output=output, out_dir=out_dir, seq=0)


def _pool_pid(_: int) -> int:
    time.sleep(0.05)  # long enough that every pool process takes one
    return os.getpid()


def _pool_batch(batch: list[PlaybackEvent]) -> tuple[int, dict[str, int], dict[str, int], int]:
    s = _pool_state
    regions, models = s["regions"], s["models"]
    for e in batch:
        e.region = regions[e.user_id]
        e.model = models[e.device_type]
    out_path = None
    if s["output"] == "jsonl" and s["out_dir"]:
        s["seq"] += 1
        out_path = os.path.join(s["out_dir"], f"pool-{os.getpid()}-{s['seq']}.jsonl")
    _emit(batch, s["output"], out_path)
    return len(batch), dict(Counter(map(_region, batch))), dict(Counter(map(_device, batch))), peak_rss()


class PoolPeer:
    """Peer (c): the parent decodes, pickles batches to a ``Pool`` of ``procs``, merges counts."""

    def __init__(self, inp: Input, procs: int, batch: int = 2048, output: str = "count", out_dir: str | None = None,
                 fmt: str = "json") -> None:
        self.inp = inp
        self.procs = procs
        self.batch = batch
        self.fmt = fmt
        self.pool = mp.get_context("spawn").Pool(
            procs, initializer=_pool_init, initargs=(inp.regions, inp.models, output, out_dir)
        )
        self.pids = sorted(set(self.pool.map(_pool_pid, range(procs * 4), chunksize=1)))

    def run(self) -> PeerRun:
        """One timed run."""
        import psutil

        procs = [psutil.Process(p) for p in self.pids]
        cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
        me0 = time.process_time()
        t0 = time.perf_counter()
        events = decode(self.inp.body(self.fmt), self.fmt)
        b = self.batch
        batches = [events[i : i + b] for i in range(0, len(events), b)]
        n = 0
        by_region: Counter[str] = Counter()
        by_dev: Counter[str] = Counter()
        rss: dict[int, int] = {}
        for k, r, d, _peak in self.pool.imap(_pool_batch, batches):
            n += k
            by_region.update(r)
            by_dev.update(d)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - me0 + sum(sum(p.cpu_times()[:2]) - c for p, c in zip(procs, cpu0, strict=True))
        for p in procs:
            rss[p.pid] = peak_rss(p.pid)
        return PeerRun("c", self.procs, n, wall, cpu, [peak_rss(), *rss.values()], dict(by_region))

    def close(self) -> None:
        """Stop the pool."""
        self.pool.terminate()
        self.pool.join()


# ---------------------------------------------------------------- (d) split, no IPC


def _split_main(conn: Any, path: str, regions: dict[str, str], models: dict[str, str], output: str, out_path: str | None,
                cpu: int | None, fmt: str) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    with open(path, "rb") as f:
        payload = f.read()
    conn.send("ready")
    conn.recv()
    c0 = time.process_time()
    n, by_region, _ = job_msgspec(payload, regions, models, output, out_path, fmt)
    conn.send((n, time.process_time() - c0, peak_rss(), by_region))
    conn.recv()


class SplitPeer:
    """Peer (d): ``procs`` processes pinned one per CPU, each with 1/procs of the input.

    Each process reads its part from a file and says ready before the clock starts;
    the parent only sends "go" and collects counts, so there is no IPC on the data:
    the ceiling for ``procs`` cores, whatever the input format.
    """

    def __init__(self, inp: Input, procs: int, workdir: str, output: str = "count", fmt: str = "json") -> None:
        self.inp = inp
        self.procs = procs
        self.output = output
        self.workdir = workdir
        self.fmt = fmt
        self.paths = []
        for i, part in enumerate(inp.split(procs, fmt)):
            p = os.path.join(workdir, f"split-{procs}-{i}.{fmt}")
            if not os.path.exists(p):
                with open(p, "wb") as f:
                    f.write(part)
            self.paths.append(p)

    def run(self) -> PeerRun:
        """Spawn, wait for ready, then time go → every count back."""
        ctx = mp.get_context("spawn")
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        procs, conns = [], []
        for i, path in enumerate(self.paths):
            parent, child = ctx.Pipe()
            out = os.path.join(self.workdir, f"split-out-{i}.jsonl") if self.output == "jsonl" else None
            p = ctx.Process(
                target=_split_main,
                args=(child, path, self.inp.regions, self.inp.models, self.output, out,
                      cpus[i % len(cpus)] if cpus else None, self.fmt),
                daemon=True,
            )
            p.start()
            procs.append(p)
            conns.append(parent)
        try:
            for c in conns:
                if not c.poll(60):
                    raise RuntimeError("peer (d): a process did not get ready within 60 s")
                c.recv()
            t0 = time.perf_counter()
            for c in conns:
                c.send("go")
            results = [c.recv() for c in conns]
            wall = time.perf_counter() - t0
            for c in conns:
                c.send("bye")
        finally:
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()
        by_region: Counter[str] = Counter()
        for r in results:
            by_region.update(r[3])
        return PeerRun(
            "d", self.procs, sum(r[0] for r in results), wall, sum(r[1] for r in results),
            [r[2] for r in results], dict(by_region),
        )

    def close(self) -> None:
        """Nothing stays running between runs."""


# ---------------------------------------------------------------- (e) Bytewax


def bytewax_missing() -> str | None:
    """Why the Bytewax peer cannot run here, or None when it can."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        v = version("bytewax")
    except PackageNotFoundError:
        return "bytewax is not installed (pip install 'bytewax==0.21.*')"
    if not v.startswith("0.21."):
        return f"bytewax {v} is installed; the peer is written for 0.21"
    return None


def _free_ports(k: int) -> list[int]:
    socks = []
    try:
        for _ in range(k):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class BytewaxPeer:
    """Peer (e): the job as a Bytewax dataflow over ``procs`` processes (one worker each).

    Each process reads its own part (a JSONL file) as one source partition, maps every
    line (decode + enrich), and ``count_final`` counts per region and device type (a
    keyed exchange between the processes, which is how a Bytewax user counts). The
    time runs from the first batch read to the last partition closed, as recorded by
    the flow itself, so interpreter start and Bytewax's cluster set-up are excluded.
    """

    def __init__(self, inp: Input, procs: int, workdir: str) -> None:
        self.inp = inp
        self.procs = procs
        self.dir = os.path.join(workdir, f"bytewax-{procs}")
        os.makedirs(self.dir, exist_ok=True)
        for i, part in enumerate(inp.split(procs, "ndjson")):
            path = os.path.join(self.dir, f"part{i}.jsonl")
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    f.write(part)
        with open(os.path.join(self.dir, "dicts.json"), "wb") as f:
            f.write(_ENC.encode({"regions": inp.regions, "models": inp.models}))

    def run(self) -> PeerRun:
        """Start the cluster, wait for it, read the flow's own timings."""
        for name in os.listdir(self.dir):
            if name.startswith(("start-", "end-")):
                os.unlink(os.path.join(self.dir, name))
        addrs = ";".join(f"127.0.0.1:{p}" for p in _free_ports(self.procs))
        procs = []
        for i in range(self.procs):
            env = dict(os.environ, COLLECTOR_BENCH_BW_DIR=self.dir, COLLECTOR_BENCH_BW_PROC=str(i))
            cmd = [sys.executable, "-m", "bytewax.run", "collector.benchmarks.bytewax_flow:flow", "-i", str(i), "-a", addrs]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        errs = []
        for p in procs:
            try:
                _, err = p.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            if p.returncode:
                errs.append(err.decode(errors="replace")[-2000:])
        if errs:
            raise RuntimeError("peer (e) bytewax failed:\n" + "\n".join(errs))
        starts, ends, cpu, rss = [], [], 0.0, []
        by_region: Counter[str] = Counter()
        n = 0
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if name.startswith("start-"):
                with open(path) as f:
                    starts.append(float(f.read()))
            elif name.startswith("end-"):
                with open(path, "rb") as f:
                    d = msgspec.json.decode(f.read())
                ends.append(d["t"])
                cpu += d["cpu"]
                rss.append(d["rss"])
                by_region.update(d["by_region"])
                n += sum(d["by_region"].values())
        if not starts or not ends:
            raise RuntimeError("peer (e) bytewax wrote no timings")
        return PeerRun("e", self.procs, n, max(ends) - min(starts), cpu, rss, dict(by_region))

    def close(self) -> None:
        """Remove the parts."""
        shutil.rmtree(self.dir, ignore_errors=True)


def tempdir() -> str:
    """A scratch directory for peer inputs and outputs."""
    return tempfile.mkdtemp(prefix="collector-bench-")
