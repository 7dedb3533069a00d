"""``collector bench SCENARIO``: run a benchmark scenario, print a table, save JSON and a plot.

Scenarios (see ``collector/benchmarks``): ``inmem`` (throughput against the peers
and the no-IPC ceiling, JSON-array and NDJSON input, both shard modes),
``slow-service`` (a slow enrichment service: wall time against its lower bound),
``seed-000`` (the seed's 10 events through a 5 s service), ``stats`` (cost of
``stats()``), ``http`` (the daemon under load, beside a uvicorn peer), ``service URL``
(your own HTTP enrichment endpoint). ``--quick`` runs a sub-minute version.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

__all__ = ["add_arguments", "run"]

SERVICE_CONTRACT = """\
service URL contract: GET URL?user_id=<id> -> 200 {"region": "..."};
GET URL?device_type=<type> -> 200 {"model": "..."}; an optional "seconds" field is the
service's own fetch time; any other status is an error (retried, then counted)."""


def _ints(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if ".." in part:
            lo, hi = part.split("..")
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``collector bench``."""
    from collector.benchmarks import SCENARIOS

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = SERVICE_CONTRACT
    p.add_argument("scenario", choices=sorted(SCENARIOS), help="what to measure")
    p.add_argument("url", nargs="?", default=None,
                   help="service: the enrichment endpoint URL ('loopback': a built-in 127.0.0.1 endpoint)")
    p.add_argument("--quick", action="store_true", help="a sub-minute smoke version")
    p.add_argument("--events", type=int, default=None, help="events per batch (scenario default)")
    p.add_argument("--users", type=int, default=2000, help="distinct users (default 2000; slow-service 10000)")
    p.add_argument("--device-types", type=int, default=20, help="distinct device types (default 20)")
    p.add_argument("--workers", type=_ints, default=None, help="worker counts, e.g. 1..2 or 1,2 (default 1..ncpu)")
    p.add_argument("--chunk-sizes", type=_ints, default=None, help="chunk sizes (inmem default 512,2048,8192)")
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds; figures are medians (default 5)")
    p.add_argument("--input", default=None, metavar="FORMATS",
                   help="inmem: input formats, json (one JSON array) and/or ndjson (one event per line) "
                        "(default json,ndjson)")
    p.add_argument("--shard", default=None, metavar="MODES",
                   help="inmem: the collector's shard modes, key and/or chunk (default key,chunk)")
    p.add_argument("--peers", default="abcde", help="peers to run beside inmem: letters a-e (default abcde)")
    p.add_argument("--output", choices=("count", "encode", "jsonl"), default="count",
                   help="what peers do after counting (default count: the same job as a collector without a sink)")
    p.add_argument("--latency", type=float, default=None, help="service seconds per call (slow-service 0.05, seed-000 5.0)")
    p.add_argument("--concurrency", type=_ints, default=None, help="calls at once per lookup per worker (slow-service 256,32)")
    p.add_argument("--op-size", type=int, default=2000, help="events per handle() in slow-service and service (2000)")
    p.add_argument("--duration", type=float, default=None, help="service: seconds of load (default 15)")
    p.add_argument("--cache-ttl", type=float, default=0.0, help="service: cache ttl, 0 = every chunk asks the service")
    p.add_argument("--timeout", type=float, default=5.0, help="service: seconds per call before it counts as failed")
    p.add_argument("--out", default="bench-results", help="directory for the JSON results and the PNG (bench-results)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    p.add_argument("--progress", action="store_true", default=None, help="show the progress line even when stderr is not a terminal")
    p.add_argument("extra", nargs="*", default=[], help=argparse.SUPPRESS)


def _machine() -> dict[str, Any]:
    import platform

    import psutil

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "memory": psutil.virtual_memory().total,
    }


def run(args: argparse.Namespace) -> int:
    """Run the scenario; 0 when it ran (missed targets are reported, not failures)."""
    from collector.benchmarks import SCENARIOS
    from collector.benchmarks.report import plot_cdf, plot_throughput, write_json
    from collector.registry import import_string

    fn = import_string(SCENARIOS[args.scenario], "scenario")
    started = time.time()
    machine = _machine()
    result = fn(args)
    result["machine"] = machine
    result["machine"]["load_avg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["command"] = "collector bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    result["started"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    base = os.path.join(args.out, f"{args.scenario}{'-quick' if args.quick else ''}-{stamp}")
    if "skipped" not in result:
        plot = result.get("plot")
        if plot and not args.no_plot:
            ok = False
            if plot["kind"] == "throughput":
                ok = plot_throughput(base + ".png", plot["title"], plot["series"], plot["flat"])
            elif plot["kind"] == "cdf":
                ok = plot_cdf(base + ".png", plot["title"], plot["series"], plot["xlabel"], plot.get("marks"))
            if ok:
                print(f"plot: {base}.png")
        write_json(base + ".json", result)
        print(f"results: {base}.json")
    return 0
