"""Domain packs: an event Struct, a pipeline built from the generic parts, a generator.

::

    [pipeline] pack = "generic"  ──PACKS──► collector.packs.generic:pack_pipeline(cfg, sinks, dl)
    collector serve --pack NAME  ──┘                        │
    [pipeline] pack = "mod:attr" ──► a Pipeline or factory ─┴──► Pipeline (+ the config's sinks)

``[[sources]]`` and ``[[enrich]]`` (decoded here, by :func:`collector.sources.config.decode_sources`,
since the config loader may not import sources) add lookups to whichever pipeline that is;
``[[stages]]`` (built by :func:`collector.stages.build_stage` through the ``STAGES``
table) and ``[[rules]]`` (decoded by :func:`collector.stages.rules.decode_rules`, one
``Rules`` stage named ``rules``) are added after the pack's stages, in that order.

A new pack is one module here with a ``pack_pipeline(cfg: PipelineConfig, sinks,
deadletter) -> Pipeline`` and one ``PACKS`` line; the config loader never imports a pack.
A pack module may define ``default_sinks(cfg, data_dir)``: its sinks when the config
names none (instead of the JSONL file in ``data_dir``).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from .. import registry
from ..config import DaemonConfig, in_dir, resolved_sinks
from ..errors import ConfigError
from ..pipeline import Lookup, Pipeline, event_fields, event_type_name, resolve_pipeline

__all__ = ["PACKS", "build_pipeline", "config_stages", "enrich_lookups", "rules_stage"]

PACKS = {
    "generic": "collector.packs.generic:pack_pipeline",
    "playback": "collector.packs.playback:pack_pipeline",
    "casino": "collector.packs.casino:pack_pipeline",
    "clickstream": "collector.packs.clickstream:pack_pipeline",
}


def build_pipeline(cfg: DaemonConfig) -> Pipeline:
    """The configured :class:`~collector.Pipeline`, with its sinks and dead-letter sink."""
    sinks, dl = resolved_sinks(cfg)
    pc = cfg.pipeline
    extra = enrich_lookups(cfg)  # config errors first, before a pack is imported or built
    rules = rules_stage(cfg)
    more = config_stages(cfg)
    changes: dict[str, Any] = {}
    if ":" not in pc.pack:
        try:
            factory: Any = registry.load(PACKS, pc.pack, "pack")
        except ConfigError as e:
            raise ConfigError(f"`$.pipeline.pack`: {e}") from None
        own = getattr(sys.modules.get(getattr(factory, "__module__", ""), None), "default_sinks", None)
        if not cfg.sinks and own is not None:  # the pack's own defaults beat the JSONL file
            sinks = tuple(own(pc, cfg.resolved_data_dir()))
        p: Pipeline = factory(pc, sinks, dl)
    else:
        p = resolve_pipeline(pc.pack)
        # the config's sinks and dead-letter sink win; the pack's own stay when none is given
        if cfg.sinks or not p.sinks:
            changes["sinks"] = sinks
        if cfg.deadletter is not None or p.deadletter is None:
            changes["deadletter"] = dl
    if extra:
        fields = event_fields(p.event_type)
        for i, lk in enumerate(extra):
            for what, f in (("target", lk.target), ("key", lk.key), *(("key_fields", k) for k in lk.key_fields)):
                if f not in fields:
                    raise ConfigError(f"`$.enrich[{i}].{what}`: {f!r} is not a field of {event_type_name(p.event_type)} "
                                      f"(pack {pc.pack!r}; its fields: {', '.join(fields)})")
        # a step filling a field one of the pack's lookups fills replaces that lookup
        mine = {lk.target for lk in extra}
        changes["lookups"] = tuple(lk for lk in p.lookups if lk.target not in mine) + extra
    stages = (*p.stages, *more, *([rules] if rules is not None else []))
    # state files (the SQLite pairing store's) named relative live in the data directory
    data_dir = cfg.resolved_data_dir()
    placed = tuple(_state_in_data_dir(st, data_dir) for st in stages)
    if placed != p.stages:
        changes["stages"] = placed
    p = dataclasses.replace(p, **changes) if changes else p
    _check_routes(p, rules, more)
    return p


def _check_routes(p: Pipeline, rules: Any, more: list[Any]) -> None:
    """Route rules name sinks of the pipeline (errors with the config path of the rule)."""
    from ..sinks.routing import route_errors

    for st, why in route_errors(p):
        if st is None:
            raise ConfigError(f"`$.{why.partition(': ')[0]}`: {why.partition(': ')[2]}")
        path, _, rest = why.partition(": ")
        if st is rules:
            raise ConfigError(f"`$.{path}`: {rest}")
        k = next((k for k, m in enumerate(more) if m is st), None)
        if k is not None:
            raise ConfigError(f"`$.stages[{k}].{path}`: {rest}")
        raise ConfigError(f"stage {st.name!r}: `{path}`: {rest}")


def config_stages(cfg: DaemonConfig) -> list[Any]:
    """The stages of the config's ``[[stages]]`` tables, in order.

    A ``pair`` with ``store = "sqlite"`` and no ``state_path`` gets
    ``pairs-{name}.sqlite3`` (``Pair.from_config``), placed in ``data_dir`` by
    :func:`build_pipeline`.
    """
    from ..stages import build_stage

    return [build_stage(t, f"$.stages[{i}]") for i, t in enumerate(cfg.stages)]


def _state_in_data_dir(st: Any, data_dir: Any) -> Any:
    """A stage whose relative ``state_path`` (a SQLite pairing store) is put in ``data_dir``."""
    path = getattr(st, "state_path", None)
    if not path or not isinstance(path, str):
        return st
    placed = in_dir(path, data_dir)
    return st if placed == path else dataclasses.replace(st, state_path=placed)  # Pair: a dataclass


def rules_stage(cfg: DaemonConfig) -> Any:
    """The ``Rules`` stage of the config's ``[[rules]]`` tables (None without any)."""
    if not cfg.rules:
        return None
    from ..stages.rules import decode_rules

    try:
        return decode_rules({"name": "rules", "rules": cfg.rules})
    except ConfigError as e:
        path, _, why = str(e).partition(": ")
        raise ConfigError(f"`$.{path}`: {why}") from None


def enrich_lookups(cfg: DaemonConfig) -> tuple[Lookup, ...]:
    """The lookups of the config's ``[[sources]]`` and ``[[enrich]]`` tables (errors name the path)."""
    if not cfg.sources and not cfg.enrich:
        return ()
    from ..sources.config import decode_sources

    lookups: tuple[Lookup, ...] = decode_sources({"sources": cfg.sources, "enrich": cfg.enrich})
    return lookups
