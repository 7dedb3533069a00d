"""``collector migrate``: create (or upgrade) the tables the configured SQL sinks write to.

The sinks run the same migration when they open (unless ``create_table = false``);
this command lets an operator apply it ahead of time, with the privileges of a
migration role, and see what was applied::

    collector migrate --config /etc/collector/collector.toml
    collector migrate --pipeline mypackage.pipelines:orders

Running it again is a no-op: each sink reports ``up to date``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

__all__ = ["add_arguments", "pipeline_from_args", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``collector migrate``."""
    add_pipeline_arguments(p)


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """``--config`` / ``--pipeline``, shared with ``collector replay``."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", metavar="PATH", help="the daemon's TOML config (default: the embedded defaults)")
    g.add_argument(
        "--pipeline",
        metavar="MODULE:ATTR",
        help="import string of a collector.Pipeline (or a function returning one), for embedded users",
    )


def pipeline_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The pipeline named by ``--pipeline`` or built from ``--config``, and Collector options."""
    if getattr(args, "pipeline", None):
        from collector.pipeline import resolve_pipeline

        return resolve_pipeline(args.pipeline), {}
    from collector.config import load_config
    from collector.packs import build_pipeline

    cfg = load_config(args.config)
    opts: dict[str, Any] = {}
    try:
        from collector.config import engine_options

        opts = engine_options(cfg)
    except ImportError:  # an older config module: the Collector's defaults
        pass
    return build_pipeline(cfg), opts


async def _migrate(pipeline: Any) -> list[tuple[str, str, list[str] | str]]:
    from collector.sinks import build_sink, decode_sink_config
    from collector.sinks.base import EventCodec

    codec = EventCodec(pipeline.event_type, pipeline.id_field)
    out: list[tuple[str, str, list[str] | str]] = []
    for i, c in enumerate(pipeline.sinks):
        cfg = c if not isinstance(c, dict) else decode_sink_config(c, f"$.sinks[{i}]")
        sink = build_sink(cfg, index=i, codec=codec, worker=0)
        if cfg.kind == "sqlite" and "{worker}" in str(getattr(cfg, "path", "")):
            # one database per worker: each worker migrates its own file when it opens
            out.append((sink.name, cfg.kind, "one file per worker: migrated by each worker when it opens"))
            continue
        try:
            steps = await sink.migrate()
        except Exception as e:  # report every sink, then fail
            out.append((sink.name, cfg.kind, f"FAILED: {sink.describe_error(e)}"))
            continue
        finally:
            await sink.close()
        out.append((sink.name, cfg.kind, steps))
    return out


def run(args: argparse.Namespace) -> int:
    """Migrate every sink of the pipeline; exit 1 if one failed."""
    pipeline, _ = pipeline_from_args(args)
    results = asyncio.run(_migrate(pipeline))
    failed = False
    if not results:
        print("no sinks configured: nothing to migrate")
    for name, kind, steps in results:
        if isinstance(steps, str):
            failed |= steps.startswith("FAILED")
            print(f"{name} ({kind}): {steps}")
        elif steps:
            print(f"{name} ({kind}): applied: {'; '.join(steps)}")
        else:
            print(f"{name} ({kind}): up to date" + ("" if kind in ("sqlite", "postgres", "mysql") else " (no tables)"))
    sys.stdout.flush()
    return 1 if failed else 0
