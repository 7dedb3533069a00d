"""Planning an input: normalise it, read each event's key, shard, cut into chunks.

::

    batch (Structs, dicts, JSON array bytes, NDJSON bytes, raw items + keys)
      ─► Planner.prepare: items + keys (one key-only C parse for bytes) ─► worker of
         each key (crc32 % N, remembered per key) ─► Operation with its Plan
      ─► Planner.cut: per segment of 64k events, per worker, chunks of chunk_size
         (Entry: the chunk's items, encoded lazily when its worker has room)

``shard="chunk"`` pipelines skip keys: NDJSON is cut at newlines, one ``find`` per
chunk, and sent as views of the caller's buffer; workers count its lines. Every Python loop here is per chunk
or per key, never per event, except on the slow paths for input that is not clean.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter, eq, methodcaller
from typing import Any

import msgspec

from ..arena import SLOT_BYTES
from ..errors import InvalidInput
from ..pipeline import Pipeline, ShardMap, event_type_name
from ..results import ErrorItem
from .operation import Operation, Plan, RangePart

__all__ = ["Entry", "Plan", "Planner", "ShardMap"]

NO_KEY: Any = object()  # the key of an input rejected before routing
_NON_BLANK = re.compile(rb"[^ \t\r\n]")  # the first byte of JSON text (json.org's whitespace)
Submission = tuple[list[list["Entry"]] | None, list["Entry"] | None]


class _KeyOf(msgspec.Struct):
    """Decodes only the shard key of a JSON object; other fields are skipped unparsed."""


def key_decoder(key: str) -> msgspec.json.Decoder[Any]:
    """Decoder of a JSON array that builds only each object's shard key."""
    T = msgspec.defstruct("_KeyOf_" + key, [(key, Any, None)], bases=(_KeyOf,))
    return msgspec.json.Decoder(list[T])  # type: ignore[valid-type]


class Entry:
    """A chunk in the ledger: it stays until its worker acknowledges it.

    ``items`` are the chunk's events (until encoded); where they sit in the input is
    worked out only when needed (an error to report, events to return): segment
    ``[lo, hi)`` of the routed inputs, this worker's share of it, from ``offset``.
    """

    __slots__ = (
        "_positions", "attempt", "hi", "id", "items", "lo", "n", "offset", "op", "part_pos", "payload", "reserved",
        "sent_at", "size", "slot", "worker",
    )

    def __init__(
        self,
        cid: int,
        op: Operation,
        worker: int,
        items: list[Any] | None,
        lo: int,
        hi: int,
        offset: int,
        n: int | None = None,
        payload: Any = None,
    ) -> None:
        self.id = cid
        self.op = op
        self.worker = worker
        self.items: list[Any] | None = items
        self.n = len(items) if items is not None else (n or 0)
        self.lo = lo
        self.hi = hi
        self.offset = offset
        self._positions: list[int] | None = None
        self.payload: Any = payload  # bytes, or a memoryview of the caller's NDJSON batch
        self.attempt = 0
        self.sent_at = 0.0
        self.part_pos: Sequence[int] | None = None  # a routed part: its events' lines in range ``lo``
        self.slot = -1  # while sent: the worker's arena slot holding the payload (-1: inline)
        self.size = 0  # the payload's bytes in that slot
        # a shard="key" range while its router holds it: per worker, the slot reserved in
        # that worker's arena for its part (-1: none)
        self.reserved: list[int] | None = None

    @property
    def positions(self) -> list[int]:
        """Input index of each of the chunk's events."""
        if self._positions is None:
            plan = self.op.plan
            assert plan is not None
            seg = plan.base[self.lo : self.hi]
            if plan.shard_of is not None:
                # the worker's share of the segment, once per segment and worker: a chunk is
                # a slice of it, and masking the segment again for every chunk with an error
                # cost 4 ms per ack (300,000 events, 2 workers: 1 % dead-lettered doubled the time)
                share = plan.shares.get((self.lo, self.hi, self.worker))
                if share is None:
                    mask = map(eq, plan.shard_of[self.lo : self.hi], itertools.repeat(self.worker))
                    share = plan.shares[self.lo, self.hi, self.worker] = list(itertools.compress(seg, mask))
                seg = share
            self._positions = list(seg[self.offset : self.offset + self.n])
        return self._positions

    @positions.setter
    def positions(self, value: list[int]) -> None:
        self._positions = value
        self.n = len(value)


def _no_encoder(e: Entry) -> bytes | None:
    raise RuntimeError("operation has no encoder")


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "array"}.get(type(v), type(v).__name__)


