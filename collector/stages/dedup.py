"""Dedup: drop events whose id was stored within a TTL (ack after commit).

::

    chunk ─► seen (committed ids)? duplicate │ claimed by a chunk in flight? wait for it
          ─► new: claimed by this chunk ─► sinks commit ─► settle(ok) ─► seen (or released;
             so are the ids of events a sink dead-lettered)

With ``count_by``, the duplicates are also counted per value of that field (the event
type): the runtime is a :class:`CountingDedupWindow` whose ``snapshot()`` the worker
publishes, and ``Dedup.merge``/``read`` sum the workers' counts on read.

The key is ``field``, or per event type (``key_by_type``: the value of ``type_field``
picks the field, and the key is ``(type, value)``). ``store="redis"`` shares the
window between workers and collectors (:mod:`.dedup_redis`): this worker's window
answers the ids it committed itself, Redis the rest, one pipelined round trip a chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from operator import attrgetter
from typing import Any

import msgspec

from .. import registry
from ..errors import ConfigError
from ..protocol import ErrorRecord
from .base import Stage
from .dedup_ids import id_store
from .integrity import field_path, values_of

__all__ = ["COUNTERS", "STORES", "Claim", "CountingDedupWindow", "Dedup", "DedupCounts", "DedupWindow"]

# store → "module:attr" of its runtime, imported when named (as pairing's stores)
STORES = {
    "memory": "collector.stages.dedup:DedupWindow",
    "redis": "collector.stages.dedup_redis:RedisDedupWindow",
}
UNAVAILABLE = ("retry", "pass")  # what a chunk's new ids get while the shared store is down
# the runtime's counters, published with the duplicate counts (``aggregate(name, counters=True)``)
COUNTERS = (
    "missing_key",  # events without their key field: passed through, never deduplicated
    "unavailable",  # events the shared store could not answer for (on_unavailable applied)
    "round_trips",  # pipelined Redis calls (claims, polls, settles)
    "remote_checked",  # keys asked of Redis (not answered by this worker's window)
    "remote_duplicates",  # duplicates Redis answered (stored by another worker or collector)
    "remote_waits",  # keys found pending in another process: polled until its outcome
    "settle_errors",  # Redis calls after the sinks that failed (kept and sent again later)
)


class DedupCounts(dict):
    """``Dedup.merge``'s result: ``{value: duplicates}``, with the summed runtime
    counters in ``.counters`` (a dict, so reading it as before is unchanged)."""

    counters: dict[str, int]


@dataclass(frozen=True)
class Dedup(Stage):
    """Drop events whose key was stored within ``ttl`` seconds (per-type keys and TTLs).

    An id counts as seen only once the chunk carrying it was committed by the sinks
    (ack after commit): the worker calls the runtime's ``settle`` after the sinks
    returned. A copy of an id whose original is still being stored (a client retrying
    during a store outage) is never answered as a duplicate before the original is
    stored: its chunk waits up to ``wait`` seconds for the original's outcome. If the
    original was stored, the copy is a ``duplicate``; if it failed, the copy is stored
    in its place; if the wait runs out, the copy fails with kind ``retry`` (the daemon
    answers 503 with Retry-After), so the client sends it again later.

    The key is ``field``; ``key_by_type`` maps a value of ``type_field`` to the field
    that keys events of that type (seed 003: ``{"attempt": "client_attempt_id",
    "session": "session_id", "placement": "placement_id"}``; dotted paths work), and
    such a key is ``(type, value)``, so two types never collide. ``ttl_by_type`` maps
    a value of ``type_field`` to its own TTL (seed 003: 24 h, 12 h, 7 d). An event
    whose key is absent or null passes through, not deduplicated, counted as
    ``missing_key``. At most ``max_entries`` ids are remembered in the worker; the
    oldest are forgotten first.

    ``store="memory"``: the window lives in the worker's memory (the batch is sharded
    by key so one worker sees every copy); after a restart it is empty.
    ``store="redis"`` (``pip install 'collector[redis]'``) shares it through Redis at
    ``redis_url``, keys under ``prefix``, between workers and collectors (see
    :mod:`.dedup_redis`): a claim is a pending marker living ``pending_ttl`` seconds
    (longer than the sinks take to commit a chunk, retries included), made a stored
    mark with the type's TTL after the commit, deleted if the chunk failed. A key
    another process holds pending is polled until its outcome, up to ``wait``. While
    Redis does not answer (``timeout`` seconds), ``on_unavailable`` says what new ids
    get: ``"retry"`` (the default: kind ``retry``, not stored; no duplicate can slip
    through) or ``"pass"`` (stored unchecked: no refusal, a copy may be stored twice);
    either way counted as ``unavailable`` and logged.

    ``count_by`` (a field or property of the event, e.g. ``"type"``; dotted paths
    work, into Structs and dicts) counts the duplicates per value of that field: read
    them with ``collector.aggregate(name)`` (``{value: count}``; an event lacking the
    field counts under ``""``), on ``GET /aggregates`` and as
    ``collector_duplicates_total`` in the daemon's metrics. Counts are per worker and summed on read; a worker that dies
    keeps the counts of its last snapshot. The runtime's counters (:data:`COUNTERS`)
    are published beside them (``collector.aggregate(name, counters=True)``) when the
    stage publishes at all: with ``count_by``, ``key_by_type`` or ``store="redis"``.
    Otherwise the stage keeps no counts and is not an aggregate.
    """

    field: str = "id"
    ttl: float = 300.0
    max_entries: int = 1_000_000
    type_field: str | None = None
    ttl_by_type: dict[str, float] = dc_field(default_factory=dict)
    wait: float = 30.0
    name: str = "dedup"
    count_by: str | None = None
    key_by_type: dict[str, str] = dc_field(default_factory=dict)
    store: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "collector:dedup:"
    pending_ttl: float = 120.0
    on_unavailable: str = "retry"
    timeout: float = 2.0

    def __post_init__(self) -> None:
        where = f"dedup {self.name!r}"
        if not self.field:
            raise ConfigError(f"{where}: field must name the key field")
        if not self.ttl >= 0 or self.wait < 0 or self.max_entries < 1:
            raise ConfigError(f"{where}: needs ttl >= 0, wait >= 0, max_entries >= 1")
        bad = {t: v for t, v in self.ttl_by_type.items() if not v >= 0}
        if bad:
            raise ConfigError(f"{where}: ttl_by_type values must be seconds >= 0 (got {bad})")
        if (self.ttl_by_type or self.key_by_type) and not self.type_field:
            raise ConfigError(f"{where}: ttl_by_type and key_by_type need type_field (the field holding the type)")
        bad_k = {t: f for t, f in self.key_by_type.items() if not isinstance(f, str) or not f}
        if bad_k:
            raise ConfigError(f"{where}: key_by_type maps a type to a field name (got {bad_k})")
        if self.store not in STORES and ":" not in self.store:
            raise ConfigError(f"{where}: store must be one of {', '.join(STORES)} or 'module:attr' (got {self.store!r})")
        if self.on_unavailable not in UNAVAILABLE:
            raise ConfigError(f"{where}: on_unavailable must be one of {', '.join(UNAVAILABLE)} "
                              f"(got {self.on_unavailable!r})")
        if self.pending_ttl <= 0 or self.timeout <= 0 or not self.prefix:
            raise ConfigError(f"{where}: needs pending_ttl > 0, timeout > 0 and a prefix")
        if self.store == "redis" and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"{where}: redis_url must be a redis://, rediss:// or unix:// URL (got {self.redis_url!r})")

    @property
    def stateful(self) -> bool:
        """Whether the workers publish partials (with ``count_by``, ``key_by_type`` or a shared store)."""
        return self.count_by is not None or bool(self.key_by_type) or self.store != "memory"

    @property
    def integrity(self) -> str | None:
        """What the daemon's metrics show of this stage: per-value duplicate counts."""
        return "duplicates" if self.count_by is not None else None

    def build(self) -> DedupWindow:
        """A dedup window for one worker (publishing its counts when :attr:`stateful`)."""
        if self.store == "memory":
            return CountingDedupWindow(self) if self.stateful else DedupWindow(self)
        cls = registry.load(STORES, self.store, "dedup store")
        window: DedupWindow = cls(self)
        return window

    def merge(self, partials: Sequence[bytes]) -> DedupCounts:
        """The workers' duplicate counts summed per value (and their counters, in ``.counters``)."""
        out = DedupCounts()
        counters = dict.fromkeys(COUNTERS, 0)
        for b in partials:
            p = _decoder.decode(b)
            for v, n in p.counts:
                out[v] = out.get(v, 0) + n
            for k, n in p.counters.items():
                counters[k] = counters.get(k, 0) + n
        out.counters = counters
        return out

    def read(self, result: dict[Any, int], key: Any = None, counters: bool = False, **_: Any) -> Any:
        """``{value: duplicates}``, or one value's count (0 when none was seen); with
        ``counters=True`` the runtime counters (or one, ``key``: its name)."""
        if counters:
            c = dict(getattr(result, "counters", None) or dict.fromkeys(COUNTERS, 0))
            return c if key is None else c.get(key, 0)
        if key is None:
            return dict(sorted(result.items(), key=lambda kv: (-kv[1], str(kv[0]))))
        return result.get(key, 0)


