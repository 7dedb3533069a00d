"""Stages: what a worker runs on each chunk's events, in pipeline order.

::

    decoded events ─► Dedup ─► Filter/Rules ─► Enrich() (lookups) ─► Render ─► Aggregate/Pair ─► sinks
                       │ drops with a kind (duplicate, filtered, retry)     │ partials ─► supervisor
                                                                           └ Pair's records ─► sinks

``base`` holds the contract; stateless stages (``rules``, ``render``), keyed state
(``dedup`` and its Redis store ``dedup_redis``, ``pairing`` and its Redis store
``pairing_redis``, ``integrity``: sequence gaps per session), lookups with caches of their own (``auth``: token → user id, through
``sources.auth``), ``stamp`` (the handling time), and mergeable state (``aggregates`` over
``windows`` with the functions in ``aggregators``; ``materialized`` views over merged
aggregates).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from .. import registry
from ..errors import ConfigError
from .base import Enrich, Stage
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
