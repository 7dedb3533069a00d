"""A pipeline for the stateful-stage daemon tests: plays with aggregates and page-view
pairing, sharded by ``user`` so both halves of a pair (and each user's groups) reach
one worker.

``pipeline()``: a global count, a count per region, the top 3 users, a per-user count
bounded to ``max_series=5`` (so it is truncated in the Prometheus text), a tumbling
processing-time count, an aggregate left out of Prometheus, and ``Pair`` of ``start``
and ``end`` on ``(user, pv)`` with a short orphan TTL. ``plays()``: no stages.
"""

from __future__ import annotations

import msgspec

from collector import Pipeline
from collector.stages.aggregates import Aggregate
from collector.stages.pairing import Pair
from collector.stages.windows import Tumbling


class Play(msgspec.Struct, forbid_unknown_fields=True):
    """An event: ``type`` is ``play``, ``start`` or ``end``; ``pv`` names a page view."""

    id: str
    type: str
    user: str
    region: str = "eu"
    pv: str | None = None
    at: float | None = None


def pipeline() -> Pipeline:
    """The aggregates and the pairing (see the module docstring)."""
    return Pipeline("stateful", Play, key="user", stages=(
        Aggregate("total", "count"),
        Aggregate("by_region", "count", by="region"),
        Aggregate("top_users", "top_k", by="user", k=3, where=("type", "play")),
        Aggregate("by_user", "count", by="user", max_series=5),
        Aggregate("per_hour", "count", window=Tumbling(3600)),
        Aggregate("hidden", "count", by="type", prometheus=False),
        Pair("start", "end", type_field="type", key=("user", "pv"), time_field=None, orphan_ttl=0.5, tick=0.1),
    ))


def plays() -> Pipeline:
    """The event type alone, sharded by ``user`` (the config's ``[[stages]]`` add the rest)."""
    return Pipeline("plays", Play, key="user")
