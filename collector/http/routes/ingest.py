"""``POST /events`` and ``POST /events/batch``.

::

    body ─► Content-Encoding undone (bodies.inflate, the limit on the output) ─► empty?
         ─► envelope: list[Raw] (C; validates the whole body)
         ─► batchread.with_ids (C, one pass over the items): a generated id put first in
            each event, its shard key read, the depth measured; or, when every event
            sent its id, batchread.sent_ids (C, one pass): each id and key read, the depth
            measured, the items left as they are
            (else, for a batch mixing the two or with items that are not objects:
            bodies.json_depth, the heads parse, IdReader.ids_and_keys)
         ─► backend.submit(items, keys) (one coalesced operation)
         ─► per-item results (accepted / duplicate / invalid / filtered / unauthorized /
            deadlettered / failed)

The supervisor parses each body once as raw items (no Python objects per field) and
looks at one field, the id; validation against the schema happens in the workers, as
for ``handle()``, so the serial part stays small. A request is answered only after its
events are committed by the sinks (or rejected), so a 202 means stored: ``accepted``
means every configured sink holds the event; one a sink dead-lettered is answered
``deadlettered`` (the batch's item status; 422 or 503 for ``POST /events``).
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from itertools import compress, repeat
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import msgspec

from ...errors import CollectorClosed, Overloaded
from ...ids import id_block, new_ids
from ...pipeline import ShardMap, event_structs, struct_field
from ...sinks.sinkset import REFUSED
from ..bodies import ENCODINGS, TooLarge, inflate, json_depth
from ..protocol import Deferred, Request, Response, error
from ..schemas import BatchRequest, BatchResponse, EventResponse, ItemResult, json_encoder

try:  # built from batchread.c at install; optional: without it, batches are read in Python
    from .. import batchread
except ImportError:  # pragma: no cover - a build without a C compiler
    batchread = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ...config import ServerConfig
    from ...pipeline import Pipeline
    from ..backend import Backend, Submitted

__all__ = ["NO_OWNER", "IdReader", "IngestRoutes", "refused"]

NO_OWNER = (0, 1)  # (worker, workers): generated ids go wherever the shard function puts them


def refused(reason: str) -> bool:
    """Whether a ``deadlettered`` reason says a store refused the event's data (not gave up)."""
    return f": {REFUSED}" in reason


