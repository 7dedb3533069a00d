"""What the daemon's Prometheus text shows of the stateful stages: merged results → series.

::

    supervisor: merged AggregateResult ─► aggregate_series(spec, result, now) ─► AggregateSeries
                merged Pair counters ───► (Pair.read: a dict of counters, shown as they are)

Cardinality bound: an aggregate is shown only with ``prometheus=True`` (the default),
and its values only while the current window holds at most ``max_series`` groups
(default 100); past that the aggregate shows its group count, its counters and
``truncated`` instead of its values, so one aggregate by user id cannot flood the
scrape. ``top_k`` shows its K items (at most ``max_series`` of them) whatever the number
of groups. A global aggregate (no ``by``) is one series.

The current window: ``Global`` the one window; ``Sliding`` the last ``size`` seconds as
of now; ``Tumbling``/``Hopping`` the latest window begun at the aggregate's time, which
is the wall clock for processing time and the merged watermark (the newest event time)
for event time. Its start is ``window_start``; no label carries it, so a series keeps
its name from one window to the next.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

__all__ = ["AggregateSeries", "aggregate_series", "key_label"]

# skipped events by reason: the aggregate's own counters of the same names
SKIPPED = ("bad_value", "missing_key", "missing_time", "late")


class AggregateSeries(msgspec.Struct):
    """One aggregate's figures for the exposition.

    ``values``: ``(key label or None for a global figure, value)``; ``groups``: groups
    in the current window (a lower bound over its panes when ``truncated``);
    ``window_start``: the current window's start (tumbling and hopping only).
    """

    name: str
    fn: str
    window: str
    values: list[tuple[str | None, float]]
    groups: int
    truncated: bool
    counters: dict[str, int]
    window_start: float | None = None


def key_label(key: Any) -> str:
    """A group key as a label value: a tuple's values joined by commas."""
    if isinstance(key, tuple | list):
        return ",".join(map(str, key))
    return str(key)


def aggregate_series(spec: Any, result: Any, now: float) -> AggregateSeries | None:
    """The current window's values of a merged aggregate, bounded by ``spec.max_series``
    (None when ``spec.prometheus`` is false). ``spec``: an ``Aggregate``; ``result``: its
    ``AggregateResult`` (typed loosely: ``aggregates`` imports this module)."""
    if not spec.prometheus:
        return None
    shape = result.shape
    window: dict[str, Any] = {"now": now}
    start = None
    if shape.kind in ("tumbling", "hopping"):
        t = now if spec.window.time_field is None or not result.watermark else result.watermark
        start = math.floor(t / shape.hop + 1e-9) * shape.hop
        window.update(start=start, end=start + shape.size)
    panes = shape.windows(sorted(result.panes), window.get("start"), window.get("end"), now)
    in_window = [p for _, _, ps in panes for p in ps]
    groups = max((len(result.panes[p]) for p in in_window), default=0)
    out = AggregateSeries(spec.name, spec.fn, shape.kind, [], groups, False, dict(result.counters), start)
    if not result.grouped or spec.fn == "rate":
        out.groups = 1 if groups else 0
    elif spec.fn != "top_k" and groups > spec.max_series:
        out.truncated = True
        return out
    value = spec.read(result, None, **window)
    if shape.kind in ("tumbling", "hopping"):
        value = value[0]["value"] if value else None
    if spec.fn == "top_k":
        items = value or []
        out.values = [(key_label(k), float(n)) for k, n in items[: spec.max_series]]
        out.truncated = len(items) > spec.max_series
    elif isinstance(value, dict):
        out.groups = len(value)
        out.values = [(key_label(k), float(v)) for k, v in value.items() if _number(v)]
    elif value is None and not result.grouped and spec.fn in ("count", "sum", "distinct", "rate"):
        out.values = [(None, 0.0)]  # nothing in the current window yet
    elif _number(value):
        out.values = [(None, float(value))]
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
