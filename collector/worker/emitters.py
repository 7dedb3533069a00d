"""The runner's emitter plumbing: drain the stages' records, tell them their fate, release.

::

    drain(emitters) ─► records of every emitter (Pair's page views, Order's released events)
                       + spans: (settle_records, start, end) of each emitter that wants its fate
    sinks commit records ─► settle(spans, records, ok, dead) ─► emitter.settle_records(its own,
                       ok, its dead-lettered positions)   (Order answers the chunks that waited)
    release(emitters) ─► emitter.flush(): the drain began, what is held goes now
"""

from __future__ import annotations

from typing import Any

__all__ = ["drain", "release", "settle"]


def drain(emitters: list[Any]) -> tuple[list[Any], list[tuple[Any, int, int]]]:
    """The records every emitter made since its last drain, and where each emitter that
    wants to hear of their commit (``settle_records``: Order) has its own."""
    out: list[Any] = []
    spans: list[tuple[Any, int, int]] = []
    for em in emitters:
        recs = em.drain()
        if recs:
            fate = getattr(em, "settle_records", None)
            if fate is not None:
                spans.append((fate, len(out), len(out) + len(recs)))
            out += recs
    return out, spans


def settle(spans: list[Any], records: list[Any], ok: bool, dead: list[Any] | None = None, at: int = 0) -> None:
    """Tell each emitter in ``spans`` the fate of its drained records (``dead``: positions
    from ``at`` a sink dead-lettered; ``ok`` False: the commit raised)."""
    for fate, a, b in spans:
        mine = [(p - at - a, sink, why) for p, sink, why in dead or () if a <= p - at < b]
        fate(records[a:b], ok, mine)


def release(emitters: list[Any]) -> None:
    """The drain began: emitters that hold events (Order's buffer) release them all."""
    for em in emitters:
        flush = getattr(em, "flush", None)
        if flush is not None:
            flush()
