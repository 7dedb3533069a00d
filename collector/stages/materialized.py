"""Materialized views: which merged aggregates make up a JSON document, and its shape.

A pack declares a ``View`` next to the ``Aggregate`` stages it reads; the engine merges
each aggregate's partials and calls ``view.render(results)``::

    View("materialized", {"events_total": Value("events_total"),
                          "top_player_bets": Top("top_player_bets"), ...})
        .render({"events_total": AggregateResult, ...}) ─► {"events_total": 12345, ...}

``seed001()`` is seed 001's ``GET /materialized`` (casino); it moves to the casino pack
when that pack exists.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from .aggregates import Aggregate, AggregateResult, read
from .windows import Sliding

__all__ = ["Top", "Value", "View", "seed001"]


@dataclass(frozen=True)
class Value:
    """One figure of an aggregate (``key``: one group's), times ``scale``, rounded to ``digits``."""

    aggregate: str
    key: Any = None
    scale: float = 1.0
    digits: int | None = None

    def render(self, result: AggregateResult | None, now: float) -> Any:
        """The figure, or None while the aggregate has no partial yet."""
        if result is None:
            return None
        v = read(result, self.key, now=now)
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = v * self.scale if self.scale != 1.0 else v
            if self.digits is not None:
                v = round(v, self.digits)
        return v


@dataclass(frozen=True)
class Top:
    """The first item of a ``top_k`` aggregate as ``{id: item, count: value}``."""

    aggregate: str
    id: str = "id"
    value: str = "count"

    def render(self, result: AggregateResult | None, now: float) -> dict[str, Any]:
        """``{id: None, count: 0}`` while nothing was counted."""
        top = read(result, now=now) if result is not None else []
        item, n = top[0] if top else (None, 0)
        return {self.id: item, self.value: n}


@dataclass(frozen=True)
class View:
    """A named JSON document: field name → ``Value`` or ``Top``, in order."""

    name: str
    fields: Mapping[str, Value | Top]

    def aggregates(self) -> list[str]:
        """The aggregate names this view reads."""
        return sorted({f.aggregate for f in self.fields.values()})

    def render(self, results: Mapping[str, AggregateResult], now: float | None = None) -> dict[str, Any]:
        """The document from merged results (``now``: the wall clock by default)."""
        t = time.time() if now is None else now
        return {name: f.render(results.get(f.aggregate), t) for name, f in self.fields.items()}

    def render_json(self, results: Mapping[str, AggregateResult], now: float | None = None) -> bytes:
        """``render`` as JSON bytes."""
        return msgspec.json.encode(self.render(results, now))


def seed001(clock: Any = time.time) -> tuple[tuple[Aggregate, ...], View]:
    """Seed 001's aggregates (over casino events) and its ``/materialized`` view.

    ``events_per_minute`` is the average since the first event; the moving average is
    over the last 60 s in 1 s panes (processing time). Wins are ``bet`` events with
    ``has_won``; deposits sum ``amount_eur`` (EUR cents, named ``count`` as in the seed).
    """
    aggs = (
        Aggregate("events_total", "count", clock=clock),
        Aggregate("events_rate", "rate", clock=clock),
        Aggregate("events_rate_60s", "rate", window=Sliding(60.0, 1.0), clock=clock),
        Aggregate("top_player_bets", "top_k", by="player_id", k=1, where=("type", "bet"), clock=clock),
        Aggregate(
            "top_player_wins", "top_k", by="player_id", k=1, where={"type": "bet", "has_won": True}, clock=clock
        ),
        Aggregate(
            "top_player_deposits", "top_k", by="player_id", value="amount_eur", k=1,
            where=("type", "deposit"), clock=clock,
        ),
    )
    view = View(
        "materialized",
        {
            "events_total": Value("events_total"),
            "events_per_minute": Value("events_rate", scale=60.0, digits=2),
            "events_per_second_moving_average": Value("events_rate_60s", digits=2),
            "top_player_bets": Top("top_player_bets"),
            "top_player_wins": Top("top_player_wins"),
            "top_player_deposits": Top("top_player_deposits"),
        },
    )
    return aggs, view
