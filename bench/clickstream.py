"""Seed 002's figures: ``python bench/clickstream.py [--quick] [--etl-events N] [--no-http]``.

* **ingest** (``--seed-rate``: single events at the seed's 660/s only): ``collector serve --pack clickstream`` (role ``all``: validation, dedup,
  token → user id with a warm cache, timestamp, gaps, pairing, a SQLite table per type)
  under ``bench/http_load.py --payload clickstream``: batched events/s, and single-event
  latency at 50 % of the maximum rate (open loop; p50/p99 from the scheduled send time).
  The built-in auth service runs here; 300 users' tokens, so after the first requests
  every token is in the workers' caches.
* **ETL**: an embedded ``Collector`` running the ETL role (dedup, gaps, pairing, one
  ClickHouse table per type) on generated events that already carry ``user_id`` and
  ``timestamp`` (as the consumer reads them from NATS): events/s into ClickHouse
  (``COLLECTOR_CLICKHOUSE_URL``, default http://127.0.0.1:8123; a database of its own,
  dropped after). Median of ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ingest(quick: bool, workers: int, extra: list[str], pair_store: str = "sqlite") -> int:
    from collector.sources.auth import AuthService

    svc = AuthService()
    tmp = Path(tempfile.mkdtemp(prefix="bench-clickstream-"))
    with svc.running():
        tokens = {f"user-{i}": svc.issue(f"user-{i}", ttl=7200)[0] for i in range(300)}
        (tmp / "tokens.json").write_text(json.dumps(tokens))
        (tmp / "clickstream.toml").write_text(
            f'[pipeline]\npack = "clickstream"\n[pipeline.options]\nauth_url = "{svc.verify_url}"\n'
            f'auth_key = "{svc.key}"\npair_store = "{pair_store}"\n')
        cmd = [sys.executable, str(ROOT / "bench" / "http_load.py"), "--config", str(tmp / "clickstream.toml"),
               "--payload", "clickstream", "--tokens", str(tmp / "tokens.json"), "--workers", str(workers),
               "--no-floor", "--result-file", str(tmp / "result.json"), *(["--quick"] if quick else []), *extra]
        print("running: " + " ".join(cmd), file=sys.stderr)
        code = subprocess.call(cmd, cwd=ROOT)
        print(f"the auth service answered {svc.calls} /verify calls for {len(tokens)} tokens", file=sys.stderr)
    return code


def _ch(url: str, query: str) -> str:
    req = urllib.request.Request(url + "/", data=query.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return str(r.read().decode())


def etl(n: int, runs: int, workers: int) -> None:
    from collector import Collector
    from collector.clickstream import ClickstreamOptions, SessionStream, clickstream_pipeline
    from collector.packs.clickstream import migrate

    url = os.environ.get("COLLECTOR_CLICKHOUSE_URL", "http://127.0.0.1:8123")
    db = "bench_cs_" + uuid.uuid4().hex[:8]
    import asyncio

    asyncio.run(migrate(url, db))
    try:
        rates = []
        for r in range(runs):
            events = SessionStream(seed=r, tokens={"u": "t"}).take(n)
            now = time.time()
            for i, e in enumerate(events):
                e["id"] = f"{r}-{i}"
                e["user_id"] = "anonymous" if e.pop("token") is None else f"user-{i % 300}"
                e["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now + i / 1000)) + ".000Z"
            body = json.dumps(events).encode()
            # pairing in memory, as measured before the SQLite store became the pack's default:
            # the figure is the ETL's, and a state file here would outlive the run
            opts = ClickstreamOptions(role="etl", clickhouse_url=url, clickhouse_database=db, pair_store="memory")
            with Collector(clickstream_pipeline(opts), workers=workers) as c:
                c.handle(json.dumps(events[:100]).encode()).wait(timeout=60)  # warm: sessions, pools
                t = time.perf_counter()
                res = c.handle(body).wait(timeout=600)
                dt = time.perf_counter() - t
            assert res.failed_events == 0, res.errors[:3]
            rates.append(n / dt)
            print(f"ETL run {r + 1}: {n:,} events into ClickHouse in {dt:.2f} s: {n / dt:,.0f} events/s",
                  file=sys.stderr)
        stored = _ch(url, f"SELECT sum(rows) FROM system.parts WHERE database = '{db}' AND active").strip()
        print(f"ETL into ClickHouse ({workers} workers): median {statistics.median(rates):,.0f} events/s "
              f"(min {min(rates):,.0f}, max {max(rates):,.0f}); rows in {db}: {stored}")
    finally:
        _ch(url, f"DROP DATABASE IF EXISTS {db}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one short ingest round")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-http", action="store_true", help="skip the ingest part")
    p.add_argument("--seed-rate", action="store_true",
                   help="ingest: single events only, the open loop at the seed's 660 events/s")
    p.add_argument("--no-etl", action="store_true", help="skip the ETL part")
    p.add_argument("--etl-events", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--pair-store", default="sqlite", choices=("sqlite", "memory"),
                   help="ingest: where the daemon's pairing keeps its waiting halves (the pack's default: sqlite)")
    a = p.parse_args()
    code = 0
    if not a.no_http:
        code = ingest(a.quick, a.workers, ["--scenarios", "single", "--rate", "660"] if a.seed_rate else [],
                      a.pair_store)
    if not a.no_etl:
        etl(a.etl_events, a.runs, a.workers)
    return code


if __name__ == "__main__":
    sys.exit(main())
