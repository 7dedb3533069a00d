"""The sink contract: :class:`Sink`, the per-chunk :class:`Batch` and its :class:`EventCodec`, :class:`DeadLetter`.

::

    SinkSet ── Batch(events, codec) ──► Sink.write(batch) ──► store
                 │ ndjson / texts / ids, each encoded once, on first use
                 └─ refused rows ──► [DeadLetter, ...] ──► dead-letter sink

A :class:`Batch` encodes the chunk to JSON once (``msgspec``, one ``encode_lines`` call)
and every sink reads the encoding it needs from it, so N sinks do not pay N encodes.
Fan-out, retry and dead-lettering are :mod:`collector.sinks.sinkset`'s; grouping
concurrent writes into one round is :mod:`collector.sinks.batching`'s.
"""

from __future__ import annotations

import hashlib
import re
import typing
from collections.abc import Sequence
from operator import attrgetter
from typing import Any, ClassVar

import msgspec

from ..pipeline import event_fields, event_structs, event_type_name
from .config import DeadLetterConfig, SinkConfig, redact_dsn, redact_urls

__all__ = ["Batch", "DeadLetter", "EventCodec", "Sink", "default_name"]


class DeadLetter(msgspec.Struct, frozen=True):
    """One record of the dead-letter sink (one JSON line).

    ``payload`` is the original event as JSON text (bytes are decoded as UTF-8),
    ``reason`` what went wrong, ``path`` the field path (``$`` for the whole event),
    ``stage`` where it failed (``validate``, ``sink:<name>``, ...), ``time`` Unix
    seconds. ``collector replay`` reads these lines back.
    """

    payload: str
    reason: str
    path: str = "$"
    stage: str = "validate"
    time: float = 0.0
    worker: int | None = None


def _scalar_kind(tp: Any) -> str | None:
    """'int' / 'float' / 'str' / 'bool' for simple (optionally nullable) annotations."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, type(int | None)) else (tp,)
    args = tuple(a for a in args if a is not type(None))
    if len(args) != 1:
        return None
    (a,) = args
    if typing.get_origin(a) is typing.Annotated:
        a = typing.get_args(a)[0]
    if typing.get_origin(a) is typing.Literal:
        lits = typing.get_args(a)
        a = type(lits[0]) if lits and all(type(x) is type(lits[0]) for x in lits) else None
    for t in (bool, int, float, str):  # bool before int: bool is an int subclass
        if a is t:
            return t.__name__
    return None


class EventCodec:
    """What sinks need to know about the event type, worked out once per worker.

    ``fields`` are the event's top-level fields as ``(attr name, JSON key, scalar
    kind or None)``. ``id_kind`` is ``"int"`` when the id field is an ``int``, else
    ``"text"``; without an id field the id is a content hash (BLAKE2b-128 of the
    event's JSON, hex), so rewriting the same event is still a no-op.
    """

    def __init__(self, event_type: Any, id_field: str | None) -> None:
        self.event_type = event_type
        self.encoder = msgspec.json.Encoder()
        self.fields: list[tuple[str, str, str | None]] = []
        if event_type is not None:
            # a tagged union: the fields every member has (typed as the first declares
            # them) and the tag, which the encoder writes into every event
            structs = event_structs(event_type)
            shared = set(event_fields(event_type))
            hints = typing.get_type_hints(structs[0], include_extras=True)
            for f in msgspec.structs.fields(structs[0]):
                if f.name in shared:
                    self.fields.append((f.name, f.encode_name, _scalar_kind(hints.get(f.name, f.type))))
            tag = structs[0].__struct_config__.tag_field
            if len(structs) > 1 and tag and tag in shared:
                self.fields.append((tag, tag, "str"))
        names = {f[0] for f in self.fields}
        if id_field is not None and event_type is not None and id_field not in names:
            from ..errors import ConfigError

            raise ConfigError(f"sinks: id field {id_field!r} is not a field of {event_type_name(event_type)}")
        self.id_field = id_field
        kinds = {f[0]: f[2] for f in self.fields}
        self.id_kind = "int" if id_field is not None and kinds.get(id_field) == "int" else "text"
        self.id_get = attrgetter(id_field) if id_field is not None else None

    def has(self, attr: str) -> bool:
        """Whether the event type has a top-level field named ``attr``."""
        return any(f[0] == attr for f in self.fields)


class Batch:
    """One chunk of events and its encodings, each computed at most once.

    ``ndjson`` is every event as one JSON line (``b"...\\n"`` each), ``texts`` the same
    lines as ``str`` without newlines, ``ids`` each event's id (see
    :class:`EventCodec`).

    ``events`` may hold records of another Struct type than the pipeline's (what a
    stage emitted, such as ``PairRecord``): msgspec's encoder takes any Struct, and
    such a record's id is a hash of its JSON text.
    """

    __slots__ = ("_ids", "_ndjson", "_texts", "codec", "events")

    def __init__(self, events: Sequence[Any], codec: EventCodec) -> None:
        self.events = events
        self.codec = codec
        self._ndjson: bytes | None = None
        self._texts: list[str] | None = None
        self._ids: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.events)

    @property
    def ndjson(self) -> bytes:
        """All events as JSON lines, newline-terminated."""
        if self._ndjson is None:
            self._ndjson = self.codec.encoder.encode_lines(self.events)
        return self._ndjson

    @property
    def texts(self) -> list[str]:
        """Each event's JSON as ``str``."""
        if self._texts is None:
            # one decode and one split for the chunk beats a decode per event;
            # JSON escapes newlines inside strings, so every b"\n" ends an event
            self._texts = self.ndjson.decode().split("\n")
            self._texts.pop()
        return self._texts

    @property
    def ids(self) -> list[Any]:
        """Each event's id: the id field (``int`` or ``str``) or a content hash."""
        if self._ids is None:
            get = self.codec.id_get
            if get is None:
                b2 = hashlib.blake2b
                self._ids = [b2(t.encode(), digest_size=16).hexdigest() for t in self.texts]
                return self._ids
            try:
                ids = list(map(get, self.events))
            except AttributeError:  # records of another type in the batch (a stage emitted them)
                ids = self._mixed_ids(get)
            if self.codec.id_kind == "int":
                self._ids = ids
            else:
                self._ids = [i if type(i) is str else str(i) for i in ids]
        return self._ids

    def _mixed_ids(self, get: Any) -> list[Any]:
        """Ids when some events lack the id field: theirs is a hash of their JSON text.

        A stage's emitted records (``PairRecord``) are not of the pipeline's event type;
        their content hash keeps rewriting the same record a no-op. With ``int`` ids it
        is the hash's first 63 bits, so an integer key column takes it.
        """
        b2 = hashlib.blake2b
        as_int = self.codec.id_kind == "int"
        texts = self.texts
        ids: list[Any] = []
        for e, t in zip(self.events, texts, strict=True):
            try:
                ids.append(get(e))
                continue
            except AttributeError:
                pass
            h = b2(t.encode(), digest_size=16)
            ids.append(int.from_bytes(h.digest()[:8], "big") >> 1 if as_int else h.hexdigest())
        return ids


