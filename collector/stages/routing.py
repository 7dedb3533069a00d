"""Routing of rules: the ``route`` action's checks and its per-chunk routes.

::

    Rule(action="route", sinks=[...]) ── check_route(): sinks named, no empty names
    RulesRuntime(chunk) ── add_routes(routes, events, sinks): id(event) → (event, frozenset of sink names)
    PipelineRunner ── take_routes() right after the stage ran ─► SinkSet.commit(events, routes)

An event routed by several ``route`` rules goes to the union of their sinks. Whether
the names are sinks of the pipeline is checked where both are known:
:func:`collector.sinks.routing.check_routes` (``collector check-config``, a worker's boot).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

__all__ = ["ACTIONS", "Routes", "add_routes", "check_route", "merge_routes", "routes_of"]

ACTIONS = ("allow", "block", "transform", "route")


def check_route(action: str, sinks: Sequence[Any], edits: bool, at: str) -> None:
    """Config errors of a rule's ``sinks`` for its action (``at``: the rule's path)."""
    if action != "route":
        if sinks:
            raise ConfigError(f"{at}.sinks: only a route rule names sinks (this one is {action!r})")
        return
    if not isinstance(sinks, list | tuple):
        raise ConfigError(f"{at}.sinks: expected a list of sink names, got {sinks!r}")
    for j, s in enumerate(sinks):
        if not isinstance(s, str) or not s:
            raise ConfigError(f"{at}.sinks[{j}]: expected a sink name, got {s!r}")
    if not sinks and not edits:
        raise ConfigError(f"{at}: a route rule needs sinks (the sinks its events go to) or edits (a routing hint)")


Routes = dict[int, tuple[Any, frozenset[str]]]
"""``id(event)`` → (the event, its sinks): the event is held so its id is not reused."""


def add_routes(routes: Routes, events: Sequence[Any], sinks: frozenset[str]) -> None:
    """Route ``events`` to ``sinks`` as well (keyed by ``id(event)``)."""
    get = routes.get
    for e in events:
        k = id(e)
        old = get(k)
        routes[k] = (e, sinks if old is None else old[1] | sinks)


def merge_routes(a: Routes, b: Routes) -> Routes:
    """Routes of two stages: an event routed by both goes to the sinks of both."""
    for k, v in b.items():
        old = a.get(k)
        a[k] = v if old is None else (v[0], old[1] | v[1])
    return a


def routes_of(routes: Routes, events: Sequence[Any]) -> list[frozenset[str] | None]:
    """Each event's sinks (None: not routed), in order."""
    get = routes.get
    out: list[frozenset[str] | None] = []
    for e in events:
        r = get(id(e))
        out.append(r[1] if r is not None and r[0] is e else None)
    return out
