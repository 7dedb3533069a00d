"""Routing an NDJSON range inside a worker (``shard="key"``): keep mine, hand back the rest.

::

    supervisor: NDJSON batch ─► byte ranges (one find per range) ─► any worker with room
    worker w:   range ─► owner of each line's key (ShardMap's function: crc32 % workers)
                  ├─► Routed(lines, own, parts): the other owners' lines, NDJSON per owner,
                  │       sent before any of the range's own work (the supervisor queues
                  │       each part to its owner as a chunk of its own)
                  └─► w's own events go on through the pipeline; their ack follows

Two ways to learn the owners, same answers:

- **native** (``keyroute.split``, C): reads each line only up to its key member, hashes
  the key's text and copies the line, untouched, to its owner's buffer. Each event is
  decoded once, by its owner, as in ``shard="chunk"``. It declines a range in which some
  line's owner cannot be told without a decode (an escaped key, a float, a duplicate
  member; see the C source), and a range whose own lines do not all decode;
- **Python**: decode every line, map the keys, JSON-encode the foreign events again per
  owner. It reports the lines that fail to decode itself. About 0.5 µs per event more
  CPU than the native way (docs/performance.md).

The supervisor never parses a key, and each key's events still meet in one worker, with
its cache entry, dedup window and aggregates.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from itertools import compress, repeat
from operator import attrgetter, eq, not_
from typing import Any

import msgspec

from ..arena import PayloadArena
from ..pipeline import ShardMap, struct_field
from ..protocol import Chunk, ErrorRecord, Message, Routed, RoutedPart
from .decoding import ChunkDecoder

try:  # built from keyroute.c at install; optional: without it, ranges route in Python
    from . import keyroute
except ImportError:  # pragma: no cover - a build without a C compiler
    keyroute = None  # type: ignore[assignment]

__all__ = ["RangeRouter", "native_key"]


def native_key(event_type: Any, key: str) -> tuple[bytes, int] | None:
    """What the native router needs to find ``key`` in a line: its quoted JSON name and the
    kinds of value it may hold; None when only a decode tells the owner (no extension,
    not a Struct, an array-like Struct, a key of another type than str, int or None)."""
    if keyroute is None or not (isinstance(event_type, type) and issubclass(event_type, msgspec.Struct)):
        return None
    got = struct_field(event_type, key)
    if got is None or event_type.__struct_config__.array_like:
        return None
    field, types = got
    kinds = 0
    for t in types:
        # the value's text is what ShardMap hashes only for these (a str's own text,
        # repr() of an int or None); a UUID, a datetime or an enum decode to another repr
        if type(t) is msgspec.inspect.StrType:
            kinds |= keyroute.KIND_STR
        elif type(t) is msgspec.inspect.IntType:
            kinds |= keyroute.KIND_INT
        elif type(t) is msgspec.inspect.NoneType:
            kinds |= keyroute.KIND_NONE
        else:
            return None
    if not field.required and field.default is None and field.default_factory is msgspec.NODEFAULT:
        kinds |= keyroute.KIND_MISSING
    return msgspec.json.encode(field.encode_name), kinds


class RangeRouter:
    """Splits the events of a range by owner; remembers the lines it answers for."""

    def __init__(self, key: str, worker: int, send: Callable[[Message], None], decoder: ChunkDecoder,
                 arenas: Sequence[PayloadArena | None]) -> None:
        self.key = key
        self.keyget = attrgetter(key)
        self.worker = worker
        self.send = send
        self.encode_lines = msgspec.json.Encoder().encode_lines
        self.native = native_key(decoder.event_type, key)  # None: the key's type needs a decode
        self.decode_array = decoder.dec.decode
        self.arenas = arenas  # every worker's payload arena, by index (None: it has none)
        self.shards = ShardMap(1)  # key → owner, sized per range's worker count
        # routed range id → the lines this worker answers for, until its ack (see
        # PipelineRunner.fail: a failed range fails only these, the parts are elsewhere)
        self.own_lines: dict[int, list[int]] = {}

    def split(self, chunk: Chunk, payload: bytes | memoryview) -> tuple[list[Any], list[int]] | None:
        """``shard="key"`` NDJSON range, the native way: this worker's events and their line
        indices, the others' lines sent in a :class:`Routed`; None when it cannot (the
        caller decodes the range and calls :meth:`route`)."""
        if self.native is None or chunk.route < 2:
            return None
        name, kinds = self.native
        got = keyroute.split(payload, name, chunk.route, self.worker, kinds)
        if got is None:
            return None
        lines, own, own_pos, parts = got
        try:
            events = self.decode_array(own)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None  # an invalid line of mine: the Python way reports it where it was
        pos = array("I", own_pos).tolist()
        self.own_lines[chunk.id] = pos
        self.send(Routed(chunk.id, lines, own_pos, [self.part(chunk, w, p, ps) for w, p, ps in parts]))
        return events, pos

    def part(self, chunk: Chunk, w: int, payload: bytes, positions: bytes) -> RoutedPart:
        """Worker ``w``'s part: written into the slot the range reserved in ``w``'s arena,
        else inline (the supervisor places it). The Routed that names the slot is sent
        after the write: the owner reads it only once the supervisor has that message."""
        k = chunk.reserved[w] if chunk.reserved else -1
        arena = self.arenas[w] if w < len(self.arenas) else None
        if k < 0 or arena is None or len(payload) > arena.slot_bytes:
            return RoutedPart(w, payload, positions)
        arena.write(k, payload)
        return RoutedPart(w, b"", positions, k, len(payload))

    def route(
        self, chunk: Chunk, events: list[Any], kept: list[int] | None, errors: list[ErrorRecord]
    ) -> tuple[list[Any], list[int]]:
        """``shard="key"`` NDJSON range: keep this worker's events, send the others back.

        Each event goes to its key's owner by the pipeline's shard function (the one the
        supervisor routes lists by); the others leave in one :class:`Routed` message,
        NDJSON per owner, before any of this range's own work. Lines that fail to
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
                        parts.append(self.part(chunk, w, self.encode_lines(evs), array("I", compress(pos, mask)).tobytes()))
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

