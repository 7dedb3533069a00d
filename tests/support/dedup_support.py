"""Seed 003's events for the shared-dedup tests: attempts, sessions and placements, each
deduplicated on its own field (``client_attempt_id``, ``session_id``, ``placement_id``).

``id`` is the event's own id (what the ledger follows); the dedup key is the type's field.
"""

from __future__ import annotations

from typing import Any

import msgspec

from collector import Pipeline
from collector.stages import Dedup

KEY_BY_TYPE = {"attempt": "client_attempt_id", "session": "session_id", "placement": "placement_id"}


class Seed3Event(msgspec.Struct, omit_defaults=True):
    """One processor event (seed 003): the type picks the field dedup keys it by."""

    id: str
    type: str = "other"
    client_attempt_id: str | None = None
    session_id: str | None = None
    placement_id: str | None = None


def attempt(i: str, key: str | None = None) -> Seed3Event:
    return Seed3Event(i, "attempt", client_attempt_id=key if key is not None else i)


def dedup(redis_url: str, prefix: str, **kw: Any) -> Dedup:
    """A Redis-shared Dedup by type (seed 003's key fields), counting duplicates per type."""
    kw.setdefault("ttl", 60.0)
    kw.setdefault("wait", 5.0)
    return Dedup(store="redis", redis_url=redis_url, prefix=prefix, type_field="type", key_by_type=KEY_BY_TYPE,
                 count_by="type", **kw)


def pipeline(redis_url: str, prefix: str, sinks: tuple[Any, ...] = (), deadletter: Any = None, **kw: Any) -> Pipeline:
    """Sharded by id over the workers; Dedup shared through Redis under ``prefix``."""
    return Pipeline("seed3", Seed3Event, key="id", sinks=sinks, deadletter=deadletter,
                    stages=(dedup(redis_url, prefix, **kw),))