class Sink:
    """A destination for event chunks. Subclasses implement :meth:`write`.

    ``write`` stores one chunk in one attempt and raises on failure; the
    :class:`SinkSet` owns retries, backoff, timeouts, metrics and dead-lettering. It
    may return dead-letter records for events the store can never accept (the MySQL
    sink does for values its schema cannot hold); the rest of the chunk is stored.
    ``write`` may be called concurrently for different chunks.
    """

    kind: ClassVar[str] = "sink"

    def __init__(self, config: Any, *, name: str, codec: EventCodec, worker: int) -> None:
        self.config = config
        self.name = name
        self.codec = codec
        self.worker = worker
        self.healthy = True
        self._secrets: list[str] = []

    async def open(self) -> None:
        """Acquire resources. A store that is down is not an error here: writes retry."""

    async def write(self, batch: Batch) -> list[DeadLetter] | None:
        """Store ``batch`` durably (one attempt)."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Write out anything buffered."""

    async def close(self) -> None:
        """Release resources; after ``flush``."""

    async def health(self) -> bool:
        """Whether the last write (or a cheap probe) succeeded."""
        return self.healthy

    def is_data_error(self, e: BaseException) -> bool:
        """Whether ``e`` says the store refuses the data itself (retrying cannot help).

        The :class:`SinkSet` then halves the chunk until the refused events stand
        alone and dead-letters only those. Default: no error is.
        """
        return False

    async def migrate(self) -> list[str]:
        """Create or upgrade the store's tables; the steps applied (SQL sinks)."""
        return []

    def describe_error(self, e: BaseException) -> str:
        """``e`` as text safe to log: known secrets and URL passwords are redacted."""
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        for s in self._secrets:
            if s:
                text = text.replace(s, "***")
        return redact_urls(text)

    def remember_secret(self, dsn: str) -> None:
        """Note the password inside ``dsn`` so that error texts never show it."""
        redacted = redact_dsn(dsn)
        if redacted != dsn:
            m = re.match(r"[^:]+://[^:/@]*:([^@]*)@", dsn)
            if m:
                self._secrets.append(m.group(1))
            for pw in re.findall(r"(?i)password=([^&]*)", dsn):
                self._secrets.append(pw)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.config!r}>"


def default_name(cfg: SinkConfig | DeadLetterConfig, index: int) -> str:
    """``cfg.name`` or ``<kind>[<index>]``."""
    name = getattr(cfg, "name", None)
    if name:
        return str(name)
    kind = getattr(cfg, "kind", "deadletter")
    return f"{kind}[{index}]"