class Claim:
    """The ids one chunk claimed, and the future its waiting copies await.

    The future is made only when a copy waits (rare): a chunk nobody waits for costs a
    set, not a future (a one-event chunk is the daemon's single-event path).
    """

    __slots__ = ("all", "fut", "keys", "remote", "token")

    def __init__(self, keys: set[Any], all_: list[Any]) -> None:
        self.fut: asyncio.Future[bool] | None = None
        self.keys = keys  # the keys this chunk holds (stores, if it commits)
        self.all = all_  # every event's key, by position (None: no key)
        # shared store: key → (Redis key, TTL ms) claimed there, and this claim's token
        self.remote: dict[Any, tuple[bytes, int]] | None = None
        self.token = b""

    def waiter(self) -> asyncio.Future[bool]:
        """The future settle() resolves with the chunk's outcome."""
        if self.fut is None:
            self.fut = asyncio.get_running_loop().create_future()
        return self.fut


class DedupWindow:
    """The running form of :class:`Dedup` in one worker.

    ``ids`` holds committed ids (a C table or a dict, see dedup_ids). Each chunk in
    flight holds a claim on its new ids (a set, so claiming and releasing a chunk are
    C-level set and dict operations, not a loop over its events); a worker has at most its window of chunks in flight, so an
    id is checked against a handful of sets. ``__call__`` returns the drops, or a
    coroutine giving them when some id is claimed by another chunk in flight.
    """

    def __init__(self, spec: Dedup) -> None:
        # the committed ids and their expiries (see dedup_ids)
        self.ids = id_store(spec.max_entries, ordered=not spec.ttl_by_type, plain=not spec.key_by_type)
        # claims of the chunks in flight, by the identity of the event list the worker
        # passed (it passes the same list to settle())
        self.claims: dict[int, Claim] = {}
        self.field = spec.field
        self.dget = field_path(spec.field)
        self.ttl = spec.ttl
        self.cap = spec.max_entries
        self.tget = field_path(spec.type_field) if spec.type_field else None
        self.by_type = dict(spec.ttl_by_type or {})
        self.wait = spec.wait
        self.values = values_of(spec.field)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.key_by_type = {t: field_path(f) for t, f in (spec.key_by_type or {}).items()}
        self.keys_of = self._typed_keys if self.key_by_type else self.values
        # called with (events, drops) when a chunk had drops (count_by); the common case,
        # all new and distinct, returns before it
        self.on_drops: Callable[[list[Any], list[ErrorRecord]], None] | None = None

    def _typed_keys(self, events: list[Any]) -> list[Any]:
        """Each event's key: ``(type, value)`` for a type in ``key_by_type``, else ``field``;
        None where the value is absent or null."""
        tget, by, dget = self.tget, self.key_by_type, self.dget
        out: list[Any] = []
        add = out.append
        for e in events:
            t = tget(e)  # type: ignore[misc]
            g = by.get(t)
            if g is None:
                add(dget(e))
            else:
                v = g(e)
                add(None if v is None else (t, v))
        return out

    def ttl_of(self, e: Any) -> float:
        """The TTL of an event's key: its type's, else ``ttl``."""
        return self.by_type.get(self.tget(e), self.ttl) if self.tget is not None else self.ttl

    def _dup(self, i: int, k: Any) -> ErrorRecord:
        return ErrorRecord(i, f"$.{self.field}", f"duplicate {self.field} {k!r}", "duplicate")

    def _holder(self, k: Any) -> Claim | None:
        for c in self.claims.values():
            if k in c.keys:
                return c
        return None

    def __call__(self, events: list[Any]) -> Any:
        """Drops for ``events``; a coroutine when some id waits for another chunk."""
        now = time.monotonic()
        # expired groups first (per-type TTLs make the order approximate: a group
        # waits behind an older one that lives longer, and is still checked on read)
        self.ids.expire(now)
        keys = self.keys_of(events)
        remembered = self.ids.get
        mine = Claim(set(keys), keys)
        claims = self.claims
        if (
            len(mine.keys) == len(keys)
            and None not in mine.keys
            and self.ids.isdisjoint(keys)
            and (not claims or all(c.keys.isdisjoint(keys) for c in claims.values()))
        ):
            # the common case, all new and distinct: claimed in C calls
            self.claims[id(events)] = mine
            return []
        dropped: list[ErrorRecord] = []
        waits: list[tuple[int, Any]] = []
        claimed = mine.keys
        claimed.clear()
        for i, k in enumerate(keys):
            if k is None:  # no key: passed through, never remembered
                self.counters["missing_key"] += 1
                continue
            until = remembered(k)
            # stored already, or an earlier copy in this chunk (stored by the same commit)
            if (until is not None and until > now) or k in claimed:
                dropped.append(self._dup(i, k))
            elif self._holder(k) is not None:
                waits.append((i, k))
            else:
                claimed.add(k)
        self.claims[id(events)] = mine
        if not waits:
            if dropped and self.on_drops is not None:
                self.on_drops(events, dropped)
            return dropped
        return self._after_wait(events, mine, dropped, waits)

    async def _after_wait(
        self, events: list[Any], mine: Claim, dropped: list[ErrorRecord], waits: list[tuple[int, Any]]
    ) -> list[ErrorRecord]:
        deadline = time.monotonic() + self.wait
        while waits:
            holders = {h.waiter() for _, k in waits if (h := self._holder(k)) is not None and h is not mine}
            left = deadline - time.monotonic()
            if holders and left > 0:
                await asyncio.wait(holders, timeout=left)
            now = time.monotonic()
            still = []
            for i, k in waits:
                until = self.ids.get(k)
                holder = self._holder(k)
                if (until is not None and until > now) or holder is mine:
                    dropped.append(self._dup(i, k))  # the original is stored now
                elif holder is None:  # the original failed: this copy is stored instead
                    mine.keys.add(k)
                elif now >= deadline:
                    dropped.append(ErrorRecord(
                        i, f"$.{self.field}",
                        f"{self.field} {k!r} is still being stored by an earlier request; retry later",
                        "retry"))
                else:  # taken over by another waiting copy meanwhile: wait for that one
                    still.append((i, k))
            waits = still
        dropped.sort(key=attrgetter("pos"))
        if dropped and self.on_drops is not None:
            self.on_drops(events, dropped)
        return dropped

    def settle(self, events: list[Any], ok: bool, failed: Collection[Any] = ()) -> None:
        """The sinks committed ``events`` (``ok``) or failed them: remember or release.

        ``failed`` lists events of a committed chunk that a sink did not store (it
        dead-lettered them): their ids are released, not remembered, so a client's
        retry is stored rather than answered ``duplicate``.
        """
        claim = self.claims.pop(id(events), None)
        if claim is None:
            return
        keys = claim.keys
        if ok and failed:
            keys = keys - set(self.keys_of(list(failed)))
        if ok and keys:
            now = time.monotonic()
            ids = self.ids
            if not self.by_type:
                ids.remember(keys, now + self.ttl)
            else:
                by_type, ttl, tget = self.by_type, self.ttl, self.tget
                for e, k in zip(events, claim.all, strict=True):
                    if k in keys and (ids.get(k) or 0.0) <= now:  # the chunk's first copy
                        ids.remember((k,), now + by_type.get(tget(e), ttl))  # type: ignore[misc]
            ids.trim(self.cap)
        if claim.fut is not None:
            claim.fut.set_result(ok)


