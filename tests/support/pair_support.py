"""Seed 002's page views for the pairing tests (workers import this module by name).

``Click`` is a clickstream event (``page_view_start``/``page_view_end`` carry
``data.page_view_id``); :func:`page_view` converts a ``PairRecord`` into the
``page_view`` event of seed 002 step 4 (the ``emit`` of the tests); :func:`pipeline`
pairs on ``(user_id, data.page_view_id)`` into a SQLite sink, :func:`rows` reads it back.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

from collector import Pipeline
from collector.sinks import SqliteSinkConfig
from collector.stages.pairing import Pair, PairRecord


class PageData(msgspec.Struct, omit_defaults=True):
    """``data`` of a clickstream event (the fields page views use)."""

    page_view_id: str | None = None
    page_type: str | None = None
    duration_seconds: float | None = None
    paired: bool | None = None


class Click(msgspec.Struct, omit_defaults=True):
    """A clickstream event."""

    id: str
    event: str
    user_id: str
    timestamp: float
    data: PageData = msgspec.field(default_factory=PageData)


def page_view(r: PairRecord) -> Click:
    """Seed 002's ``page_view`` event for a record (its id follows from the key: idempotent)."""
    user, pv = r.key
    t = r.start_time if r.start_time is not None else r.end_time
    return Click(
        f"page_view:{user}:{pv}", "page_view", user, t or 0.0,
        PageData(page_type=r.fields.get("data.page_type"), duration_seconds=r.duration_seconds, paired=r.paired),
    )


def ev(kind: str, user: str, pv: str, t: float, page: str = "movie") -> Click:
    """A ``page_view_start`` or ``page_view_end``."""
    return Click(f"{kind}:{user}:{pv}", f"page_view_{kind}", user, t, PageData(pv, page))


def pipeline(db: str, **pair: Any) -> Pipeline:
    """Page-view pairing into the SQLite database ``db`` (``pair``: Pair options)."""
    opts: dict[str, Any] = {"key": ("user_id", "data.page_view_id"), "carry": ("data.page_type",), **pair}
    return Pipeline(
        name="clicks", event_type=Click, key="user_id", id_field="id",
        sinks=(SqliteSinkConfig(path=db),), stages=(Pair(**opts),),
    )


def rows(db: str, event: str | None = "page_view") -> list[dict[str, Any]]:
    """The stored events (of type ``event``; None: all) as dicts."""
    try:
        with sqlite3.connect(db) as c:
            texts = [r[0] for r in c.execute("SELECT event FROM events ORDER BY rowid")]
    except sqlite3.OperationalError:  # not created yet
        return []
    out = [msgspec.json.decode(t) for t in texts]
    return [o for o in out if event is None or o.get("event", o.get("type")) == event]