class IdReader:
    """What the server reads of each event of one pipeline, in one C pass (other
    fields are skipped unparsed): the id, generated when absent and the id is text,
    and the shard key, handed to the engine so that the supervisor parses nothing."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.id: str | None = pipeline.id_field
        self.key: str = pipeline.key
        names = sorted({self.key, *([self.id] if self.id else [])})
        # gc=False: one head and one result per event, none can be part of a cycle (they
        # hold decoded JSON values); tracked, they made the supervisor's cyclic GC 14 %
        # of its profile under batched load
        head = msgspec.defstruct("EventHead", [(n, Any, msgspec.UNSET) for n in names], gc=False)
        heads = msgspec.defstruct("BatchHeads", [("events", list[head])])  # type: ignore[valid-type]
        self.one: msgspec.json.Decoder[Any] = msgspec.json.Decoder(head)
        self.many: msgspec.json.Decoder[Any] = msgspec.json.Decoder(heads)
        self.get_id = attrgetter(self.id) if self.id else (lambda h: msgspec.UNSET)
        self.get_key = attrgetter(self.key)
        self.generate = self.id is not None and _takes_text(pipeline.event_type, self.id)
        # `{"<id field>":"%s",` then the rest of the object: the one template that puts a
        # generated id first in an event (the field's name escaped for JSON and for %)
        # the names as JSON text, for the native reader (quoted_key None: the key is the id)
        self.quoted_id = msgspec.json.encode(self.id or "")
        self.quoted_key = None if self.key == self.id else msgspec.json.encode(self.key)
        name = self.quoted_id.replace(b"%", b"%%")
        self.id_first = b"{" + name + b':"%s",%b'
        self.id_only = b"{" + name + b':"%s"%b'

    def read_native(
        self, raws: list[Any], owner: tuple[int, int] = NO_OWNER
    ) -> tuple[list[Any], list[Any], list[Any], int] | None:
        """(items, ids, keys, depth) of a batch none of whose events sent an id, read in
        one C pass (``batchread.with_ids``): each item with a generated id put first, each
        key, and the deepest item's nesting (an object is 1). None when the extension is
        absent, the pipeline does not generate ids, or some event is not that common case
        (the caller then reads the heads with :meth:`ids_and_keys`). ``owner``: see
        :meth:`new_ids`."""
        if batchread is None or not self.generate or not raws:
            return None
        # the ids are formatted in C too: new_ids in Python cost more than reading the items
        worker, workers = self._owner(owner)
        # about `workers` values of the counter per id: a block this large runs out with
        # a probability below 2**-60 (then the Python path makes them)
        span = len(raws) if workers == 1 else 4 * workers * len(raws) + 64
        return batchread.with_ids(raws, self.quoted_id, *id_block(span), self.quoted_key, worker, workers, span)

    def read_sent(
        self, raws: list[Any], workers: int = 1
    ) -> tuple[list[Any], list[Any], int, list[int] | None] | None:
        """(ids, keys, depth, owners) of a batch every event of which sent its id, read in
        one C pass (``batchread.sent_ids``; the items are left as they are). ``owners``:
        with ``workers`` > 1, each key's worker by the pipeline's shard function when
        every key is text (the engine then does not hash them), else None. None when the
        extension is absent, the pipeline has no id field, or some event is not that case
        (the caller then reads the heads with :meth:`ids_and_keys`)."""
        if batchread is None or self.id is None or not raws:
            return None
        return batchread.sent_ids(raws, self.quoted_id, self.quoted_key, workers)

    def inject_id(self, raw: msgspec.Raw | bytes, eid: str) -> bytes:
        """The JSON object ``raw`` with the generated id ``eid`` as its first member."""
        b = bytes(raw)
        if b[1:2] == b'"':  # `{"...`: a member follows (the common case, no scan)
            return self.id_first % (eid.encode(), b[1:])
        b = b.lstrip()
        rest = b[1:].lstrip()
        return self.id_only % (eid.encode(), b[1:] if rest[:1] == b"}" else b"," + b[1:])

    def new_ids(self, n: int, owner: tuple[int, int] = NO_OWNER) -> list[str]:
        """``n`` new ids; with ``owner = (worker, workers)`` and the id as the shard key,
        ids that the pipeline's shard function gives to ``worker`` (drawn from the id
        counter, the others left unused)."""
        worker, workers = self._owner(owner)
        if workers == 1:
            return new_ids(n)
        shards = ShardMap(workers)
        out: list[str] = []
        while len(out) < n:
            got = new_ids(2 * workers * (n - len(out)) + 8)
            out.extend(compress(got, map(worker.__eq__, shards.of_many(got))))
        del out[n:]
        return out

    def _owner(self, owner: tuple[int, int]) -> tuple[int, int]:
        """``owner`` when the id is the shard key; else ids do not decide the worker."""
        return owner if self.key == self.id else NO_OWNER

    def owned(self, owner: tuple[int, int]) -> int | None:
        """The worker that ids generated for ``owner`` belong to, for the engine to
        take as their keys' worker; None when the ids do not decide it."""
        worker, workers = self._owner(owner)
        return worker if workers > 1 else None

    def ids_and_keys(
        self, heads: list[Any], raws: list[Any], owner: tuple[int, int] = NO_OWNER
    ) -> tuple[list[Any], list[Any], list[Any]]:
        """(items, ids, keys) for a batch whose heads were read; ids generated as needed
        (``owner``: see :meth:`new_ids`)."""
        ids = list(map(self.get_id, heads))
        items = raws
        if self.generate and ids.count(msgspec.UNSET) == len(ids) and _all_members(raws):
            # the common case, no event sent an id: one id each, put first in each
            # object by one formatting step (no scan of the item)
            ids = self.new_ids(len(ids), owner)
            items = list(map(self.id_first.__mod__, zip(map(str.encode, ids), map(_after_brace, raws), strict=True)))
        elif self.generate and msgspec.UNSET in ids:
            items = list(raws)
            missing = [i for i, k in enumerate(ids) if k is msgspec.UNSET]
            for i, new in zip(missing, self.new_ids(len(missing), owner), strict=True):
                ids[i] = new
                items[i] = self.inject_id(raws[i], new)
        if self.key == self.id:
            keys = ids
        else:
            keys = [None if k is msgspec.UNSET else k for k in map(self.get_key, heads)]
        return items, ids, keys


