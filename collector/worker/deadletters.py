"""``take_dead``: the events an enrichment step's failure policy dead-lettered leave the chunk.

::

    Enricher.enrich(events, dead) ─► dead: (event, stage, path, reason), one per step and event
        ─► take_dead ─► ErrorRecord(pos, path, reason, "deadlettered") for the ack
                     ─► DeadLetter(payload = the event's JSON, reason, path, stage) per event,
                        written by PipelineRunner with the chunk's commit, before the ack
                     ─► the chunk's events and positions without them
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from ..protocol import ErrorRecord

__all__ = ["take_dead"]


def take_dead(
    dead: list[Any], events: list[Any], kept: list[int] | None, errors: list[ErrorRecord],
    enc: msgspec.json.Encoder, worker: int,
) -> tuple[list[Any], list[int] | None, list[Any], list[Any]]:
    """Take the dead-lettered events out of a chunk (see the module docstring).

    ``kept`` maps an event's index to its chunk position (None: the same); the error
    records are appended to ``errors``. An event two steps dead-lettered is one record
    with both reasons. Returns the chunk's events and positions without them, the events
    taken out (not stored: dedup must not remember them) and their ``DeadLetter`` records.
    """
    from ..sinks import DeadLetter

    first: dict[int, list[Any]] = {}
    for e, stage, path, why in dead:
        d = first.get(id(e))
        if d is None:
            first[id(e)] = [stage, path, why]
        else:
            d[2] += f"; {why}"
    now = time.time()
    where = [i for i, e in enumerate(events) if id(e) in first]  # few: cut around them
    records = []
    for i in where:
        d = first[id(events[i])]
        errors.append(ErrorRecord(kept[i] if kept is not None else i, d[1], d[2], "deadlettered"))
        records.append(DeadLetter(enc.encode(events[i]).decode(), d[2], d[1], d[0], now, worker))
    pos = kept if kept is not None else range(len(events))
    left: list[Any] = []
    left_pos: list[int] = []
    prev = 0
    for i in where:
        left += events[prev:i]
        left_pos += pos[prev:i]
        prev = i + 1
    left += events[prev:]
    left_pos += pos[prev:]
    return left, left_pos, [events[i] for i in where], records
