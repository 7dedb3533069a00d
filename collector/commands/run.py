"""``collector run``: a playback batch through the built-in simulated service.

The main job on embedded defaults: it needs no server and no configuration. It prints
progress while the batch runs, then the batch's workload statistics and the
collector's statistics.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``collector run``."""
    p.add_argument("--events", type=int, default=200_000, help="events in the batch (default 200000)")
    p.add_argument("--users", type=int, default=2000, help="distinct users (default 2000)")
    p.add_argument("--device-types", type=int, default=20, help="distinct device types (default 20)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU)")
    p.add_argument("--latency", type=float, default=0.05, help="simulated service latency per call, seconds (default 0.05)")
    p.add_argument("--chunk-size", type=int, default=2048, help="events per chunk (default 2048)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the batch and print what happened."""
    import msgspec

    from collector.engine import Collector
    from collector.playback import SimulatedClient, generate_events, playback_pipeline

    events = generate_events(args.events, users=args.users, device_types=args.device_types)
    pipeline = playback_pipeline(SimulatedClient(latency=args.latency))
    out = sys.stderr
    with Collector(pipeline, workers=args.workers, chunk_size=args.chunk_size) as c:
        print(
            f"collector: {args.events} playback events, {args.users} users, "
            f"{args.device_types} device types, {c.nworkers} workers, "
            f"simulated service {args.latency * 1000:.0f} ms per call",
            file=out,
        )
        t0 = time.perf_counter()
        op = c.handle(events)
        for pct in op.progress():
            st = c.stats()
            print(f"\r  progress {pct:3d}%  {st.processed_per_sec:>10,.0f} events/s", end="", file=out, flush=True)
        res = op.wait()
        wall = time.perf_counter() - t0
        print(file=out)
        st = c.stats()
    if args.json:
        print(msgspec.json.encode({"result": {k: getattr(res, k) for k in ("handled_events", "failed_events", "elapsed", "batch")}, "stats": st}).decode())
        return 0
    b = res.batch
    print(f"handled {res.handled_events} events, failed {res.failed_events}, in {wall:.2f} s "
          f"({res.handled_events / wall:,.0f} events/s)")
    print(f"distinct users {b.distinct_keys}; device types {len(b.counts.get('device_type', {}))}; "
          f"regions {dict(list(b.counts.get('region', {}).items()))}")
    for name, lk in b.lookups.items():
        print(f"lookup {name:6s}: {lk.calls} calls, {lk.cache_hits} cache hits, {lk.coalesced} coalesced, "
              f"{lk.failures} failures; service-reported time sum {lk.reported_sum:.2f}s max {lk.reported_max * 1000:.1f} ms; "
              f"call latency mean {lk.latency_mean * 1000:.1f} ms p50 {lk.latency_p50 * 1000:.1f} ms p99 {lk.latency_p99 * 1000:.1f} ms")
    print(f"collector: total_events {st.total_events}, {st.avg_per_sec:,.0f} events/s since start, "
          f"chunks {st.chunks}, avg chunk latency {st.avg_latency_ms:.1f} ms, workers "
          + ", ".join(f"#{w.index} pid {w.pid}: {w.events}" for w in st.workers))
    return 0
