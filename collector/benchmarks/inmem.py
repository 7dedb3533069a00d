"""``collector bench inmem``: N playback events, in-memory enrichment, the full path
``handle()`` → result, against the peers, in one alternating run.

For each input format (``--input json,ndjson``: one JSON array, or one event per line)
and each shard mode (``--shard key,chunk``), every round runs the collector once per
worker count and chunk size, then every peer on the same bytes (peers.py): (a) asyncio
+ json, (b) msgspec in one process, (c) a Pool, (d) N processes with no IPC (the
ceiling), (e) Bytewax. Figures are medians over the rounds; the ratios the project
aims at are printed as targets, per input:

* collector ``shard="key"`` ÷ ceiling (d) ≥ 0.80, ``shard="chunk"`` ÷ ceiling ≥ 0.85;
* collector ÷ (b), one process running the plain msgspec loop, ≥ 1.5;
* collector ÷ (e), Bytewax with as many processes, ≥ 1.5; collector ÷ (a) ≥ 7.

(This is where ``bench/engine_ceiling.py``'s NDJSON comparison went: its ceiling is
peer (d) on NDJSON, now a spawned process per CPU that reads its part before the clock
starts instead of a fork inside the timed region.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import defaultdict
from typing import Any

from ..playback import InMemoryClient, playback_pipeline
from . import peers as P
from .common import (
    FORMATS,
    Input,
    ProcSample,
    Progress,
    clear_peak_rss,
    make_input,
    median,
    ncpu,
    spread,
)
from .report import Target, print_table, print_targets

__all__ = ["inmem"]

SHARDS = ("key", "chunk")


def _collector_run(inp: Input, warm: Input, fmt: str, shard: str, workers: int, chunk: int,
                   rnd: int) -> dict[str, Any]:
    from ..engine import Collector

    pipeline = playback_pipeline(InMemoryClient(inp.regions, inp.models), shard=shard)
    payload = inp.body(fmt)
    t0 = time.perf_counter()
    with Collector(pipeline, workers=workers, chunk_size=chunk) as c:
        c.handle(warm.body(fmt)).wait(timeout=120)
        startup = time.perf_counter() - t0
        sup = os.getpid()
        sample = ProcSample([sup, *c.worker_pids()]).start()
        t0 = time.perf_counter()
        op = c.handle(payload)
        t_handle = time.perf_counter() - t0  # the caller is blocked this long inside handle()
        res = op.wait(timeout=600)
        wall = time.perf_counter() - t0
        sample.stop()
    wcpu = [v for pid, v in sample.cpu.items() if pid != sup]
    return {
        "system": "collector", "input": fmt, "shard": shard, "procs": workers, "chunk": chunk, "round": rnd,
        "events": res.handled_events, "failed": res.failed_events, "wall": wall, "eps": inp.n / wall,
        "handle_call_s": t_handle, "op_elapsed_s": res.elapsed, "startup_s": startup,
        "cpu_supervisor": sample.cpu[sup], "cpu_workers": sum(wcpu), "cpu": sample.total_cpu(),
        "rss_supervisor": sample.peak[sup],
        # the harness process holds the payload and the peers' inputs: growth is the supervisor's own
        "rss_supervisor_growth": sample.peak[sup] - sample.rss0[sup],
        "rss_workers": [v for pid, v in sample.peak.items() if pid != sup],
        "by_region": res.batch.counts.get("region", {}),
    }


def _peer_row(r: P.PeerRun, fmt: str, rnd: int, chunk: int | None = None) -> dict[str, Any]:
    # (a), (b) run in the harness process; (c) has the harness as its parent plus the
    # pool; (d), (e) do all their work in their own processes
    main = r.rss[0] if r.peer in "abc" else 0
    work = r.rss[1:] if r.peer == "c" else (r.rss if r.peer in "de" else [])
    return {"system": r.peer, "input": fmt, "shard": None, "procs": r.procs, "chunk": chunk, "round": rnd,
            "events": r.events, "wall": r.wall, "eps": r.events / r.wall if r.wall else 0.0, "cpu": r.cpu,
            "rss_main": main, "rss_workers": work, "by_region": r.by_region}


def _round(inp: Input, warm: Input, args: argparse.Namespace, fmt: str, rnd: int, workdir: str,
           skipped: dict[str, str], prog: Progress) -> list[dict[str, Any]]:
    """One round for one input format: every collector configuration, then every peer."""
    runs: list[dict[str, Any]] = []
    for w in args.workers_list:
        for cs in args.chunks:
            for sh in args.shards:
                runs.append(_collector_run(inp, warm, fmt, sh, w, cs, rnd))
                prog.step(f"{fmt} collector {sh} w={w} chunk={cs}: {runs[-1]['eps']:,.0f} ev/s")
    peers = args.peers
    if "a" in peers:
        clear_peak_rss()
        runs.append(_peer_row(P.naive_asyncio(inp, args.output, fmt=fmt), fmt, rnd))
        prog.step(f"{fmt} (a) {runs[-1]['eps']:,.0f} ev/s")
    if "b" in peers:
        clear_peak_rss()
        runs.append(_peer_row(P.serial_msgspec(inp, args.output, fmt=fmt), fmt, rnd))
        prog.step(f"{fmt} (b) {runs[-1]['eps']:,.0f} ev/s")
    for w in args.workers_list:
        if "c" in peers:
            clear_peak_rss()
            pool = P.PoolPeer(inp, w, batch=2048, output=args.output, out_dir=workdir, fmt=fmt)
            try:
                runs.append(_peer_row(pool.run(), fmt, rnd, 2048))
            finally:
                pool.close()
            prog.step(f"{fmt} (c) x{w} {runs[-1]['eps']:,.0f} ev/s")
        if "d" in peers:
            runs.append(_peer_row(P.SplitPeer(inp, w, workdir, args.output, fmt=fmt).run(), fmt, rnd))
            prog.step(f"{fmt} (d) x{w} {runs[-1]['eps']:,.0f} ev/s")
        if "e" in peers and "e" not in skipped:
            runs.append(_peer_row(P.BytewaxPeer(inp, w, workdir).run(), fmt, rnd))
            prog.step(f"{fmt} (e) x{w} {runs[-1]['eps']:,.0f} ev/s")
    return runs


def _list(text: str | None, allowed: tuple[str, ...], default: str, what: str) -> list[str]:
    out = [x.strip() for x in (text or default).split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad or not out:
        raise SystemExit(f"collector bench inmem: --{what} takes a comma-separated list of {', '.join(allowed)} "
                         f"(got {text!r})")
    return out


def inmem(args: argparse.Namespace) -> dict[str, Any]:
    """N playback events, in-memory enrichment, full path handle() → result, vs the peers."""
    quick = args.quick
    n = args.events or (100_000 if quick else 1_000_000)
    inputs = _list(getattr(args, "input", None), FORMATS, "json,ndjson", "input")
    args.shards = _list(getattr(args, "shard", None), SHARDS, ",".join(SHARDS), "shard")
    args.workers_list = workers = args.workers or list(range(1, ncpu() + 1))
    args.chunks = chunks = args.chunk_sizes or ([2048] if quick else [512, 2048, 8192])
    repeats = args.repeats or (3 if quick else 5)
    peers = args.peers
    print(f"inmem: {n:,} events as {' and '.join(inputs)}, {args.users} users, {args.device_types} device types; "
          f"workers {workers}, chunk sizes {chunks}, shard {','.join(args.shards)}, {repeats} rounds, "
          f"peers {','.join(peers) or 'none'}", file=sys.stderr)
    inp = make_input(n, args.users, args.device_types)
    warm = make_input(min(20_000, n), args.users, args.device_types, seed=1)
    expected = P.job_msgspec(inp.payload, inp.regions, inp.models)[1]
    skipped: dict[str, str] = {}
    if "e" in peers and (why := P.bytewax_missing()):
        skipped["e"] = why
        print(f"peer (e) skipped: {why}", file=sys.stderr)
    per_round = len(inputs) * (len(workers) * len(chunks) * len(args.shards) + ("a" in peers) + ("b" in peers)
                               + len(workers) * (("c" in peers) + ("d" in peers) + ("e" in peers and "e" not in skipped)))
    prog = Progress(per_round * repeats, "inmem", force=args.progress)
    workdir = P.tempdir()
    runs: list[dict[str, Any]] = []
    try:
        for rnd in range(repeats):
            for fmt in inputs:  # alternate the inputs too: a slow minute hits every row alike
                runs.extend(_round(inp, warm, args, fmt, rnd, workdir, skipped, prog))
    finally:
        prog.close()
        shutil.rmtree(workdir, ignore_errors=True)

    wrong = [f"{r['input']} {r['system']} {r['shard'] or ''} x{r['procs']} round {r['round']}" for r in runs
             if r["events"] != n or dict(r["by_region"]) != expected]
    for r in runs:
        del r["by_region"]
    ref_w = min(2, max(workers))
    ref_cs = 2048 if 2048 in chunks else chunks[0]
    summary: list[dict[str, Any]] = []
    targets: list[Target] = []
    for fmt in inputs:
        rows, ts = _summarise([r for r in runs if r["input"] == fmt], fmt, n, repeats, ref_w, ref_cs, args)
        summary += rows
        targets += ts
    coll = [s for s in summary if s["key"] == "collector"]
    if coll:
        print(f"\n  collector: handle() blocks its caller {median([s['handle_call_s'] for s in coll]):.3f} s "
              f"per {n:,}-event batch (median over configs); start-up {median([s['startup_s'] for s in coll]):.2f} s "
              "(not in the timings)")
    if wrong:
        print(f"  WARNING: wrong counts in {wrong}")
    for k, why in skipped.items():
        print(f"  peer ({k}) skipped: {why}")
    if args.output != "count":
        print(f"  note: peers ran with --output {args.output}; the collector ran without a sink")
    print_targets(targets)
    noise = max((s["spread"] for s in summary), default=0.0)
    print(f"  noise: largest run-to-run spread (max-min)/median {noise * 100:.0f}%")

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    flat: dict[str, float] = {}
    for s in summary:
        pre = f"{s['input']}: " if len(inputs) > 1 else ""
        if s["key"] == "collector":
            series[f"{pre}collector shard={s['shard']}, chunk {s['chunk']}"].append((s["procs"], s["eps"]))
        elif s["key"] in "ab":
            flat[pre + s["system"]] = s["eps"]
        else:
            series[pre + s["system"]].append((s["procs"], s["eps"]))
    return {
        "scenario": "inmem",
        "config": {"events": n, "inputs": inputs, "shards": args.shards, "users": args.users,
                   "device_types": args.device_types, "workers": workers, "chunk_sizes": chunks, "repeats": repeats,
                   "peers": peers, "output": args.output, "skipped": skipped},
        "summary": summary,
        "runs": runs,
        "ratios": [t.to_json() for t in targets if "÷" in t.name],
        "targets": [t.to_json() for t in targets],
        "noise_max_spread": noise,
        "plot": {"kind": "throughput",
                 "title": f"inmem: {n:,} playback events, {' / '.join(inputs)} in, enrich from dict, count",
                 "series": dict(series), "flat": flat},
    }


def _summarise(runs: list[dict[str, Any]], fmt: str, n: int, repeats: int, ref_w: int, ref_cs: int,
               args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[Target]]:
    """The medians table of one input format, and its ratios as targets."""
    groups: dict[tuple[str, int, int | None, str | None], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        coll = r["system"] == "collector"
        groups[(r["system"], r["procs"], r["chunk"] if coll else None, r["shard"])].append(r)

    def eps(system: str, procs: int, chunk: int | None = None, shard: str | None = None) -> float:
        return median([r["eps"] for r in groups.get((system, procs, chunk, shard), [])])

    ref_shard = args.shards[0]
    ref = eps("collector", ref_w, ref_cs, ref_shard)
    summary = []
    order = sorted(groups.items(), key=lambda kv: (kv[0][0] != "collector", kv[0][0], kv[0][1], kv[0][2] or 0,
                                                   SHARDS.index(kv[0][3]) if kv[0][3] else 0))
    for (system, procs, chunk, shard), rs in order:
        vals = [r["eps"] for r in rs]
        m = median(vals)
        row: dict[str, Any] = {
            "input": fmt, "system": system if system == "collector" else f"({system}) {P.PEERS[system]}",
            "key": system, "shard": shard, "procs": procs, "chunk": chunk, "runs": len(rs), "eps": m,
            "spread": spread(vals), "ratio": ref / m if m else 0.0, "cpu_per_m": median([r["cpu"] for r in rs]) / n * 1e6,
        }
        if system == "collector":
            row["cpu_sup_per_m"] = median([r["cpu_supervisor"] for r in rs]) / n * 1e6
            row["cpu_workers_per_m"] = median([r["cpu_workers"] for r in rs]) / n * 1e6
            row["rss_supervisor"] = max(r["rss_supervisor"] for r in rs)
            row["rss_supervisor_growth"] = max(r["rss_supervisor_growth"] for r in rs)
            row["rss_worker"] = max(max(r["rss_workers"]) for r in rs)
            row["handle_call_s"] = median([r["handle_call_s"] for r in rs])
            row["startup_s"] = median([r["startup_s"] for r in rs])
        else:
            row["rss_supervisor"] = max(r["rss_main"] for r in rs)
            row["rss_worker"] = max((max(r["rss_workers"], default=0) for r in rs), default=0)
        summary.append(row)

    mib = 2**20
    print_table(
        f"inmem, {fmt} input: {n:,} events; medians of {repeats} alternating rounds; ratio = collector "
        f"({ref_w} workers, chunk {ref_cs}, shard {ref_shard}) ÷ row",
        ["system", "shard", "procs", "chunk", "events/s", "spread", "collector ÷", "CPU s/1M", "sup CPU s/1M",
         "workers CPU s/1M", "peak RSS main MiB", "main growth MiB", "peak RSS worker MiB"],
        [[s["system"], s["shard"] or "", s["procs"], s["chunk"] or "", s["eps"], f"{s['spread'] * 100:.0f}%",
          f"{s['ratio']:.2f}x", s["cpu_per_m"], s.get("cpu_sup_per_m", ""), s.get("cpu_workers_per_m", ""),
          s["rss_supervisor"] / mib or "-", s.get("rss_supervisor_growth", 0) / mib or "-",
          s["rss_worker"] / mib or "-"] for s in summary],
    )
    targets = []
    for shard in args.shards:
        c = eps("collector", ref_w, ref_cs, shard)
        for key, procs, bar, what in (
            ("d", ref_w, 0.80 if shard == "key" else 0.85, f"ceiling (d) {ref_w} processes, no IPC"),
            ("b", 1, 1.5, "(b) msgspec loop, 1 process"),
            ("e", ref_w, 1.5, f"(e) Bytewax x{ref_w}"),
            ("a", 1, 7.0, "(a) asyncio + json"),
        ):
            pe = eps(key, procs)
            if key in args.peers and pe and c:
                targets.append(Target(f"inmem {fmt}: collector x{ref_w} shard={shard} ÷ {what}", c / pe, bar, "x"))
    return summary, targets
