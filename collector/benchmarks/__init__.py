"""The benchmark harness behind ``collector bench`` and ``bench/``.

::

    common.make_input ──► payload (JSON array or NDJSON bytes) + the dicts the enrichment reads
          │
          ├──► collector  (handle(bytes), shard key | chunk ─► workers ─► result)   inmem.py
          └──► peers      (a) asyncio+json  (b) msgspec, 1 process  (c) Pool.imap   peers.py
                          (d) N processes, no IPC (the ceiling)  (e) Bytewax
    collector serve ◄──► bench/http_load.py ◄──► uvicorn + plain ASGI app      asgi_peer.py
                                                 (both started by servers.py)
    c.stats() idle, saturated back to back, saturated and spaced               statscost.py
    other scenarios (slow-service, seed-000, http, service)                    scenarios.py
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
    "inmem": "collector.benchmarks.inmem:inmem",
    "slow-service": "collector.benchmarks.scenarios:slow_service",
    "seed-000": "collector.benchmarks.scenarios:seed_000",
    "stats": "collector.benchmarks.statscost:stats_cost",
    "http": "collector.benchmarks.scenarios:http",
    "service": "collector.benchmarks.scenarios:service",
}
