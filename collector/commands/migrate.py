"""``collector migrate``: create (or upgrade) the tables the configured SQL sinks write to.

The sinks run the same migration when they open (unless ``create_table = false``);
this command lets an operator apply it ahead of time, with the privileges of a
migration role, and see what was applied::

    collector migrate --config /etc/collector/collector.toml
    collector migrate --pipeline mypackage.pipelines:orders

``--pack NAME`` instead creates the tables a pack reads from (the casino pack: the
``players`` table, seeded with the five players of seed 001)::

    collector migrate --pack casino --dsn postgresql://postgres@127.0.0.1:5432/test --schema public
    collector migrate --pack clickstream --dsn http://127.0.0.1:8123          # ClickHouse, one table per type
    collector migrate --pack clickstream --dsn sqlite:///var/lib/collector/clickstream.db

Running it again is a no-op: each sink (or the pack) reports ``up to date``. A sink whose
``table`` is a template (``cs_{event}``) creates each table on first use; a pack that
knows its event types creates them ahead with ``collector.sinks.clickhouse.migrate(cfg,
table_names(cfg.table, types))`` (or the sqlite sink's ``migrate(tables)``).
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
    p.add_argument("--pack", metavar="NAME", help="create the tables this pack reads from or writes to (casino: players; clickstream: "
                   "a table per event type)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dsn", metavar="URL", help="with --pack: the database (casino: postgresql://user@host:port/db; clickstream: "
                   "http://host:8123 for ClickHouse or sqlite:///path.db)")
    g.add_argument("--dsn-env", metavar="VAR", help="with --pack: the environment variable holding the DSN")
    p.add_argument("--schema", default="public", help="with --pack: the schema to create the tables in (default public; clickstream on "
                   "ClickHouse: the database, `default` for public)")


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
        table = str(getattr(cfg, "table", ""))
        if cfg.kind in ("sqlite", "clickhouse") and "{" in table:
            # a table per event (template): the names are known only from the events
            await sink.close()
            out.append((sink.name, cfg.kind, f"table template {table!r}: each table is created on first use"))
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


def _migrate_pack(args: argparse.Namespace) -> int:
    """``--pack NAME``: the pack module's ``migrate(dsn, schema)``; exit 1 if it failed."""
    import importlib
    import os

    from collector.errors import ConfigError
    from collector.packs import PACKS

    if args.config or args.pipeline:
        raise ConfigError("--pack migrates a pack's own tables: give it without --config or --pipeline")
    if args.pack not in PACKS:
        raise ConfigError(f"unknown pack {args.pack!r} (packs: {', '.join(sorted(PACKS))})")
    migrate = getattr(importlib.import_module(PACKS[args.pack].partition(":")[0]), "migrate", None)
    if migrate is None:
        print(f"pack {args.pack}: no tables to create")
        return 0
    dsn = os.environ.get(args.dsn_env, "") if args.dsn_env else args.dsn
    if not dsn:
        raise ConfigError(f"--pack {args.pack} needs --dsn URL or --dsn-env VAR"
                          + (f" (${args.dsn_env} is not set)" if args.dsn_env else ""))
    try:
        steps = asyncio.run(migrate(dsn, args.schema))
    except Exception as e:  # the database's own message (the DSN is not printed)
        print(f"pack {args.pack} (schema {args.schema}): FAILED: {type(e).__name__}: {e}")
        return 1
    print(f"pack {args.pack} (schema {args.schema}): " + (f"applied: {'; '.join(steps)}" if steps else "up to date"))
    return 0


def run(args: argparse.Namespace) -> int:
    """Migrate every sink of the pipeline (or ``--pack``'s tables); exit 1 if one failed."""
    if getattr(args, "pack", None):
        return _migrate_pack(args)
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
            print(f"{name} ({kind}): up to date" + ("" if kind in ("sqlite", "postgres", "mysql", "clickhouse") else " (no tables)"))
    sys.stdout.flush()
    return 1 if failed else 0
