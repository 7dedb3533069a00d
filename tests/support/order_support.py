"""Readings for the ordering tests (workers import this module by name).

``Reading`` carries a user (the pipeline's key) and a time ``ts``; :func:`pipeline`
orders them with ``Order(by="ts", ...)`` into a SQLite sink, :func:`stored` reads the
rows back in the order the sink wrote them.
"""

from __future__ import annotations

import random
import sqlite3
from typing import Any

import msgspec

from collector import Pipeline
from collector.sinks import SqliteSinkConfig
from collector.stages.ordering import Order


class Reading(msgspec.Struct):
    """One event of a user at time ``ts``."""

    id: str
    user_id: str
    ts: float


def readings(users: int, per_user: int, seed: int, t0: float = 0.0, step: float = 1.0) -> list[Reading]:
    """``per_user`` readings of each user at ``t0, t0 + step, ...``, shuffled as a whole."""
    out = [Reading(f"u{u}-{t0 + i * step}", f"u{u}", t0 + i * step) for u in range(users) for i in range(per_user)]
    random.Random(seed).shuffle(out)
    return out


def pipeline(db: str, **order: Any) -> Pipeline:
    """Readings ordered by ``ts`` per user into the SQLite database ``db``."""
    return Pipeline(
        name="readings", event_type=Reading, key="user_id", id_field="id",
        sinks=(SqliteSinkConfig(path=db),), stages=(Order(by="ts", **order),),
    )


def stored(db: str) -> list[dict[str, Any]]:
    """The stored readings as dicts, in the order the sink wrote them."""
    try:
        with sqlite3.connect(db) as c:
            texts = [r[0] for r in c.execute("SELECT event FROM events ORDER BY rowid")]
    except sqlite3.OperationalError:  # not created yet
        return []
    return [msgspec.json.decode(t) for t in texts]


def per_user(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each user's times in the order stored."""
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r["user_id"], []).append(r["ts"])
    return out


def not_dropped(e: Reading) -> bool:
    """A filter after the ordering: readings whose id starts with ``drop`` are filtered out."""
    return not e.id.startswith("drop")