# the drop kinds a batch item is answered with as they are; any other kind is "failed"
_ITEM_STATUSES = frozenset(("invalid", "duplicate", "deadlettered", "filtered", "unauthorized"))
_ID_TYPES = (str, int)  # ids echoed in answers; anything else is invalid and not repeated back


def _accepted_layout() -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
    """The all-accepted answer's text around its numbers and ids, cut from what msgspec
    encodes for the Structs (batchread.accepted fills it in): the format stays theirs."""
    n, mark = 987654321, "ID-MARK"
    env = json_encoder.encode(BatchResponse(n, 0, 0, 0, []))
    head, _, rest = env.partition(str(n).encode())
    mid, _, tail = rest.partition(b"[]")
    item = json_encoder.encode(ItemResult(n, "accepted", mark))
    ihead, _, irest = item.partition(str(n).encode())
    imid, _, itail = irest.partition(mark.encode())
    return head, mid + b"[", b"]" + tail, ihead, imid, itail


_ACCEPTED = _accepted_layout()


def _takes_text(event_type: Any, field: str) -> bool:
    """Whether ``event_type.<field>`` accepts a string (so a UUID can be generated for it);
    for a tagged union, whether every member's does."""
    return all(_struct_takes_text(s, field) for s in event_structs(event_type))


def _struct_takes_text(struct: Any, field: str) -> bool:
    got = struct_field(struct, field)
    return got is not None and any(isinstance(o, msgspec.inspect.StrType) for o in got[1])


def _empty_body() -> Response:
    return error(400, "malformed_json", "the body is empty; send a JSON object")


def _after_brace(raw: msgspec.Raw | bytes) -> memoryview:
    return memoryview(raw)[1:]


def _all_members(raws: list[Any]) -> bool:
    """Whether every item starts ``{"`` (an object with a member, no leading space),
    in C passes: JSON text holds no NUL byte, so each item after the first starts
    right after a NUL of the join."""
    joined = b"\x00".join(raws)
    return joined[:2] == b'{"' and joined.count(b'\x00{"') == len(raws) - 1



