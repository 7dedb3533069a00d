"""The scenarios of ``collector bench``. Each takes the parsed options and returns a
JSON-able dict (``runs``, ``summary``, ``targets``, ``plots``); it prints its own
table and targets as it finishes.

Every timed collector run starts from a running collector whose workers have seen a
small warm-up batch: start-up (spawning, importing) is measured apart, as are the
peers' pools and processes. Repeated runs alternate collector and peers (A B A B ...)
so a slow minute on this shared machine hits both, and figures are medians.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import subprocess
import sys
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator
from math import ceil
from pathlib import Path
from typing import Any

import msgspec

from ..playback import playback_pipeline
from .common import (
    ProcSample,
    Progress,
    make_input,
    median,
    ncpu,
    percentile,
    spread,
)
from .report import Target, print_table, print_targets

__all__ = ["fake_service", "http", "seed_000", "service", "slow_service"]


def _collector(pipeline: Any, **kw: Any) -> Any:
    from ..engine import Collector

    return Collector(pipeline, **kw)


def _round(x: float, k: int = 4) -> float:
    return float(f"{x:.{k}g}")


# ====================================================================== slow-service


def _lower_bound(user_ids: list[str], devices_by_worker: list[set[str]], workers: int, latency: float, conc: int) -> float:
    """latency * ⌈distinct keys ÷ concurrency⌉ for the worker with the most keys.

    Users are sharded (crc32, as the supervisor does), so worker w fetches only its own
    users; every worker that sees a device type fetches it itself. The two lookups run
    at once, so the bound is the larger of the two, per worker, then the slowest worker.
    """
    per_worker: list[set[str]] = [set() for _ in range(workers)]
    for u in set(user_ids):
        per_worker[zlib.crc32(u.encode()) % workers if workers > 1 else 0].add(u)
    rounds = max(max(ceil(len(us) / conc), ceil(len(ds) / conc)) for us, ds in zip(per_worker, devices_by_worker, strict=True))
    return latency * rounds


def slow_service(args: argparse.Namespace) -> dict[str, Any]:
    """A service with latency L: wall time beside the lower bound and beside CPU time."""
    from .clients import FixedLatencyAsync

    quick = args.quick
    n = args.events or (20_000 if quick else 100_000)
    users = args.users if args.users != 2000 or quick else 10_000
    L = 0.05 if args.latency is None else args.latency
    workers = max(args.workers) if args.workers else ncpu()
    concs = args.concurrency or ([256] if quick else [256, 32])
    op_size = args.op_size
    repeats = args.repeats or (1 if quick else 3)
    inp = make_input(n, users, args.device_types, seed=7)
    raw = msgspec.json.decode(inp.payload)
    uids = [e["user_id"] for e in raw]
    devs_by_worker: list[set[str]] = [set() for _ in range(workers)]
    for e in raw:
        devs_by_worker[zlib.crc32(e["user_id"].encode()) % workers if workers > 1 else 0].add(e["device_type"])
    ops_payloads = [msgspec.json.encode(raw[i : i + op_size]) for i in range(0, n, op_size)]
    del raw
    variants: list[tuple[str, dict[str, Any], bool]] = []
    for c in concs:
        variants.append((f"cold cache, concurrency {c}", {"concurrency": c}, True))
    variants.append((f"no cache (ttl 0), concurrency {concs[0]}", {"concurrency": concs[0], "cache_ttl": 0.0}, False))
    print(f"slow-service: {n:,} events in {len(ops_payloads)} operations of {op_size}, {len(set(uids)):,} users, "
          f"{args.device_types} device types, service {L * 1000:.0f} ms per call, {workers} workers, {repeats} rounds",
          file=sys.stderr)
    prog = Progress(repeats * (len(variants) + 1), "slow-service", force=args.progress)
    runs: list[dict[str, Any]] = []
    latencies: dict[str, list[float]] = defaultdict(list)
    for rnd in range(repeats):
        for name, opts, also_warm in variants:
            conc = opts["concurrency"]
            pipeline = playback_pipeline(FixedLatencyAsync(L), **opts)
            with _collector(pipeline, workers=workers, max_inflight=max(1_000_000, n)) as c:
                passes = [("", True)] + ([("warm cache, " + name.split(", ", 1)[1], False)] if also_warm else [])
                for label, cold in passes:
                    label = label or name
                    sample = ProcSample([os.getpid(), *c.worker_pids()]).start()
                    t0 = time.perf_counter()
                    ops = [c.handle(p) for p in ops_payloads]
                    results = [op.wait(timeout=600) for op in ops]
                    wall = time.perf_counter() - t0
                    sample.stop()
                    # with no cache every chunk fetches its keys again: no simple bound, none shown
                    lb = _lower_bound(uids, devs_by_worker, workers, L, conc) if cold and "ttl 0" not in label else 0.0
                    calls = sum(lk.calls for r in results for lk in r.batch.lookups.values())
                    hits = sum(lk.cache_hits for r in results for lk in r.batch.lookups.values())
                    coal = sum(lk.coalesced for r in results for lk in r.batch.lookups.values())
                    fails = sum(r.batch.lookup_failures for r in results)
                    p99s = [lk.latency_p99 for r in results for lk in r.batch.lookups.values() if lk.calls]
                    runs.append({
                        "variant": label, "round": rnd, "concurrency": conc, "events": sum(r.handled_events for r in results),
                        "wall": wall, "lower_bound": lb, "cpu": sample.total_cpu(), "calls": calls, "cache_hits": hits,
                        "coalesced": coal, "lookup_failures": fails, "call_p99_max": max(p99s, default=0.0),
                        "op_latency": sorted(r.elapsed for r in results),
                    })
                    latencies[label].extend(r.elapsed for r in results)
                    prog.step(f"{label}: {wall:.2f} s (bound {lb:.2f} s)")
    prog.close()
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[r["variant"]].append(r)
    summary = []
    for label, rs in groups.items():
        wall = median([r["wall"] for r in rs])
        lb = rs[0]["lower_bound"]
        lat = sorted(x for r in rs for x in r["op_latency"])
        summary.append({
            "variant": label, "runs": len(rs), "wall": wall, "spread": spread([r["wall"] for r in rs]),
            "lower_bound": lb, "wall_over_bound": wall / lb if lb else 0.0, "cpu": median([r["cpu"] for r in rs]),
            "calls": median([r["calls"] for r in rs]), "cache_hits": median([r["cache_hits"] for r in rs]),
            "coalesced": median([r["coalesced"] for r in rs]), "lookup_failures": max(r["lookup_failures"] for r in rs),
            "op_p50": percentile(lat, 0.5), "op_p99": percentile(lat, 0.99),
            "eps": n / wall if wall else 0.0,
        })
    for r in runs:
        r["op_latency"] = [_round(x) for x in r["op_latency"]]
    print_table(
        f"slow-service: {n:,} events, {L * 1000:.0f} ms per call; bound = L * ⌈keys per worker ÷ concurrency⌉ "
        f"(max over workers and lookups); medians of {repeats}",
        ["variant", "wall s", "spread", "bound s", "wall ÷ bound", "CPU s", "events/s", "calls", "cache hits",
         "coalesced", "failures", "op p50 s", "op p99 s"],
        [[s["variant"], s["wall"], f"{s['spread'] * 100:.0f}%", s["lower_bound"] or "-",
          f"{s['wall_over_bound']:.2f}x" if s["lower_bound"] else "-", s["cpu"], s["eps"], s["calls"],
          s["cache_hits"], s["coalesced"], s["lookup_failures"], s["op_p50"], s["op_p99"]] for s in summary],
    )
    targets = [Target(f"slow-service wall ÷ lower bound ({s['variant']})", s["wall_over_bound"], 1.5, "x",
                      higher_is_better=False)
               for s in summary if s["variant"].startswith("cold") and s["lower_bound"]]
    print_targets(targets)
    marks = {f"bound c={c}": _lower_bound(uids, devs_by_worker, workers, L, c) for c in concs}
    return {
        "scenario": "slow-service",
        "config": {"events": n, "users": len(set(uids)), "device_types": args.device_types, "latency": L,
                   "workers": workers, "concurrency": concs, "op_size": op_size, "repeats": repeats},
        "summary": summary, "runs": runs, "targets": [t.to_json() for t in targets],
        "plot": {"kind": "cdf", "title": f"slow-service: operation latency ({op_size} events each, all submitted at t=0)",
                 "series": {k: [_round(x) for x in v] for k, v in latencies.items()},
                 "xlabel": "seconds from handle() to result", "marks": marks},
    }


# ====================================================================== seed-000


def seed_000(args: argparse.Namespace) -> dict[str, Any]:
    """Seed 000's test: 10 events through a 5 s-per-call service, blocking and async clients."""
    from ..playback import PlaybackEvent
    from .clients import FixedLatencyAsync, FixedLatencyBlocking

    L = 5.0 if args.latency is None else args.latency  # the seed's service takes 5 s per call
    repeats = args.repeats or (1 if args.quick else 3)
    workers = max(args.workers) if args.workers else ncpu()
    prog = Progress(repeats * 2, "seed-000", force=args.progress)
    runs = []
    for kind, client in (("blocking", FixedLatencyBlocking(L)), ("async", FixedLatencyAsync(L))):
        t0 = time.perf_counter()
        with _collector(playback_pipeline(client), workers=workers) as c:
            startup = time.perf_counter() - t0
            for rnd in range(repeats):
                # fresh users and device types every round: a cache hit would hide the service
                events = [PlaybackEvent(id=i, user_id=f"seed-{rnd}-user-{i}", video_id=f"v{i}", start_at=1_700_000_000,
                                        stop_at=1_700_000_060 + i, bitrate_kbps=3000, device_type=f"seed-{rnd}-dev-{i % 3}")
                          for i in range(10)]
                t0 = time.perf_counter()
                res = c.handle(events, return_events=True).wait(timeout=120)
                wall = time.perf_counter() - t0
                filled = sum(1 for e in res.events or [] if e is not None and e.region and e.model)
                runs.append({"client": kind, "round": rnd, "wall": wall, "handled": res.handled_events,
                             "enriched": filled, "startup_s": startup,
                             "calls": {k: v.calls for k, v in res.batch.lookups.items()}})
                prog.step(f"{kind}: {wall:.2f} s")
    prog.close()
    summary = []
    for kind in ("blocking", "async"):
        rs = [r for r in runs if r["client"] == kind]
        summary.append({"client": kind, "runs": len(rs), "wall": median([r["wall"] for r in rs]),
                        "max": max(r["wall"] for r in rs), "enriched": min(r["enriched"] for r in rs),
                        "startup_s": rs[0]["startup_s"], "calls": rs[-1]["calls"]})
    print_table(f"seed-000: 10 events, {L:.1f} s per call, {workers} workers (start-up not included)",
                ["client", "runs", "wall s (median)", "wall s (max)", "enriched /10", "start-up s", "calls"],
                [[s["client"], s["runs"], s["wall"], s["max"], s["enriched"], s["startup_s"], s["calls"]] for s in summary])
    targets = []
    for s in summary:
        targets.append(Target(f"seed-000 {s['client']} wall (limit {L:.1f} s + 6%)", s["max"], L + 0.3, " s", False))
        targets.append(Target(f"seed-000 {s['client']} wall (the seed's bar)", s["max"], 3 * L, " s", False))
    print_targets(targets)
    return {"scenario": "seed-000", "config": {"latency": L, "events": 10, "workers": workers, "repeats": repeats},
            "summary": summary, "runs": runs, "targets": [t.to_json() for t in targets]}


