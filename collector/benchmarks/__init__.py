"""The benchmark harness behind ``collector bench`` and ``bench/``.

::

    data.make_input ──► payload (JSON array bytes) + the dicts the enrichment reads
          │
          ├──► collector  (handle(bytes) ─► workers ─► result)        scenarios.py
          └──► peers      (a) asyncio+json  (b) msgspec  (c) Pool.imap  peers.py
                          (d) N processes, no IPC  (e) Bytewax
    measurements (wall, CPU via psutil, peak RSS via VmHWM) ─► report.py: table, JSON, PNG

Everything lives inside the package (not only in ``bench/``) so that ``collector
bench`` works from an installed wheel: users measure their own enrichment service
with ``collector bench service URL``. Benchmarks report numbers; they assert nothing
(``bench/`` is outside the default test run).
"""

from __future__ import annotations

__all__ = ["SCENARIOS"]

# scenario name -> "module:function"; imported lazily so `collector bench --help` is fast
SCENARIOS: dict[str, str] = {
    "inmem": "collector.benchmarks.scenarios:inmem",
    "slow-service": "collector.benchmarks.scenarios:slow_service",
    "seed-000": "collector.benchmarks.scenarios:seed_000",
    "stats": "collector.benchmarks.scenarios:stats_cost",
    "http": "collector.benchmarks.scenarios:http",
    "service": "collector.benchmarks.scenarios:service",
}
