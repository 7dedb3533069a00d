"""A pipeline for the data-integrity tests: client events with a session and a sequence
number, sharded by the session, so one worker holds each session's numbers.

``pipeline()``: ``Dedup`` on ``id`` counting duplicates per ``event`` (the type), then
``Gaps`` over ``session_id``/``seq`` by ``event``; ``pipeline_without_gaps()`` leaves
``Gaps`` to the daemon's ``[[stages]]`` table.
"""

from __future__ import annotations

import msgspec

from collector import Pipeline
from collector.stages import Dedup, Gaps


class ClientEvent(msgspec.Struct, forbid_unknown_fields=True):
    """A client's event: ``seq`` numbers the events of its ``session_id`` (1, 2, 3, ...)."""

    id: str
    event: str
    session_id: str
    seq: int | None = None


def pipeline_without_gaps() -> Pipeline:
    """Dedup counting per type; sharded by session."""
    return Pipeline("integrity", ClientEvent, key="session_id", stages=(Dedup(ttl=600, count_by="event"),))


def pipeline() -> Pipeline:
    """Dedup counting per type, then Gaps by type; sharded by session."""
    p = pipeline_without_gaps()
    return Pipeline("integrity", ClientEvent, key="session_id", stages=(*p.stages, Gaps(by="event")))
