"""Routing an NDJSON range inside a worker (``shard="key"``): keep mine, hand back the rest.

::

    supervisor: NDJSON batch ─► byte ranges (one find per range) ─► any worker with room
    worker w:   range ─► decode every line ─► owner of each event's key (ShardMap, crc32)
                  ├─► Routed(lines, own, parts): the other owners' events, JSON per owner,
                  │       sent before any of the range's own work (the supervisor queues
                  │       each part to its owner as a chunk of its own)
                  └─► w's own events go on through the pipeline; their ack follows

The supervisor never parses a key, and each key's events still meet in one worker, with
its cache entry, dedup window and aggregates. Forwarding costs the foreign events a JSON
encode here and a decode in their owner (PERF-NOTES, "workers route").
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from itertools import compress, repeat
from operator import attrgetter, eq, not_
from typing import Any

import msgspec

from ..pipeline import ShardMap
from ..protocol import Chunk, ErrorRecord, Message, Routed, RoutedPart

__all__ = ["RangeRouter"]


class RangeRouter:
    """Splits the events of a range by owner; remembers the lines it answers for."""

    def __init__(self, key: str, worker: int, send: Callable[[Message], None]) -> None:
        self.key = key
        self.keyget = attrgetter(key)
        self.worker = worker
        self.send = send
        self.encode = msgspec.json.Encoder().encode
        self.shards = ShardMap(1)  # key → owner, sized per range's worker count
        # routed range id → the lines this worker answers for, until its ack (see
        # PipelineRunner.fail: a failed range fails only these, the parts are elsewhere)
        self.own_lines: dict[int, list[int]] = {}

    def route(
        self, chunk: Chunk, events: list[Any], kept: list[int] | None, errors: list[ErrorRecord]
    ) -> tuple[list[Any], list[int]]:
        """``shard="key"`` NDJSON range: keep this worker's events, send the others back.

        Each event goes to its key's owner by the pipeline's shard function (the one the
        supervisor routes lists by); the others leave in one :class:`Routed` message,
        JSON-encoded per owner, before any of this range's own work. Lines that fail to
        decode stay here: this worker reports them. Returns this worker's events and
        their line indices in the range.
        """
        n = chunk.route
        if self.shards.n != n:
            self.shards = ShardMap(n)
        pos: Sequence[int] = kept if kept is not None else range(len(events))
        owner = self.owners(events)
        parts: list[RoutedPart] = []
        if n == 1:
            own_events, own_pos = events, list(pos)
        else:
            if n == 2:
                # two workers (the common case): the owners are 0 and 1, so the owner list
                # is worker 1's mask and its negation worker 0's (one pass, no comparisons)
                flip = list(map(not_, owner))
                mine, masks = (flip, [(1, owner)]) if self.worker == 0 else (owner, [(0, flip)])
            else:
                mine = list(map(eq, owner, repeat(self.worker)))
                masks = [(w, list(map(eq, owner, repeat(w)))) for w in range(n) if w != self.worker]
            own_events, own_pos = list(compress(events, mine)), list(compress(pos, mine))
            if len(own_events) < len(events):
                for w, mask in masks:
                    evs = list(compress(events, mask))
                    if evs:
                        parts.append(RoutedPart(w, self.encode(evs), array("I", compress(pos, mask)).tobytes()))
        # the lines this worker answers for: its events and the lines that did not decode
        own = self.own_lines[chunk.id] = sorted(own_pos + [r.pos for r in errors]) if errors else own_pos
        self.send(Routed(chunk.id, len(events) + len(errors), array("I", own).tobytes(), parts))
        return own_events, own_pos

    def owners(self, events: list[Any]) -> list[int]:
        """The worker of each event's key (C-level map for known hashable keys)."""
        shard = self.shards.__getitem__
        try:
            return list(map(shard, map(self.keyget, events)))
        except (TypeError, AttributeError):  # a member without the key, an unhashable key
            keys = [getattr(e, self.key, None) for e in events]
            return list(map(shard, map(ShardMap.hashable, keys)))

