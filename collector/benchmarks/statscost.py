"""``collector bench stats``: what one ``c.stats()`` call costs the caller, in µs.

Three states, in every round, on one running collector:

* **idle**: 20,000 calls back to back, no operation running;
* **saturated**: calls back to back while an N-event batch keeps every worker busy;
* **saturated, spaced**: one call every 10 ms during such batches (200 or 500 calls), as
  a dashboard or a ``/metrics`` scrape makes them: most calls find counters that workers
  changed since the previous one (``stats()`` reuses its sums only while no worker took
  or acknowledged a chunk), and CPU caches that the workers have cooled. No target: a
  first call after a sleep costs tens of µs of CPU in any Python code path this long
  (measured idle too), which is not what the back-to-back target is about.

Each reports p50, p90, p99, p99.9 and the maximum; with ``--repeats`` the figures are
medians over the rounds. For the back-to-back saturated calls it also reports what took
the caller's thread off the CPU (Linux: ``/proc/thread-self``): *GIL waits* are its
voluntary context switches (nothing else in that loop blocks; a thread waiting for the
GIL sleeps on a condition variable), *preemptions* its involuntary ones, and the share
of the loop it spent runnable but waiting for a CPU. Calls that such an event lands in
take from tens of µs to milliseconds (a GIL wait lasts up to ``sys.getswitchinterval()``,
5 ms): they are the tail past p99 on a machine with fewer cores than busy threads.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..playback import InMemoryClient, playback_pipeline
from .common import make_input, median, ncpu, percentile
from .report import Target, print_table, print_targets

__all__ = ["stats_cost"]

_QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))
_SPACING = 0.010  # seconds between spaced calls


def _thread_counters() -> tuple[int, int, int] | None:
    """(voluntary switches, involuntary switches, ns runnable waiting for a CPU) of the
    calling thread, or None where /proc/thread-self is not there."""
    try:
        with open("/proc/thread-self/status") as f:
            fields = dict(line.split(":", 1) for line in f if "ctxt_switches" in line)
        with open("/proc/thread-self/schedstat") as f:
            waited = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"]), waited


def _round(c: Any, payload: bytes, spaced_calls: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """One round: the three states' call times (µs) and the saturated loop's switches."""
    pc = time.perf_counter_ns
    stats = c.stats
    idle = []
    for _ in range(20_000):
        t = pc()
        stats()
        idle.append((pc() - t) / 1000)
    busy: list[float] = []
    before, t0 = _thread_counters(), pc()
    op = c.handle(payload)
    while not op.done():
        t = pc()
        stats()
        busy.append((pc() - t) / 1000)
    after, loop_ns = _thread_counters(), pc() - t0
    op.wait()
    spaced: list[float] = []
    while len(spaced) < spaced_calls:
        op = c.handle(payload)
        while not op.done() and len(spaced) < spaced_calls:
            time.sleep(_SPACING)
            t = pc()
            stats()
            spaced.append((pc() - t) / 1000)
        op.wait()
    switches: dict[str, float] = {"loop_s": loop_ns / 1e9, "slow_calls": sum(x > 100 for x in busy)}
    if before is not None and after is not None:
        switches |= {"gil_waits": after[0] - before[0], "preemptions": after[1] - before[1],
                     "runqueue_share": (after[2] - before[2]) / loop_ns}
    return {"idle": idle, "saturated": busy, "saturated, spaced": spaced}, switches


def stats_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Cost of ``c.stats()`` in µs: idle, saturated back to back, saturated and spaced."""
    from ..engine import Collector

    n = args.events or (200_000 if args.quick else 1_000_000)
    workers = max(args.workers) if args.workers else ncpu()
    rounds = args.repeats or (1 if args.quick else 3)
    inp = make_input(n, args.users, args.device_types)
    runs: list[dict[str, Any]] = []
    samples: dict[str, list[float]] = {}
    with Collector(playback_pipeline(InMemoryClient(inp.regions, inp.models)), workers=workers) as c:
        c.handle(make_input(10_000, args.users, args.device_types, seed=1).payload).wait(timeout=60)
        for _ in range(rounds):
            got, switches = _round(c, inp.payload, 200 if args.quick else 500)
            runs.append({"switches": switches, **{
                state: {"calls": len(xs), **{q: percentile(s, f) for q, f in _QUANTILES}, "max": s[-1] if s else 0.0}
                for state, xs in got.items() for s in [sorted(xs)]}})
            samples = got  # the last round's samples for the plot
    summary: list[dict[str, Any]] = [{"state": state, **{k: median([r[state][k] for r in runs]) for k in ("calls", *dict(_QUANTILES), "max")}}
               for state in samples]
    print_table(f"stats: c.stats() µs, {workers} workers, {n:,}-event batches; medians of {rounds} round(s)",
                ["state", "calls", *dict(_QUANTILES), "max"],
                [[s["state"], int(s["calls"]), *(s[q] for q, _ in _QUANTILES), s["max"]] for s in summary])
    sw = {k: median([r["switches"][k] for r in runs]) for k in runs[0]["switches"]}
    if "gil_waits" in sw:
        print(f"saturated loop ({sw['loop_s']:.1f} s): the caller's thread waited {sw['gil_waits']:.0f} times for the "
              f"GIL, was preempted {sw['preemptions']:.0f} times and spent {sw['runqueue_share']:.0%} of the loop "
              f"waiting for a CPU; {sw['slow_calls']:.0f} calls took over 100 µs")
    sat = summary[1]
    targets = [Target("stats() p99 while saturated", sat["p99"], 10.0, " µs", False),
               Target("stats() median while saturated", sat["p50"], 10.0, " µs", False)]
    print_targets(targets)
    return {"scenario": "stats", "config": {"events": n, "workers": workers, "rounds": rounds, "spacing_s": _SPACING},
            "runs": runs, "summary": summary, "switches": sw, "targets": [t.to_json() for t in targets],
            "plot": {"kind": "cdf", "title": "c.stats() call time", "xlabel": "µs",
                     "series": {k: [float(f"{x:.3g}") for x in sorted(v)[:: max(1, len(v) // 5000)]]
                                for k, v in samples.items()}}}
