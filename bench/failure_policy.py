"""What an enrichment step's failure policy costs the engine: ``python bench/failure_policy.py``.

A benchmark, not a test; run it briefly. A real ``Collector`` (``--workers`` processes,
JSONL sink and dead-letter file in a temporary directory) enriches ``--events`` events
over ``--keys`` user ids from an HTTP source in batch mode (a local aiohttp service, no
cache, so every chunk asks). One key in ``--missing`` is absent from the service, so
that share of the chunks' events fails with ``not found``. Cases:

* ``all found``: no key missing (the baseline);
* ``keep``, ``dead_letter``: the missing key's events kept at the default / dead-lettered;
* ``hold``: held ``--hold-for`` seconds (the key never appears), then kept: every chunk
  holding the missing key waits; the figure to read is the wall time against the
  baseline plus ``hold_for`` (held chunks wait together, each in its window place);
* ``beside a hold``: a batch with no missing key sent while the ``hold`` batch is held:
  its wall time (it does not queue behind held chunks while the window has room).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from collector import Collector, Lookup, Pipeline
from collector.playback import PlaybackEvent
from collector.sinks import DeadLetterConfig, JsonlSinkConfig
from collector.sources.config import CacheConfig, HttpBatch, HttpSourceConfig, ResilienceConfig
from collector.sources.local_service import serve_on_thread


def events(n: int, keys: int, missing: int, start: int = 0) -> list[PlaybackEvent]:
    out = []
    for i in range(n):
        u = "missing" if missing and i % missing == 0 else f"u{i % keys}"
        out.append(PlaybackEvent(id=start + i, user_id=u, video_id="v", start_at=1, stop_at=2, bitrate_kbps=1,
                                 device_type="tv"))
    return out


def pipeline(url: str, tmp: Path, **policy: Any) -> Pipeline:
    src = HttpSourceConfig(
        name="users", url=f"{url}/batch", value_path="value", batch=HttpBatch(response_path="data", max_keys=500),
        cache=CacheConfig(mode="none"), resilience=ResilienceConfig(timeout=2, retries=0, breaker_failures=0),
    )
    return Pipeline(
        name="bench-policy", event_type=PlaybackEvent, key="user_id",
        lookups=(Lookup(name="region", key="user_id", target="region", source=src, **policy),),
        sinks=(JsonlSinkConfig(path=str(tmp / "events-{worker}.jsonl"), fsync="never"),),
        deadletter=DeadLetterConfig(path=str(tmp / "dl-{worker}.jsonl"), fsync="never"),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--keys", type=int, default=500)
    ap.add_argument("--missing", type=int, default=100, help="every N-th event has the missing key (0: none)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=1000)
    ap.add_argument("--hold-for", type=float, default=1.0)
    ap.add_argument("--cases", default="all found,keep,dead_letter,hold", help="comma-separated, of those")
    a = ap.parse_args()

    async def batch(req: web.Request) -> web.Response:
        ids = req.query.get("ids", "").split(",")
        return web.json_response({"data": {k: {"value": f"r-{k}"} for k in ids if k != "missing"}})

    app = web.Application()
    app.router.add_get("/batch", batch)
    runner = web.AppRunner(app, handle_signals=False)
    port = [0]

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port[0] = runner.addresses[0][1]

    with serve_on_thread(start, runner.cleanup, "bench-users"):
        url = f"http://127.0.0.1:{port[0]}"
        cases: list[tuple[str, int, dict[str, Any]]] = [
            ("all found", 0, {}),
            ("keep", a.missing, {}),
            ("dead_letter", a.missing, {"on_failure": "dead_letter"}),
            ("hold", a.missing, {"on_failure": "hold", "hold_for": a.hold_for, "then": "keep"}),
        ]
        for name, missing, policy in cases:
            if name not in a.cases.split(","):
                continue
            with tempfile.TemporaryDirectory() as d, Collector(pipeline(url, Path(d), **policy), workers=a.workers,
                                                               chunk_size=a.chunk_size) as c:
                c.handle(events(2000, a.keys, 0, start=10**9)).wait(timeout=60)  # warm the sessions
                t0 = time.perf_counter()
                op = c.handle(events(a.events, a.keys, missing))
                beside = None
                if name == "hold":
                    time.sleep(0.1)
                    t1 = time.perf_counter()
                    c.handle(events(a.events // 10, a.keys, 0, start=2 * 10**9)).wait(timeout=120)
                    beside = time.perf_counter() - t1
                res = op.wait(timeout=300)
                wall = time.perf_counter() - t0
                lk = res.batch.lookups["region"]
                row: dict[str, Any] = {"case": name, "events": a.events, "wall_s": round(wall, 3),
                                       "events_per_s": round(a.events / wall), "kept": lk.kept,
                                       "dead_lettered": lk.dead_lettered, "held": lk.held}
                if beside is not None:
                    row["beside_a_hold"] = {"events": a.events // 10, "wall_s": round(beside, 3)}
                print(row, flush=True)


if __name__ == "__main__":
    main()
