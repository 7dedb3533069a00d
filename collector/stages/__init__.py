"""Stages: what a worker runs on each chunk's events, in pipeline order.

::

    decoded events ─► Dedup ─► Filter/Rules ─► Enrich() (lookups) ─► Render ─► Aggregate/Pair ─► sinks
                       │ drops with a kind (duplicate, filtered, retry)     │ partials ─► supervisor
                                                                           └ Pair's records ─► sinks

``base`` holds the contract; stateless stages (``rules``, ``render``), keyed state
(``dedup`` and its Redis store ``dedup_redis``, ``pairing`` and its stores
``pairing_redis`` and ``pairing_sqlite``, ``integrity``: sequence gaps per session; ``ordering``: each key's events in timestamp
order),
lookups with caches of their own (``auth``: token → user id, through ``sources.auth``),
``stamp`` (the handling time), and mergeable state (``aggregates`` over ``windows`` with
the functions in ``aggregators``; ``materialized`` views over merged aggregates;
``exposition``: what the Prometheus text shows of them). ``config`` holds the TOML
Structs of ``aggregate`` and ``pair``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from .. import registry
from ..errors import ConfigError
from .base import Enrich, Stage
from .config import WINDOWS
from .dedup import Dedup, DedupWindow
from .integrity import Gaps
from .render import Render
from .rules import Filter, Rules

__all__ = ["STAGES", "Dedup", "DedupWindow", "Enrich", "Filter", "Gaps", "Render", "Rules", "Stage", "build_stage"]

# kind → "module:attr", loaded when named (a kind may also be an import string)
STAGES = {
    "dedup": "collector.stages.dedup:Dedup",
    "filter": "collector.stages.rules:Filter",
    "rules": "collector.stages.rules:Rules",
    "enrich": "collector.stages.base:Enrich",
    "render": "collector.stages.render:Render",
    "aggregate": "collector.stages.aggregates:Aggregate",
    "pair": "collector.stages.pairing:Pair",
    "stamp": "collector.stages.stamp:Stamp",
    "auth": "collector.stages.auth:TokenAuth",
    "gaps": "collector.stages.integrity:Gaps",
    "order": "collector.stages.ordering:Order",
}


def build_stage(table: dict[str, Any], where: str = "$") -> Any:
    """A stage from a config table: ``kind`` (a ``STAGES`` name or ``module:attr``) and
    the stage's own fields. Unknown fields and wrong types are a ``ConfigError`` naming
    the path (``$.stages[1].fn``) and the fields the kind has."""
    kind = table.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"`{where}.kind`: name the stage kind ({', '.join(STAGES)}, or `module:attr`)")
    try:
        cls = registry.load(STAGES, kind, "stage")
    except ConfigError as e:
        raise ConfigError(f"`{where}.kind`: {e}") from None
    args = {k: v for k, v in table.items() if k != "kind"}
    conf = getattr(cls, "config_struct", None)
    if conf is not None:  # a config Struct: nested tables (window) checked with their paths
        fields = set(conf.__struct_fields__)
        unknown = sorted(set(args) - fields)
        if unknown:
            raise ConfigError(f"`{where}.{unknown[0]}`: unknown field of a {kind!r} stage "
                              f"(its fields: {', '.join(sorted(fields))})")
        try:
            return cls.from_config(msgspec.convert(args, conf))
        except msgspec.ValidationError as e:
            msg, _, path = str(e).partition(" - at `$")
            msg, path = _hint(msg, path.rstrip("`"), conf, args)
            raise ConfigError(f"`{where}{path}`: {msg}") from None
        except (TypeError, ValueError, ConfigError) as e:  # the stage's own checks (__post_init__)
            raise ConfigError(f"`{where}`: {e}") from None
    if kind == "rules" or cls.__name__ == "Rules":
        from .rules import decode_rules

        return decode_rules(args, where)
    if dataclasses.is_dataclass(cls):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
    else:
        names = set(getattr(cls, "__struct_fields__", ()))
    unknown = sorted(set(args) - names)
    if unknown:
        raise ConfigError(f"`{where}.{unknown[0]}`: unknown field of a {kind!r} stage "
                          f"(its fields: {', '.join(sorted(names))})")
    try:
        return msgspec.convert(args, cls)
    except msgspec.ValidationError as e:
        msg, _, path = str(e).partition(" - at `$")
        raise ConfigError(f"`{where}{path.rstrip('`')}`: {msg}") from None
    except (TypeError, ValueError, ConfigError) as e:  # the stage's own checks (__post_init__)
        raise ConfigError(f"`{where}`: {e}") from None


def _hint(msg: str, path: str, conf: Any, args: dict[str, Any]) -> tuple[str, str]:
    """msgspec's (message, path) made plainer: an unknown nested field named in the path
    with the fields it could be, an enum's or a window kind's choices."""
    import re
    import typing

    unknown = re.fullmatch(r"Object contains unknown field `(\w+)`", msg)
    cls: Any = conf
    if path.startswith(".window"):
        w = args.get("window")
        kind = w.get("kind") if isinstance(w, dict) else None
        cls = next((c for c in WINDOWS if c.__struct_config__.tag == kind), None)
    if unknown is not None and cls is not None:
        return f"unknown field (its fields: {', '.join(sorted(cls.__struct_fields__))})", f"{path}.{unknown[1]}"
    if path.endswith("window.kind") or "`kind`" in msg:
        return f"{msg} (a window's `kind`: global, tumbling, hopping or sliding)", path
    name = path.rpartition(".")[2]
    if msg.startswith("Invalid enum value") and cls is conf and name in conf.__struct_fields__:
        hint = typing.get_args(typing.get_args(typing.get_type_hints(conf, include_extras=True)[name])[0])
        return f"{msg} (one of: {', '.join(map(str, hint))})", path
    return msg, path
