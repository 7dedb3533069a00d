"""``collector consume``: a collector fed by a JetStream durable consumer, no HTTP.

::

    stream ─► durable consumer ─► NatsIngress ─► Collector(pipeline) ─► sinks ─► ack
    (run it N times with one --durable: the instances share the messages)

The pipeline comes from ``--config`` (the daemon's TOML; default: the embedded
defaults) or ``--pipeline module:attr``. A stats line goes to stderr every
``--stats-interval`` seconds; SIGTERM or SIGINT stops fetching, settles what is in
flight and exits 0. A SIGKILL loses nothing: JetStream delivers the unacknowledged
messages again, to the other instances, after ``--ack-wait`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from collector.commands.migrate import add_pipeline_arguments, pipeline_from_args

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``collector consume``."""
    p.add_argument("--from", dest="url", default="nats://127.0.0.1:4222", metavar="nats://HOST:PORT",
                   help="NATS server URL(s), comma-separated (default nats://127.0.0.1:4222)")
    p.add_argument("--stream", default="EVENTS", help="stream name (default EVENTS)")
    p.add_argument("--subject", action="append", dest="subjects", metavar="SUBJECT",
                   help="subject the stream captures when created (repeatable; default events.>)")
    p.add_argument("--durable", default="collector", help="durable consumer name (default collector)")
    p.add_argument("--batch", type=int, default=256, help="messages per fetch (default 256)")
    p.add_argument("--ack-wait", type=float, default=30.0, help="seconds before an unacked delivery is redelivered")
    p.add_argument("--max-deliver", type=int, default=5, help="deliveries before a failing message is dead-lettered")
    add_pipeline_arguments(p)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the config's, or one per CPU)")
    p.add_argument("--stats-interval", type=float, default=5.0, help="seconds between stats lines (0: none)")


async def _main(args: argparse.Namespace) -> int:
    import msgspec

    from collector.engine import Collector
    from collector.ingress.nats import NatsIngress

    pipeline, opts = pipeline_from_args(args)
    if args.workers is not None:
        opts["workers"] = args.workers
    enc = msgspec.json.Encoder()
    async with Collector(pipeline, **opts) as c:
        ing = NatsIngress(
            c, args.url, stream=args.stream, subjects=args.subjects or ["events.>"], durable=args.durable,
            batch=args.batch, ack_wait=args.ack_wait, max_deliver=args.max_deliver,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, ing.stop)  # only sets an event: run() settles and returns
        task = asyncio.create_task(ing.run())
        ready = asyncio.create_task(ing.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()
            return 0
        print(f"consuming {args.stream}/{args.durable} from {args.url} with {c.nworkers} workers",
              file=sys.stderr, flush=True)
        while not task.done():
            await asyncio.wait({task}, timeout=args.stats_interval or None)
            if args.stats_interval:
                print(enc.encode(ing.stats()).decode(), file=sys.stderr, flush=True)
        task.result()
        print(enc.encode(ing.stats()).decode(), file=sys.stderr, flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    """Consume until SIGTERM/SIGINT."""
    import uvloop

    from collector.errors import CollectorError

    try:
        result: Any = uvloop.run(_main(args))
    except CollectorError:
        raise
    except Exception as e:  # NATS unreachable, stream refused, ...: one line, not a traceback
        print(f"collector consume: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return int(result)