# ====================================================================== http


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def http(args: argparse.Namespace) -> dict[str, Any]:
    """The daemon under HTTP load: runs ``bench/http_load.py`` and returns its JSON results.

    ``--quick``, ``--duration``, ``--repeats`` (rounds) and the largest ``--workers`` are
    passed on. Words after a ``--`` that directly follows ``http`` go to the load
    generator as they are (``collector bench --quick http -- --wrk --clients 2``; argparse
    puts the first of them into ``url``, so it is put back in front).
    """
    import tempfile

    reasons = []
    if importlib.util.find_spec("collector.commands.serve") is None:
        reasons.append("`collector serve` is not installed (collector/commands/serve.py is missing)")
    load = _repo_root() / "bench" / "http_load.py"
    if not load.exists():
        reasons.append(f"the load generator {load} is not here: it ships with the repository, not the package; "
                       "run from a clone")
    if reasons:
        why = "http scenario absent: " + "; ".join(reasons)
        print(why)
        return {"scenario": "http", "skipped": why}
    passed = [*(["--quick"] if args.quick else []),
              *(["--duration", str(args.duration)] if args.duration else []),
              *(["--rounds", str(args.repeats)] if args.repeats else []),
              *(["--workers", str(max(args.workers))] if args.workers else [])]
    extra = [*([args.url] if args.url else []), *args.extra]
    with tempfile.TemporaryDirectory(prefix="bench-http-") as d:
        result_file = os.path.join(d, "http.json")
        cmd = [sys.executable, str(load), *passed, *extra, "--result-file", result_file]
        print("http: running " + " ".join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        # its "results:" line names the temporary file; run() prints where ours goes
        print("".join(line for line in proc.stdout.splitlines(keepends=True)
                      if line.strip() != f"results: {result_file}"), end="")
        if proc.returncode:
            print(proc.stderr, file=sys.stderr, end="")
        try:
            with open(result_file, "rb") as f:
                result = msgspec.json.decode(f.read())
        except (OSError, msgspec.DecodeError):
            result = {}
    return {**result, "scenario": "http", "command": cmd, "returncode": proc.returncode, "stdout": proc.stdout}


# ====================================================================== service URL


def service(args: argparse.Namespace) -> dict[str, Any]:
    """Point a collector at an HTTP enrichment endpoint; sustainable events/s and latencies."""
    from .clients import HttpEnrichClient

    if not args.url:
        raise SystemExit("collector bench service: give the endpoint URL (see --help for its contract)")
    if args.url == "loopback":
        # the built-in loopback endpoint: shows the contract and the client's own cost
        with fake_service(latency=0.005 if args.latency is None else args.latency) as url:
            return service(argparse.Namespace(**{**vars(args), "url": url}))
    duration = args.duration or (3.0 if args.quick else 15.0)
    workers = max(args.workers) if args.workers else ncpu()
    conc = (args.concurrency or [64])[0]
    op_size = args.op_size
    users = args.users
    pipeline = playback_pipeline(HttpEnrichClient(args.url, connections=conc, timeout=args.timeout),
                                 concurrency=conc, cache_ttl=args.cache_ttl, timeout=args.timeout, retries=1)
    pool = make_input(op_size * 50, users, args.device_types, seed=3)
    raw = msgspec.json.decode(pool.payload)
    payloads = [msgspec.json.encode(raw[i : i + op_size]) for i in range(0, len(raw), op_size)]
    del raw
    print(f"service: {args.url}; {workers} workers, concurrency {conc} per lookup per worker, cache ttl "
          f"{args.cache_ttl} s, {users} users, operations of {op_size} events, {duration:.0f} s", file=sys.stderr)
    inflight_ops = max(2, 2 * workers)
    results: list[Any] = []
    prog = Progress(int(duration), "service", force=args.progress)
    with _collector(pipeline, workers=workers) as c:
        c.handle(payloads[0]).wait(timeout=120)  # connect, warm up
        sample = ProcSample([os.getpid(), *c.worker_pids()]).start()
        t0 = time.perf_counter()
        pending: list[Any] = []
        i = 0
        last = 0
        while time.perf_counter() - t0 < duration:
            while len(pending) < inflight_ops:
                pending.append(c.handle(payloads[i % len(payloads)]))
                i += 1
            results.append(pending.pop(0).wait(timeout=600))
            el = int(time.perf_counter() - t0)
            if el > last:
                prog.step(f"{sum(r.handled_events for r in results) / (time.perf_counter() - t0):,.0f} ev/s", el - last)
                last = el
        results.extend(op.wait(timeout=600) for op in pending)
        wall = time.perf_counter() - t0
        sample.stop()
        st = c.stats()
    prog.close()
    handled = sum(r.handled_events for r in results)
    calls = sum(lk.calls for r in results for lk in r.batch.lookups.values())
    fails = sum(r.batch.lookup_failures for r in results)
    op_lat = sorted(r.elapsed for r in results)
    call_p50 = median([lk.latency_p50 for r in results for lk in r.batch.lookups.values() if lk.calls])
    call_p99 = percentile(sorted(lk.latency_p99 for r in results for lk in r.batch.lookups.values() if lk.calls), 0.5)
    summary = {"events": handled, "wall": wall, "eps": handled / wall, "calls": calls, "calls_per_s": calls / wall,
               "lookup_failures": fails, "op_p50": percentile(op_lat, 0.5), "op_p90": percentile(op_lat, 0.9),
               "op_p99": percentile(op_lat, 0.99), "call_p50_median": call_p50, "call_p99_median": call_p99,
               "cpu": sample.total_cpu(), "cache_hits": st.cache_hits}
    print_table(f"service {args.url}: sustained over {wall:.1f} s",
                ["events/s", "calls/s", "failures", "op p50 s", "op p90 s", "op p99 s", "call p50 ms", "call p99 ms", "CPU s"],
                [[summary["eps"], summary["calls_per_s"], fails, summary["op_p50"], summary["op_p90"], summary["op_p99"],
                  call_p50 * 1000, call_p99 * 1000, summary["cpu"]]])
    return {"scenario": "service", "config": {"url": args.url, "workers": workers, "concurrency": conc,
                                              "cache_ttl": args.cache_ttl, "users": users, "op_size": op_size,
                                              "duration": duration}, "summary": summary,
            "plot": {"kind": "cdf", "title": f"service: operation latency ({op_size} events each)",
                     "xlabel": "seconds from handle() to result", "series": {"operations": [_round(x) for x in op_lat]}}}


@contextlib.contextmanager
def fake_service(latency: float = 0.0, fail_rate: float = 0.0) -> Iterator[str]:
    """A loopback enrichment endpoint that follows the ``service`` contract (tests, demos).

    Runs an aiohttp server on 127.0.0.1 on a thread; yields its URL.
    """
    import asyncio
    import random

    try:
        from aiohttp import web
    except ImportError as e:
        from ..errors import missing

        raise missing("aiohttp", "http", "the loopback enrichment service") from e
    from ..playback import model_of, region_of

    async def handler(request: Any) -> Any:
        if latency:
            await asyncio.sleep(latency)
        if fail_rate and random.random() < fail_rate:
            return web.json_response({"error": "simulated"}, status=503)
        q = request.query
        if "user_id" in q:
            return web.json_response({"region": region_of(q["user_id"]), "seconds": latency})
        if "device_type" in q:
            return web.json_response({"model": model_of(q["device_type"]), "seconds": latency})
        return web.json_response({"error": "give user_id or device_type"}, status=400)

    ready = threading.Event()
    state: dict[str, Any] = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        state["loop"] = loop
        app = web.Application()
        app.router.add_get("/enrich", handler)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        state["port"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()
        stop = state["stop"] = asyncio.Event()
        loop.run_until_complete(stop.wait())
        loop.run_until_complete(runner.cleanup())
        loop.close()

    t = threading.Thread(target=serve, name="fake-enrichment-service", daemon=True)
    t.start()
    if not ready.wait(10):
        raise RuntimeError("the loopback enrichment service did not start")
    try:
        yield f"http://127.0.0.1:{state['port']}/enrich"
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        t.join(10)
