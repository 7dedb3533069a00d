"""Messages/s and events/s through NATS JetStream: ``python bench/nats_jetstream.py [--messages N]``.

A benchmark, not a test. Needs the server at ``COLLECTOR_NATS_URL`` (default
``nats://127.0.0.1:4222``). For each shape (1 event per message, 100 events per
message) it publishes the events to a fresh stream with the :class:`Publisher`
(timed: ``publish``), then starts a :class:`NatsIngress` on a running 2-worker
collector (playback pipeline, no enrichment latency, JSONL sink with
``fsync="batch"``) and times from its first fetch to the last ack (``consume``):
every event committed to the sink before its message was acknowledged. Collector
start-up is not timed. The stream is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid

import msgspec


async def one(url: str, n_events: int, per: int, workers: int, **opts: int) -> dict[str, float]:
    import nats

    from collector import Collector
    from collector.ingress.nats import NatsIngress
    from collector.playback import generate_events, playback_pipeline
    from collector.sinks import JsonlSinkConfig
    from collector.sinks.nats import Publisher, chunk_id

    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"BENCH_{tag}", f"bench{tag}"
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{prefix}.>"], duplicate_window=120)
    enc = msgspec.json.Encoder()
    base = time.time_ns() // 1000
    lines = enc.encode_lines(generate_events(n_events, start_id=base)).splitlines()
    ids = [str(base + i) for i in range(n_events)]
    if per == 1:
        msgs = [(f"{prefix}.e", ln, i) for ln, i in zip(lines, ids, strict=True)]
    else:
        msgs = [
            (f"{prefix}.e", b"\n".join(lines[lo : lo + per]) + b"\n", chunk_id(ids[lo : lo + per]))
            for lo in range(0, n_events, per)
        ]
    pub = Publisher(url)
    t0 = time.perf_counter()
    for lo in range(0, len(msgs), 4096):
        await pub.publish(msgs[lo : lo + 4096])
    t_pub = time.perf_counter() - t0
    await pub.close()
    tmp = tempfile.mkdtemp(prefix="bench-nats-")
    pipeline = playback_pipeline(sinks=(JsonlSinkConfig(path=os.path.join(tmp, "events-{worker}.jsonl"), fsync="never"),))
    try:
        async with Collector(pipeline, workers=workers) as c:
            ing = NatsIngress(c, url, stream=stream, subjects=[f"{prefix}.>"], durable="bench",
                              batch=opts.get("batch") or max(256, 4096 // per), lag_interval=0.5,
                              fetchers=opts.get("fetchers", 2), max_batches=opts.get("max_batches", 4))
            task = asyncio.create_task(ing.run())
            await asyncio.wait_for(ing.ready.wait(), 15)
            t0 = time.perf_counter()
            deadline = time.monotonic() + 300
            while ing.stats().acked < len(msgs) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            t_con = time.perf_counter() - t0
            st = ing.stats()
            ing.stop()
            await asyncio.wait_for(task, 60)
    finally:
        await js.delete_stream(stream)
        await nc.close()
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
    assert st.acked == len(msgs), f"only {st.acked} of {len(msgs)} acked"
    return {
        "messages": len(msgs), "events": n_events,
        "publish_msg_s": len(msgs) / t_pub, "publish_ev_s": n_events / t_pub,
        "consume_msg_s": len(msgs) / t_con, "consume_ev_s": n_events / t_con,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000, help="messages of the 1-event shape (default 20000)")
    ap.add_argument("--events", type=int, default=500_000, help="events of the 100-per-message shape (default 500000)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fetchers", type=int, default=2, help="NatsIngress fetchers (default 2)")
    ap.add_argument("--max-batches", type=int, default=4, help="NatsIngress max_batches (default 4)")
    ap.add_argument("--batch", type=int, default=0, help="messages per fetch (default: max(256, 4096 / events per message))")
    args = ap.parse_args()
    url = os.environ.get("COLLECTOR_NATS_URL", "nats://127.0.0.1:4222")
    print(f"NATS {url}, {args.workers} workers, playback pipeline -> JSONL (fsync=batch)")
    print(f"{'shape':<22}{'messages':>10}{'events':>10}{'publish msg/s':>15}{'ev/s':>11}{'consume msg/s':>15}{'ev/s':>11}")
    for n, per in ((args.messages, 1), (args.events, 100)):
        r = asyncio.run(one(url, n, per, args.workers, fetchers=args.fetchers, max_batches=args.max_batches,
                            batch=args.batch))
        print(f"{f'{per} event(s)/message':<22}{r['messages']:>10,}{r['events']:>10,}{r['publish_msg_s']:>15,.0f}"
              f"{r['publish_ev_s']:>11,.0f}{r['consume_msg_s']:>15,.0f}{r['consume_ev_s']:>11,.0f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