class IngestRoutes:
    """The ingest handlers. ``cfg`` is replaced by :meth:`App.configure` on reload;
    the pipeline (and so the id reader) is the backend's current one, read per request."""

    def __init__(self, backend: Backend, cfg: ServerConfig) -> None:
        self.backend = backend
        self.cfg = cfg
        self._dec_batch = msgspec.json.Decoder(BatchRequest)
        self._reader: tuple[Pipeline, IdReader] | None = None  # (pipeline, its reader): a reload may change it

    def _decoded(self, req: Request) -> Response | None:
        """Undo ``Content-Encoding`` in place; the error answer if the body is refused."""
        wbits = ENCODINGS[req.headers.get("content-encoding", "").strip().lower()]
        if wbits is None:
            return None
        limit = self.cfg.max_body_bytes
        try:
            req.body = inflate(req.body, wbits, limit)
        except zlib.error as e:
            return error(400, "bad_encoding", f"the body is not valid {req.headers['content-encoding'].strip()}: {e}")
        except TooLarge:
            return error(413, "body_too_large",
                         f"the body decompresses to more than max_body_bytes={limit} bytes; split it")
        return None

    def _too_deep(self, body: bytes) -> Response | None:
        """The too_deep answer when ``body`` nests deeper than ``max_json_depth``."""
        if json_depth(body, self.cfg.max_json_depth) > self.cfg.max_json_depth:
            return self._deep_error()
        return None

    def _deep_error(self) -> Response:
        return error(400, "too_deep", f"JSON nesting deeper than max_json_depth={self.cfg.max_json_depth}")

    def reader(self) -> IdReader:
        """The reader for the pipeline now running."""
        p = self.backend.pipeline()
        if self._reader is None or self._reader[0] is not p:
            self._reader = (p, IdReader(p))
        return self._reader[1]

    def _with_id(
        self, raw: msgspec.Raw | bytes, rd: IdReader, owner: tuple[int, int], native: bool = False
    ) -> tuple[msgspec.Raw | bytes, Any, Any, str | None, int | None, int | None]:
        """(item, shard key, id, error, depth, owned) of one event; the id is generated
        when absent. ``native``: try the C readers first (``POST /events``; a batch's
        events come here only once they declined the batch). ``depth``: the event's
        nesting when a C reader read it, else None (the caller measures it). ``owned``:
        the worker the C readers found for the event's key (an id made for ``owner``'s
        worker, :meth:`IdReader.owned`, or a sent id's worker by the shard function), else
        None. ``owner``: see :meth:`IdReader.new_ids`.

        Raises ``msgspec.DecodeError`` when ``raw`` is not JSON at all.
        """
        try:
            head = rd.one.decode(raw)  # checks the whole event is JSON
        except msgspec.ValidationError as e:
            return raw, None, None, str(e).split(" - at ")[0], None, None
        # the head says which C reader applies: asking the other first would cost its
        # walk, and read_native an id block, per request
        if native and rd.get_id(head) is msgspec.UNSET:
            got = rd.read_native([raw], owner)
            if got is not None:
                n_items, n_ids, n_keys, depth = got
                return n_items[0], n_keys[0], n_ids[0], None, depth, rd.owned(owner)
        elif native:
            sent = rd.read_sent([raw], owner[1])
            if sent is not None:  # it sent its id: its key's worker is the shard function's
                s_ids, s_keys, depth, s_owners = sent  # ids: str, int or None, as _ID_TYPES
                return raw, s_keys[0], s_ids[0], None, depth, s_owners[0] if s_owners else None
        items, ids, keys = rd.ids_and_keys([head], [raw], owner)
        eid = ids[0]
        return items[0], keys[0], eid if type(eid) in _ID_TYPES else None, None, None, None

    def _stopping(self) -> Response:
        return error(503, "shutting_down", "the server is stopping", retry_after=self.cfg.retry_after)

    def _overloaded(self, e: BaseException) -> Response:
        ra = max(1, int(getattr(e, "retry_after", self.cfg.retry_after) or self.cfg.retry_after))
        return error(503, "overloaded", f"{e}; retry after {ra} s", retry_after=ra)

    def post_event(self, req: Request) -> Response | Deferred:
        """``POST /events``: one event → 202 stored, 200 duplicate or filtered, 422 invalid,
        401 unauthorized (the auth stage refused its token; ``reason`` says why).

        A sink that did not store it (it went to the dead-letter sink) is answered
        ``deadlettered`` with the sink and reason, never 202: 422 when a store refused
        its data (sent again unchanged it would be refused again: fix the event, or
        leave it to ``collector replay`` after the store is changed), 503 with
        Retry-After when every sink that did not store it gave up after its retries
        (an outage, a full disk: sent again later it is stored, and dedup did not
        remember it). An enrichment step that dead-letters (``on_failure``) answers the
        same way: 422 when the source does not have the key (``refused this event``),
        503 when the source failed (``gave up``).
        """
        bad = self._decoded(req)
        if bad is not None:
            return bad
        body = req.body
        if not body.strip():
            return _empty_body()
        try:
            # as for a batch: parsed first, the depth measured only where the answer needs it
            rd, owner = self.reader(), self.backend.owner()
            item, key, eid, why, depth, owned = self._with_id(body, rd, owner, native=True)
        except msgspec.DecodeError as e:
            return self._too_deep(body) or error(400, "malformed_json", f"the body is not valid JSON: {e}")
        if depth is None or why is not None:
            bad = self._too_deep(body)
        elif depth > self.cfg.max_json_depth:
            bad = self._deep_error()
        if bad is not None:
            return bad
        if why is not None:
            self.backend.count_rejected()
            return error(422, "invalid", f"{why}: the body must be one event object", path="$")
        if self.backend.stopping:
            return self._stopping()
        return Deferred(self.backend.submit([item], [key], owned), functools.partial(self._event_answer, eid))

    def _event_answer(self, eid: Any, fut: asyncio.Future[Any]) -> Response:
        """``POST /events``'s answer once its event is stored or rejected."""
        try:
            res: Submitted = fut.result()
        except (Overloaded, CollectorClosed) as e:
            return self._overloaded(e)
        if res.errors:
            err = res.errors[0]
            if err.kind == "duplicate":
                return Response(200, json_encoder.encode(EventResponse("duplicate", eid)))
            if err.kind == "invalid":
                return Response(422, json_encoder.encode(EventResponse("invalid", eid, err.path, err.reason)))
            if err.kind == "deadlettered":
                body = json_encoder.encode(EventResponse("deadlettered", eid, err.path, err.reason))
                if refused(err.reason):
                    return Response(422, body)
                return Response(503, body, headers=[("Retry-After", str(self.cfg.retry_after))])
            if err.kind == "filtered":  # dropped on purpose (a rule): answered, not to be retried
                return Response(200, json_encoder.encode(EventResponse("filtered", eid, err.path, err.reason)))
            if err.kind == "unauthorized":  # its token was refused: not stored, not to be retried as is
                return Response(401, json_encoder.encode(EventResponse("unauthorized", eid, err.path, err.reason)))
            return Response(503, json_encoder.encode(EventResponse("failed", eid, err.path, err.reason)),
                            headers=[("Retry-After", str(self.cfg.retry_after))])
        return Response(202, json_encoder.encode(EventResponse("accepted", eid)))

    def post_batch(self, req: Request) -> Response | Deferred:
        """``POST /events/batch``: ``{"events": [...]}`` → per-item results."""
        bad = self._decoded(req)
        if bad is not None:
            return bad
        body = req.body
        if not body.strip():
            return _empty_body()
        # the envelope is decoded first, and the depth measured only where the answer
        # needs it: the native reader below measures it as it reads the items (the
        # envelope forbids other members, so the items' depth + 2 is the body's), and a
        # body too deep for msgspec fails here and is answered too_deep
        try:
            env = self._dec_batch.decode(body)
        except msgspec.ValidationError as e:
            msg = str(e)
            reason, _, path = msg.partition(" - at ")
            return self._too_deep(body) or error(
                422, "invalid", f"{reason}; send {{\"events\": [...]}}", path=path.strip("`") or "$")
        except msgspec.DecodeError as e:
            return self._too_deep(body) or error(400, "malformed_json", f"the body is not valid JSON: {e}")
        raws = env.events
        if len(raws) > self.cfg.max_batch_items:
            return self._too_deep(body) or error(
                413, "too_many_events",
                f"{len(raws)} events in one batch, more than max_batch_items={self.cfg.max_batch_items}; split it",
                path="$.events")
        rd = self.reader()
        results: list[ItemResult]
        items: list[Any]
        keys: list[Any]
        where: list[int] | range
        owner = self.backend.owner()
        native = rd.read_native(raws, owner)
        sent = rd.read_sent(raws, owner[1]) if native is None else None
        owned: int | list[int] | None = None
        if native is not None:  # the common case: objects without ids, read in one C pass
            items, ids, keys, depth = native
            owned = rd.owned(owner)  # every id was made for that worker
        elif sent is not None:  # the other common case, every event sent its id: one C pass too
            ids, keys, depth, owned = sent  # each key's worker, found in C
            items = raws
        if native is not None or sent is not None:
            if depth + 2 > self.cfg.max_json_depth:  # the envelope's object and array
                return self._deep_error()
            if self.backend.stopping:
                return self._stopping()
            # the per-item results are made only if the answer is not "all accepted"
            return Deferred(self.backend.submit(items, keys, owned),
                            functools.partial(self._batch_done, None, range(len(items)), ids))
        deep = self._too_deep(body)
        if deep is not None:
            return deep
        try:
            # every item's id and key in one C pass, when all items are objects
            heads: list[Any] | None = rd.many.decode(body).events
        except msgspec.ValidationError:
            heads = None  # some item is not an object: the loop below says which
        if heads is not None:
            items, ids, keys = rd.ids_and_keys(heads, raws, owner)
            results = [ItemResult(i, "accepted", k if type(k) in _ID_TYPES else None) for i, k in enumerate(ids)]
            where = range(len(items))
        else:
            results, items, keys, where = [], [], [], []
            for i, raw in enumerate(raws):
                item, key, eid, why, _, _ = self._with_id(raw, rd, owner)
                if why is not None:  # not an object: no worker could read it
                    self.backend.count_rejected()
                    results.append(ItemResult(i, "invalid", None, f"$.events[{i}]", why))
                else:
                    results.append(ItemResult(i, "accepted", eid))
                    items.append(item)
                    keys.append(key)
                    where.append(i)
        if not items:
            return self._batch_answer(results, 0, ())
        if self.backend.stopping:
            return self._stopping()
        return Deferred(self.backend.submit(items, keys), functools.partial(self._batch_done, results, where, None))

    def _batch_done(
        self, results: list[ItemResult] | None, where: Sequence[int], ids: list[str] | None, fut: asyncio.Future[Any]
    ) -> Response:
        """A batch's answer once its events are stored or rejected: the engine's errors
        put on the items they belong to (``where``: each submitted event's index in the
        batch). ``results`` None: every item was submitted, with ``ids`` (generated or
        sent); when every one was accepted the answer's body is written in C."""
        try:
            res: Submitted = fut.result()
        except (Overloaded, CollectorClosed) as e:
            return self._overloaded(e)
        errors = res.errors
        if results is None:
            assert ids is not None
            if not errors and batchread is not None:
                body = batchread.accepted(ids, _ACCEPTED)
                if body is not None:
                    return Response(202, body)
            results = list(map(ItemResult, range(len(ids)), repeat("accepted"), ids))
        for err in errors:
            i = where[err.index]
            r = results[i]
            r.status = err.kind if err.kind in _ITEM_STATUSES else "failed"
            if err.kind != "duplicate":
                r.path = f"$.events[{i}]" + err.path[1:]
                r.reason = err.reason
        return self._batch_answer(results, len(where), errors)

    def _batch_answer(self, results: list[ItemResult], submitted: int, errors: Sequence[Any]) -> Response:
        """The batch's 202 (or 503 when nothing could be stored) with its per-item results."""
        counts = {"accepted": 0, "duplicate": 0, "invalid": 0, "failed": 0, "deadlettered": 0, "filtered": 0,
                  "unauthorized": 0}
        if errors or submitted != len(results):
            for r in results:
                counts[r.status] += 1
        else:  # every item accepted: no need to look at each
            counts["accepted"] = len(results)
        body = json_encoder.encode(BatchResponse(
            counts["accepted"], counts["duplicate"], counts["invalid"], counts["failed"], results,
            counts["deadlettered"], counts["filtered"], counts["unauthorized"],
        ))
        if counts["failed"] and not (counts["accepted"] or counts["duplicate"] or counts["filtered"]
                                     or counts["unauthorized"]):
            return Response(503, body, headers=[("Retry-After", str(self.cfg.retry_after))])
        # a well-formed batch is answered per item, even when no item was valid: the
        # envelope was right, and `results` says what was wrong with each event
        return Response(202, body)