class DuplicatesPartial(msgspec.Struct, array_like=True):
    """One worker's duplicate counts: ``[value, count]`` pairs (any msgpack key), and
    its runtime counters (absent from partials of before they existed)."""

    stage: str
    counts: list[tuple[Any, int]]
    counters: dict[str, int] = {}


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(DuplicatesPartial)


class CountingDedupWindow(DedupWindow):
    """A :class:`DedupWindow` that publishes its counts: duplicates per ``count_by``
    value, and the runtime counters.

    The window calls ``_count`` only for a chunk with drops (``on_drops``): a chunk
    of new ids returns on the same path as in the plain window, and only the drops of
    kind ``duplicate`` are looked at.
    """

    def __init__(self, spec: Dedup) -> None:
        super().__init__(spec)
        self.name = spec.name
        self.value = field_path(spec.count_by or "")
        self.dups: dict[Any, int] = {}
        self._snap: bytes | None = None
        self._snap_counters: tuple[int, ...] = ()
        self.on_drops = self._count if spec.count_by is not None else None

    def _count(self, events: list[Any], drops: list[ErrorRecord]) -> None:
        dups, get = self.dups, self.value
        for r in drops:
            if r.kind != "duplicate":
                continue
            v = get(events[r.pos])
            if v is None:
                v = ""  # a JSON key and a Prometheus label, where None is neither
            elif type(v) not in (str, int, float):
                v = str(v)  # a bool, an enum, a nested value: a label JSON and msgpack carry
            dups[v] = dups.get(v, 0) + 1
            self._snap = None

    def snapshot(self) -> bytes:
        """The counts as msgpack; the same bytes object while nothing changed."""
        now = tuple(self.counters.values())
        if self._snap is None or now != self._snap_counters:
            self._snap_counters = now
            self._snap = _encoder.encode(DuplicatesPartial(self.name, list(self.dups.items()), dict(self.counters)))
        return self._snap
