"""Stages: what a worker runs on each chunk's events, in pipeline order.

::

    decoded events ─► Dedup ─► Filter/Rules ─► Enrich() (lookups) ─► Render ─► Aggregate/Pair ─► sinks
                       │ drops with a kind (duplicate, filtered, retry)     │ partials ─► supervisor

``base`` holds the contract; stateless stages (``rules``, ``render``), keyed state
(``dedup``, ``pairing``), and mergeable state (``aggregates`` over ``windows`` with the
functions in ``aggregators``; ``materialized`` views over merged aggregates).
"""

from __future__ import annotations

from .base import Enrich, Stage
from .dedup import Dedup, DedupWindow
from .render import Render
from .rules import Filter, Rules

__all__ = ["Dedup", "DedupWindow", "Enrich", "Filter", "Render", "Rules", "Stage"]
