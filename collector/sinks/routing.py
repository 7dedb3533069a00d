"""Which sinks an event goes to: the checks that no event can be routed nowhere.

::

    [[rules]] action = "route", sinks = ["clicks", "audit"]   (collector.stages.routing)
    [[sinks]] name = "audit", default = false                 (takes routed events only)
    [[sinks]] name = "premium", when = { path = "data.user_type", eq = "premium" }
                                                              (takes the unrouted events it selects)
        ── check_routes(pipeline): every name a route rule gives is a sink of the pipeline,
           every sink's `when` compiles, and some sink takes the events no rule routes
           ─► ConfigError naming the rule's (or the sink's) path
        ── compile_when(when, at) ─► selector(events) -> mask, for SinkSet

Run by ``collector check-config`` and the daemon (through ``build_pipeline``) and by
every worker when it opens its sinks, so an embedded pipeline is checked too. The
commit itself is :meth:`collector.sinks.sinkset.SinkSet.commit` with ``routes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError
from .base import default_name
from .config import decode_sink_config

__all__ = ["Selector", "check_routes", "compile_when", "route_errors"]

Selector = Callable[[Sequence[Any]], list[bool]]


def compile_when(when: Any, at: str) -> Selector:
    """A sink's ``when`` (the rules' condition form) as a chunk selector.

    An event whose condition raises (a type mismatch) or reads a missing field is not
    selected; ``ConfigError`` names ``at`` (``sinks[1].when.regexp: unknown operator``).
    """
    from ..stages.conditions import compile_cond
    from ..stages.rules import COUNTERS, decode_rules

    try:
        cond = decode_rules({"rules": [{"name": "when", "when": when}]}).rules[0].when
    except ConfigError as e:
        raise ConfigError(str(e).replace("rules[0].when", at, 1)) from None
    pred = compile_cond(cond, at, False, [0] * len(COUNTERS))
    one, many = pred.one, pred.many

    def one_safe(e: Any) -> bool:
        try:
            return bool(one(e))
        except Exception:
            return False

    def select(events: Sequence[Any]) -> list[bool]:
        try:  # the fast path over the chunk; any gap or mismatch: one event at a time
            return list(map(bool, many(list(events), {})))
        except Exception:
            return list(map(one_safe, events))

    return select


def _configs(pipeline: Any) -> list[Any]:
    return [c if not isinstance(c, dict) else decode_sink_config(c, f"$.sinks[{i}]") for i, c in enumerate(pipeline.sinks)]


def route_errors(pipeline: Any) -> list[tuple[Any, str]]:
    """``(stage, "rules[i].sinks[j]: unknown sink ...")`` for each route to a sink the
    pipeline lacks; ``(None, why)`` when no sink takes unrouted events."""
    cfgs = _configs(pipeline)
    names = [default_name(c, i) for i, c in enumerate(cfgs)]
    out: list[tuple[Any, str]] = []
    for i, c in enumerate(cfgs):
        when = getattr(c, "when", None)
        if when is not None:
            try:
                compile_when(when, f"sinks[{i}].when")
            except ConfigError as e:
                out.append((None, str(e)))
    routed = False
    for st in pipeline.stages:
        if not getattr(st, "is_rules", False):
            continue
        for i, r in enumerate(st.rules):
            for j, s in enumerate(getattr(r, "sinks", ()) or ()):
                routed = True
                if s not in names:
                    known = ", ".join(names) or "none"
                    out.append((st, f"rules[{i}].sinks[{j}]: unknown sink {s!r} (the pipeline's sinks: {known}; "
                                    "a sink is named by its `name`, else `<kind>[<index>]`)"))
    if cfgs and not any(getattr(c, "default", True) for c in cfgs) and not routed:
        out.append((None, "sinks: every sink has default = false and no rule routes to any: no event would be stored"))
    elif cfgs and not any(getattr(c, "default", True) for c in cfgs):
        out.append((None, "sinks: every sink has default = false: an event no route rule names would be stored "
                          "nowhere; leave `default` true on at least one sink"))
    return out


def check_routes(pipeline: Any) -> None:
    """Raise :class:`ConfigError` for the first routing error (stage name and rule path)."""
    errs = route_errors(pipeline)
    if errs:
        st, why = errs[0]
        raise ConfigError(why if st is None else f"stage {st.name!r}: {why}")