class Planner:
    """Turns inputs into operations with a :class:`Plan`, and plans into chunks."""

    SEGMENT = 65_536  # events cut per step: workers start on the first while the rest is cut

    def __init__(self, pipeline: Pipeline, nworkers: int, chunk_size: int) -> None:
        self.nworkers = nworkers
        self.chunk_size = chunk_size
        self.event_type = pipeline.event_type
        self.key = pipeline.key
        self.keyget = attrgetter(self.key)
        self.chunked = pipeline.shard == "chunk"
        self.enc = msgspec.json.Encoder()
        self.dec_raw = msgspec.json.Decoder(list[msgspec.Raw])
        self.dec_keys = key_decoder(self.key)
        self.shards = ShardMap(nworkers)
        self.ids = itertools.count(1)

    # -- prepare ----------------------------------------------------------------------
    def prepare(
        self, batch: Any, return_events: bool, keys: list[Any] | None = None, owners: list[int] | None = None
    ) -> Operation:
        """Normalise the input, find each event's key and worker (no encoding yet).

        ``owners`` (with ``keys``): each key's worker, when the caller knows it (ids
        generated for one worker, or keys it hashed with the shard function, see
        ``Collector.ahandle``); they are taken as given, and the keys as distinct."""
        if keys is not None and (not isinstance(batch, list) or len(keys) != len(batch)):
            raise InvalidInput("keys= needs a list of raw JSON objects and one key per item")
        if owners is not None and (
            keys is None or len(owners) != len(keys) or (owners and not 0 <= min(owners) <= max(owners) < self.nworkers)
        ):
            # a worker out of range would match no worker's part: its events would be lost
            raise InvalidInput(f"owners= needs keys= and one worker in 0..{self.nworkers - 1} per key")
        if self.chunked:
            return self._prepare_chunked(batch, return_events, keys is not None)
        errors: list[ErrorItem] = []
        keys_given = keys is not None
        if keys is not None:
            items, kind = batch, "raw"
        elif isinstance(batch, (bytes, bytearray, memoryview)):
            body = bytes(batch)
            got = self._from_bytes(body, return_events)
            if isinstance(got, Operation):  # NDJSON (the workers route it) or a malformed array
                return got
            items, keys, kind = got, self._keys_of(got, body, errors), "raw"
        elif isinstance(batch, (list, tuple)):
            items, keys, kind = self._from_list(batch, errors)
        else:
            raise self._wrong_type(batch)
        total = len(items)
        if errors:  # inputs rejected here are not routed
            base: range | list[int] = [i for i, k in enumerate(keys) if k is not NO_KEY]
            routed = [items[i] for i in base]
            keys = [keys[i] for i in base]
        else:
            base, routed = range(total), items
        # keys handed in by the caller are event ids here (they never repeat): hash them
        # without growing the map of known keys
        many = self.nworkers > 1
        try:
            if owners is not None:
                # fresh ids made for their worker, or ids a client sent, hashed in C:
                # hashing them here was ~10 % of the daemon's supervisor under batched
                # load, their set a few more (distinct_keys then counts each event's key)
                shard_of, distinct = (owners if many else None), len(keys)
            else:
                if not many:
                    shard_of = None
                elif keys_given:
                    shard_of = self.shards.of_many(keys)
                else:
                    shard_of = list(map(self.shards.__getitem__, keys))
                distinct = len(set(keys))
        except TypeError:  # an unhashable key (a JSON list or object): use its repr
            keys = list(map(ShardMap.hashable, keys))
            shard = self.shards.of if keys_given else self.shards.__getitem__
            shard_of = list(map(shard, keys)) if many else None
            distinct = len(set(keys))
        op = Operation(total, return_events, distinct)
        op.errors.extend(errors)
        op.failed = len(errors)
        op.plan = Plan(base, shard_of, False, _no_encoder, routed)
        op.plan.encode = self._encoder_for(op, kind)
        return op

    def _wrong_type(self, batch: Any) -> InvalidInput:
        return InvalidInput(
            f"handle() takes a list of {event_type_name(self.event_type)} or dicts, or bytes "
            f"(JSON array or NDJSON); got {type(batch).__name__}"
        )

    def _malformed(self, e: Exception, size: int, return_events: bool) -> Operation:
        """A JSON array that does not parse: one failed input, reported, not raised."""
        why = str(e)
        if "byte" not in why:  # msgspec names the byte except when the input ends early
            why += f" (at byte {size}, the end of the input)"
        op = Operation(1, return_events, 0)
        op.errors.append(ErrorItem(
            0, "$", f"the batch is not a valid JSON array: {why}; send NDJSON (one event per "
            "line) to have malformed lines reported one by one", "invalid"))
        op.failed = 1
        op.plan = Plan(range(0), None, False, _no_encoder, [])
        return op

    def _prepare_chunked(self, batch: Any, return_events: bool, raw: bool) -> Operation:
        """``shard="chunk"``: no keys, no routing; NDJSON is cut at newlines unparsed.

        ``raw``: ``batch`` is a list of raw JSON objects given with their keys (the HTTP
        server's): they go to the workers as they are; the keys are not needed."""
        if raw:
            items: list[Any] = batch
            kind = "raw"
        elif isinstance(batch, (bytes, bytearray, memoryview)):
            got = self._from_bytes(bytes(batch), return_events)
            if isinstance(got, Operation):
                return got
            items = got
            kind = "raw"
        elif isinstance(batch, (list, tuple)):
            items = batch if isinstance(batch, list) else list(batch)
            kind = "objects"
        else:
            raise self._wrong_type(batch)
        op = Operation(len(items), return_events, 0)
        op.reported_keys = set()
        op.plan = Plan(range(len(items)), None, False, _no_encoder, items)
        op.plan.encode = self._encoder_for(op, kind)
        return op

    def _from_bytes(self, body: bytes, return_events: bool) -> Operation | list[Any]:
        """``bytes``: NDJSON → an operation of byte ranges (nothing parsed here); a JSON
        array → its raw items (a malformed one: an operation with that one error);
        blanks only → no items. Only the leading blanks are scanned, in C, no copy."""
        first = _NON_BLANK.search(body)
        if first is None:
            return []
        if body[first.start()] != 0x5B:  # not "[": NDJSON
            return self._ndjson_ranges(body, first.start(), return_events)
        try:
            return self.dec_raw.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return self._malformed(e, len(body), return_events)

    def _ndjson_ranges(self, body: bytes, start: int, return_events: bool) -> Operation:
        """Cut NDJSON into byte ranges of about ``chunk_size`` lines; nothing else.

        The supervisor never passes over the whole body (PERF-NOTES: any per-line work
        here caps the engine near 0.7 of its ceiling): it finds one newline per chunk
        from an estimate of the line length. Workers count their lines, skip blank
        ones and report both in their acks; the operation's total and the input index
        of each error come from those counts once every chunk is acknowledged
        (:meth:`Operation.resolve`). Until then ``total`` is the estimate, which is
        also what admission (``max_inflight``) counts.

        ``shard="key"``: whichever worker takes a range routes it: it keeps
        the events whose key it owns and hands the others to their owners, as parts
        (:meth:`Ledger.on_routed`). Keys never touch this thread. A range then holds
        about ``chunk_size`` lines per worker, so that what each worker runs as one chunk
        (its share of a range) is about ``chunk_size`` events, as in ``shard="chunk"``
        (2048-line ranges made 1024-event chunks: 7 % slower, from the per-chunk costs);
        but no more than fits a payload arena slot.
        """
        end = len(body)
        while end > start and body[end - 1] in b" \t\r\n":  # trailing blanks: a few bytes
            end -= 1
        probe = body[start : start + (1 << 16)]
        avg = max(1, len(probe) // (probe.count(b"\n") + 1))
        step = max(1, avg * self.chunk_size)
        if not self.chunked and self.nworkers > 1:
            step = max(step, min(step * self.nworkers, SLOT_BYTES * 3 // 4))
        slices: list[tuple[int, int]] = []
        find = body.find
        first = start
        while start < end:
            cut = find(b"\n", min(start + step, end), end)
            stop = end if cut < 0 else cut
            slices.append((start, stop))
            start = stop + 1
        # no events list of the estimated size: resolve() builds it from the counts
        op = Operation(max(1, (end - first) // avg), False, 0)
        op.events = [] if return_events else None
        op.reported_keys = set()
        op.parts = [RangePart() for _ in slices]
        op.plan = Plan(range(0), None, True, _no_encoder, None, slices, body, 0 if self.chunked else self.nworkers)
        return op

    def _encoder_for(self, op: Operation, kind: str) -> Callable[[Entry], bytes | None]:
        enc = self.enc.encode

        def encode(e: Entry) -> bytes | None:
            items = e.items
            assert items is not None
            if kind == "raw":
                return b"[" + b",".join(items) + b"]"
            try:
                return enc(items)
            except (TypeError, ValueError, msgspec.EncodeError, OverflowError):
                pass
            # one item is not JSON-encodable: encode one by one, fail just that one
            ok_pos, parts = [], []
            for p, item in zip(e.positions, items, strict=True):
                try:
                    parts.append(enc(item))
                    ok_pos.append(p)
                except (TypeError, ValueError, msgspec.EncodeError, OverflowError) as ex:
                    op.errors.append(ErrorItem(p, "$", f"cannot encode as JSON: {ex}", "invalid"))
            if len(ok_pos) != e.n:
                op.account(0, e.n - len(ok_pos))
            e.positions = ok_pos
            if not ok_pos:
                return None
            return b"[" + b",".join(parts) + b"]"

        return encode

    def _from_list(self, batch: list[Any] | tuple[Any, ...], errors: list[ErrorItem]) -> tuple[list[Any], list[Any], str]:
        items = batch if isinstance(batch, list) else list(batch)
        # fast paths: all Structs, or all dicts; the workers validate types anyway
        with contextlib.suppress(AttributeError, TypeError):
            return items, list(map(self.keyget, items)), "objects"
        key = self.key
        with contextlib.suppress(AttributeError, TypeError):
            return items, list(map(methodcaller("get", key), items)), "objects"
        keys: list[Any] = []
        for i, it in enumerate(items):
            t = type(it)
            if t is dict:
                keys.append(it.get(key))
            elif isinstance(it, msgspec.Struct):
                keys.append(getattr(it, key, None))
            else:
                errors.append(ErrorItem(i, "$", f"Expected `object`, got `{t.__name__}`", "invalid"))
                keys.append(NO_KEY)
        return items, keys, "objects"

    def _keys_of(self, raws: list[Any], array: bytes, errors: list[ErrorItem]) -> list[Any]:
        key = self.key
        if array and not errors:
            try:
                return [getattr(k, key) for k in self.dec_keys.decode(array)]
            except (msgspec.ValidationError, msgspec.DecodeError):
                pass
        one = msgspec.json.Decoder(Any)
        keys: list[Any] = []
        for i, raw in enumerate(raws):
            if raw is None:
                keys.append(NO_KEY)
                continue
            v = one.decode(raw)
            if type(v) is dict:
                keys.append(v.get(key))
            else:
                errors.append(ErrorItem(i, "$", f"Expected `object`, got `{_json_type(v)}`", "invalid"))
                keys.append(NO_KEY)
        return keys

    def split(self, e: Entry) -> list[Entry]:
        """A sent chunk of a JSON array as one chunk per event (redelivery isolating a
        poison event, :meth:`Ledger.requeue`); [] for an NDJSON range or a routed part,
        whose lines only the worker that reads them counts."""
        op = e.op
        assert op.plan is not None and e.payload is not None  # a chunk that was sent
        if op.plan.ndjson or op.parts is not None or e.part_pos is not None:
            return []
        raws = self.dec_raw.decode(e.payload)  # the planner made it: a JSON array, one item per position
        singles = []
        for p, raw in zip(e.positions, raws, strict=True):
            s = Entry(next(self.ids), op, e.worker, None, e.lo, e.hi, 0, 1, b"[" + bytes(raw) + b"]")
            s.positions = [p]
            singles.append(s)
        return singles

    # -- cut --------------------------------------------------------------------------
    def cut(self, op: Operation) -> Iterator[Submission]:
        """The chunks of a planned operation, a segment at a time, then ``(None, None)``.

        Each item is ``(per_worker, None)`` (key mode: one list of entries per worker) or
        ``(None, shared)`` (any worker may take them); the last one seals the operation.
        """
        plan = op.plan
        assert plan is not None
        ids = self.ids
        if plan.slices:  # NDJSON cut at newlines: the payloads are views of the caller's bytes
            assert plan.body is not None
            view = memoryview(plan.body)
            # lo = the chunk's ordinal: its lines' input indices are known once counted
            entries = [Entry(next(ids), op, -1, None, k, k, 0, 0, view[s:e]) for k, (s, e) in enumerate(plan.slices)]
            plan.slices = plan.body = None
            yield None, entries
            yield None, None
            return
        routed = plan.routed or []
        plan.routed = None
        n, cs, seg = self.nworkers, self.chunk_size, self.SEGMENT
        if self.chunked:  # no key affinity: whichever worker has room takes the next chunk
            for lo in range(0, len(routed), seg):
                hi = min(lo + seg, len(routed))
                yield None, [Entry(next(ids), op, -1, routed[i : min(i + cs, hi)], i, min(i + cs, hi), 0) for i in range(lo, hi, cs)]
            yield None, None
            return
        shard_of = plan.shard_of
        for lo in range(0, len(routed), seg):
            hi = min(lo + seg, len(routed))
            part = routed[lo:hi]
            per_worker: list[list[Entry]] = []
            for wi in range(n):
                if shard_of is None:
                    mine = part
                else:
                    mine = list(itertools.compress(part, map(eq, shard_of[lo:hi], itertools.repeat(wi))))
                per_worker.append([Entry(next(ids), op, wi, mine[i : i + cs], lo, hi, i) for i in range(0, len(mine), cs)])
            yield per_worker, None
        yield None, None  # seal: from now on, no chunk left means done
