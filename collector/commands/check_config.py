"""``collector check-config PATH``: validate a config file without starting anything."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``collector check-config``."""
    p.add_argument("path", nargs="?", help="TOML config file")
    p.add_argument("--options", action="store_true", help="print the table of every option instead")


def run(args: argparse.Namespace) -> int:
    """Exit 0 and summarise when valid; exit 2 with the offending path otherwise."""
    from collector.config import load_config, options_table, resolved_sinks
    from collector.errors import ConfigError
    from collector.packs import build_pipeline
    from collector.pipeline import event_fields, event_type_name
    from collector.stages.aggregates import Aggregate

    if args.options:
        print(options_table())
        return 0
    if args.path is None:
        print("collector check-config: give a config file (or --options for the table of options)", file=sys.stderr)
        return 2
    cfg = load_config(args.path)  # ConfigError → "collector check-config: error: ..." and exit 2
    try:
        p = build_pipeline(cfg)  # also imports a pack given as module:attr; decodes [[sources]], [[enrich]]
    except ConfigError as e:
        raise ConfigError(f"{args.path}: {e}") from None
    sinks, dl = resolved_sinks(cfg)
    s = cfg.server
    print(f"{args.path}: ok", file=sys.stdout)
    print(f"  listen {s.host}:{s.port}; pipeline {p.name} ({event_type_name(p.event_type)}); data_dir {cfg.resolved_data_dir()}")
    for sk in sinks:
        print(f"  sink {sk!r}")
    print(f"  deadletter {dl.path}")
    for lk in p.lookups:
        print(f"  lookup {lk.name}: {lk.target} from {lk.key}" + (f" via {lk.source.name!r}" if lk.source is not None else "")
              + f"; {_policy(lk)}")
    for st in p.stages:
        if getattr(st, "is_rules", False):
            print(f"  rules {st.name}: {', '.join(_rule(r) for r in st.rules)}")
        elif getattr(st, "integrity", None) == "sequence":
            # sessions are per worker: only a pipeline sharded by the session sees each one whole
            note = "" if (p.key == st.session and p.shard == "key") else (
                f"; warning: the pipeline shards by {p.key!r} ({p.shard}), not by the session: "
                "each worker sees part of a session and counts the others' numbers as gaps")
            print(f"  gaps {st.name}: session {st.session}, seq {st.seq}" + (f", by {st.by}" if st.by else "") + note)
        elif getattr(st, "pairing", False):
            print(f"  pair {st.name}: {st.start_type} + {st.end_type} on {', '.join(st.key)}, ttl {st.ttl:g} s, "
                  f"store {st.store}" + (f" ({st.state_path})" if st.store == "sqlite" else ""))
        elif isinstance(st, Aggregate):
            print(f"  aggregate {st.name}: {_aggregate(st)}")
        elif getattr(st, "integrity", None) == "ordering":
            key = st.key or p.key
            fields = event_fields(p.event_type)
            note = "" if (key == p.key and p.shard == "key") else (
                f"; warning: the pipeline shards by {p.key!r} ({p.shard}), not by {key!r}: "
                "a key's events reach several workers, each orders only its own")
            if st.by.split(".")[0] not in fields:
                note += f"; warning: {event_type_name(p.event_type)} has no field {st.by!r}: every event is untimed"
            buf = f"buffer max_delay {st.max_delay} s, max_held {st.max_held}" if st.holds else "no buffer"
            print(f"  order {st.name}: key {key}, by {st.by}, {buf}" + note)
    if cfg.source is not None:
        src = cfg.source
        print(f"  source {src.kind} {src.url} stream {src.stream} ({', '.join(src.subjects)}) durable {src.durable}")
    return 0


def _policy(lk: Any) -> str:
    """``not found: keep (logged), error: hold 5s/10 tries then dead_letter``."""
    from collector.sources.metrics import policy_of

    parts = []
    pol = policy_of(lk)
    for outcome, words in (("not_found", "not found"), ("error", "error")):
        act = pol[outcome]
        if act == "hold":
            act = f"hold {lk.hold_for:g}s/{lk.hold_retries} tries then {lk.then}"
        parts.append(f"{words}: {act}")
    return ", ".join(parts) + (" (logged per event)" if lk.log else "")


def _rule(r: object) -> str:
    """``name (action)``; a route rule with its sinks: ``name (route -> audit, main)``."""
    sinks = getattr(r, "sinks", None)
    action = getattr(r, "action", "")
    return f"{getattr(r, 'name', '')} ({action}{' -> ' + ', '.join(sinks) if sinks else ''})"


def _aggregate(a: Any) -> str:
    """``count by type, tumbling 60 s (event time: created_at)``."""
    by = ", ".join(a.by) if isinstance(a.by, tuple) else a.by
    w = a.window
    kind = type(w).__name__.lower()
    size = getattr(w, "size", None)
    text = f"{a.fn}" + (f" of {a.value}" if a.value else "") + (f" by {by}" if by else "")
    text += f", {kind}" + (f" {size:g} s" if size is not None else "")
    if w.time_field:
        text += f" (event time: {w.time_field})"
    return text + ("" if a.prometheus else ", not in Prometheus")
