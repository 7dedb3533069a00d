"""The ``Pair`` stage: match start and end events by key into one record with a duration.

Seed 002's page views: ``page_view_start`` and ``page_view_end`` carry one
``page_view_id``; together (in either order) they make one ``page_view`` with
``duration_seconds`` and ``paired: true``::

    start ──► pending starts {key: (arrival, time, carried fields)} ──┐  TTL (12 h) ─► unpaired (duration null)
                                   end with the same key ─────────────┼─► paired record
    end   ──► pending ends (no start yet) ────────────────────────────┘  orphan TTL ─► orphan_end record
    paired keys are remembered for ``replay_ttl``: a replayed start or end does not pair twice

With ``store="memory"`` (default) state is per worker: shard the pipeline by a field
of ``key`` (seed 002: ``user_id``) so both halves reach the same worker. With
``store="redis"`` the halves that do not pair within their chunk wait in Redis
(:mod:`.pairing_redis`), so pairing works across workers, daemons and restarts. TTLs
run on processing time (arrival, the stage's clock, like a Redis TTL); durations come
from the events' own ``time_field``.

Records collect in an outbox; ``drain()`` empties it, converted by ``emit`` (None:
``PairRecord`` as is). A runtime with ``drain()`` is an *emitter*: the worker commits
what it drains to the sinks with the chunk's events, and every ``tick`` seconds (no
traffic needed) it calls ``expire(now)`` and commits what that emitted on its own.
``snapshot()``/``restore()`` turn everything pending into msgpack bytes and back, so
it can be persisted across restarts.
"""

from __future__ import annotations

import collections
import logging
import math
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import msgspec

from .. import registry
from ..errors import ConfigError
from ..protocol import ErrorRecord
from ..registry import import_string
from .config import PairConfig
from .windows import parse_time

__all__ = ["Pair", "PairRecord", "PairRuntime"]

log = logging.getLogger("collector.pairing")
COUNTERS = (
    "paired", "expired", "orphan", "evicted", "duplicate_start", "duplicate_end", "replayed",
    "missing_key", "output_dropped", "emitted", "emit_errors",
)
# store → "module:attr" of its runtime, imported when named (as collector.stages.STAGES)
STORES = {
    "memory": "collector.stages.pairing:PairRuntime",
    "redis": "collector.stages.pairing_redis:RedisPairRuntime",
    "sqlite": "collector.stages.pairing_sqlite:SqlitePairRuntime",
}


class PairRecord(msgspec.Struct, omit_defaults=True, gc=False):
    """One combined record: paired, or an expired start / orphan end (duration ``None``)."""

    type: str
    key: tuple[Any, ...]
    paired: bool
    duration_seconds: float | None
    start_time: float | None = None
    end_time: float | None = None
    reason: str = "paired"  # paired | expired | evicted | orphan_end
    fields: dict[str, Any] = {}


@dataclass(frozen=True)
class Pair:
    """Pair ``start_type`` and ``end_type`` events (by ``type_field``) on ``key``.

    ``key`` fields may be dotted paths (``data.page_view_id``). ``carry`` names fields
    copied into the record (from the start, else the end). A start waits ``ttl``
    seconds for its end, an end ``orphan_ttl`` for its start; at most ``max_pending``
    of each wait (the oldest are then emitted unpaired, reason ``evicted``).
    ``drop_inputs`` drops the start and end events from the chunk (kind ``paired``) so
    only the records go on.

    ``emit`` converts each record before it leaves ``drain()`` (and so reaches the
    sinks): None sends ``PairRecord`` itself, else a picklable callable or a
    ``"module:attr"`` string naming one, ``PairRecord -> event`` (of the pipeline's
    event type, say a ``page_view``). ``tick`` is how often (seconds) the worker
    expires without traffic. ``store="redis"`` keeps the halves waiting across chunks
    in Redis at ``redis_url`` under ``prefix`` (``pip install 'collector[redis]'``);
    a waiting half's key lives ``redis_grace`` seconds past its deadline, so a
    collector that was down that long finds it still; an expiry sweep takes at most
    ``sweep_limit`` deadlines per round trip.
    """

    start_type: str = "page_view_start"
    end_type: str = "page_view_end"
    type_field: str = "event"
    key: tuple[str, ...] = ("user_id", "page_view_id")
    time_field: str | None = "timestamp"
    carry: tuple[str, ...] = ()
    ttl: float = 12 * 3600.0
    orphan_ttl: float = 600.0
    replay_ttl: float = 3600.0
    max_pending: int = 1_000_000
    max_output: int = 100_000
    output_type: str = "page_view"
    drop_inputs: bool = False
    clock: Callable[[], float] = time.time
    name: str = "pair"
    emit: Any = None
    tick: float = 1.0
    store: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "pv:"
    redis_grace: float = 86400.0
    sweep_limit: int = 1000
    state_path: str = ""

    def __post_init__(self) -> None:
        where = f"pair {self.name!r}"
        if not self.key or self.ttl <= 0 or self.orphan_ttl <= 0 or self.max_pending < 1:
            raise ConfigError(f"{where}: needs a key, ttl > 0, orphan_ttl > 0, max_pending >= 1")
        if self.store not in STORES and ":" not in self.store:
            raise ConfigError(f"{where}: store must be one of {', '.join(STORES)} or 'module:attr' (got {self.store!r})")
        if self.store == "sqlite" and not self.state_path:
            raise ConfigError(f"{where}: store 'sqlite' needs state_path (the SQLite file of the waiting halves)")
        if self.tick <= 0 or self.redis_grace < 0 or self.sweep_limit < 1:
            raise ConfigError(f"{where}: needs tick > 0, redis_grace >= 0, sweep_limit >= 1")
        if self.emit is not None and not isinstance(self.emit, str):
            if not callable(self.emit):
                raise ConfigError(f"{where}: emit must be a callable or a 'module:attr' string")
            try:  # the pipeline is pickled to the workers: say so here, not at spawn
                pickle.dumps(self.emit)
            except Exception as e:
                raise ConfigError(
                    f"{where}: emit {self.emit!r} cannot be pickled ({e}); use a module-level "
                    "function or a 'module:attr' string"
                ) from None

    config_struct = PairConfig  # what a [[stages]] table decodes into (a class attribute, not a field)

    @classmethod
    def from_config(cls, cfg: PairConfig) -> Pair:
        """The pairing a ``[[stages]]`` table declares (decoded into ``PairConfig``)."""
        fields = {f: getattr(cfg, f) for f in cfg.__struct_fields__}
        fields.update(key=tuple(cfg.key), carry=tuple(cfg.carry))
        if cfg.store == "sqlite" and not cfg.state_path:
            # relative: the daemon puts it in its data directory (packs.build_pipeline)
            fields["state_path"] = f"pairs-{cfg.name}.sqlite3"
        return cls(**fields)

    # the engine lists the stage among the aggregates (its counters) and in /metrics ``pairs``
    pairing = True

    def merge(self, partials: Sequence[bytes]) -> dict[str, int]:
        """The workers' ``partial()`` counters summed (the engine calls this on read); none
        published yet: every counter 0."""
        out = dict.fromkeys(COUNTERS, 0)
        for data in partials:
            for k, v in _counts.decode(data).items():
                out[k] = out.get(k, 0) + v
        return out

    def retired(self, partial: bytes) -> bytes:
        """A dead worker's last partial as it stays merged: its counters, and no halves
        pending (a memory store's halves died with it; its redelivered chunks bring them
        to its replacement; the shared stores publish no pending gauges)."""
        st = _counts.decode(partial)
        for gauge in ("pending", "pending_ends"):
            if gauge in st:
                st[gauge] = 0
        return _enc.encode(st)

    def read(self, result: dict[str, int], key: Any = None, **_: Any) -> Any:
        """The counters (``paired``, ``expired``, ``orphan``, ``pending``, ...), or one of them."""
        return dict(result) if key is None else result.get(key, 0)

    def build(self) -> PairRuntime:
        """The running pairing of one worker (``store="redis"``: its Redis-backed form)."""
        if self.store == "memory":
            return PairRuntime(self)
        cls = registry.load(STORES, self.store, "pair store")
        return cls(self)

    def converter(self) -> Callable[[PairRecord], Any] | None:
        """``emit`` resolved (an import string imported now), or None."""
        if isinstance(self.emit, str):
            fn = import_string(self.emit, f"pair {self.name!r} emit")
            if not callable(fn):
                raise ConfigError(f"pair {self.name!r}: emit {self.emit!r} is not callable")
            return fn
        return self.emit


class _State(msgspec.Struct, array_like=True):
    starts: list[tuple[Any, float, float | None, list[Any]]]
    ends: list[tuple[Any, float, float | None, list[Any]]]
    done: list[tuple[Any, float]]
    counters: dict[str, int]
    out: list[PairRecord]
    version: int = 1


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_State)
_counts = msgspec.msgpack.Decoder(dict[str, int])
Pending = tuple[float, float | None, tuple[Any, ...]]  # arrival, event time, carried values


class PairRuntime:
    """One worker's pending starts and ends; call it with a chunk.

    ``shared_store`` (the Redis and SQLite forms): the halves that do not pair within a
    chunk wait in a store the workers share, so the counters add ``stored`` (halves this
    worker left there) and publish no ``pending`` gauges, and expiry is a periodic sweep.
    """

    shared_store = False

    def __init__(self, spec: Pair) -> None:
        self.spec = spec
        self.clock = spec.clock
        k = spec.key
        self._key = attrgetter(*k) if len(k) > 1 else (lambda e, g=attrgetter(k[0]): (g(e),))
        self._type = attrgetter(spec.type_field)
        self._time = attrgetter(spec.time_field) if spec.time_field else None
        self._carry = attrgetter(*spec.carry) if spec.carry else None
        self._convert = spec.converter()
        self._emit_error = ""
        self._published: tuple[dict[str, int], bytes] | None = None
        self._reset()

    def _reset(self) -> None:
        self.starts: dict[Any, Pending] = {}
        self.ends: dict[Any, Pending] = {}
        self.done: dict[Any, float] = {}  # paired key → when it may be forgotten
        # keys in arrival order, one group per chunk: expiry pops from the left in O(1)
        self.order_s: collections.deque[tuple[float, list[Any]]] = collections.deque()
        self.order_e: collections.deque[tuple[float, list[Any]]] = collections.deque()
        self.order_d: collections.deque[tuple[float, list[Any]]] = collections.deque()
        self.out: list[PairRecord] = []
        self.counters = dict.fromkeys(COUNTERS, 0)
        if self.shared_store:
            self.counters["stored"] = 0
            self.last_sweep = -math.inf

    def stats(self) -> dict[str, int]:
        """The counters, with ``pending`` (starts waiting) and ``pending_ends`` (a shared
        store's halves are the store's, not counted here)."""
        if self.shared_store:
            return dict(self.counters)
        return {**self.counters, "pending": len(self.starts), "pending_ends": len(self.ends)}

    def partial(self) -> bytes:
        """``stats()`` as msgpack bytes for the supervisor to merge: the same bytes
        object while the counters are unchanged, so an idle worker publishes nothing."""
        st = self.stats()
        last = self._published
        if last is not None and last[0] == st:
            return last[1]
        data = _enc.encode(st)
        self._published = (st, data)
        return data

    def drain(self) -> list[Any]:
        """The records made since the last drain, converted by ``emit`` when set.

        A record whose conversion raises is counted (``emit_errors``), logged once
        per distinct error, and left out.
        """
        out, self.out = self.out, []
        if not out:
            return out
        conv = self._convert
        if conv is not None:
            try:
                out = list(map(conv, out))
            except Exception:
                out = self._convert_each(conv, out)
        self.counters["emitted"] += len(out)
        return out

    def _convert_each(self, conv: Callable[[PairRecord], Any], recs: list[PairRecord]) -> list[Any]:
        done = []
        for r in recs:
            try:
                done.append(conv(r))
            except Exception as e:
                self.counters["emit_errors"] += 1
                if str(e) != self._emit_error:
                    log.exception("pair %r: emit failed on %r", self.spec.name, r)
                self._emit_error = str(e)
        return done

    def __call__(self, events: list[Any]) -> list[ErrorRecord]:
        """Pair a chunk's start and end events; other events pass untouched."""
        now = self.clock()
        self.expire(now)
        sp = self.spec
        new_s: list[Any] = []
        new_e: list[Any] = []
        matches, used = self._scan(events, self.starts, self.ends, now, new_s, new_e)
        if new_s:
            self.order_s.append((now, new_s))
        if new_e:
            self.order_e.append((now, new_e))
        if matches:
            self._emit(matches)
            paired = [m[0] for m in matches]
            until = now + sp.replay_ttl
            self.done.update(dict.fromkeys(paired, until))
            self.order_d.append((until, paired))
        self._cap()
        if used:
            return [ErrorRecord(i, "$", f"consumed by {sp.name}", "paired") for i in used]
        return []

    def _scan(
        self,
        events: list[Any],
        starts: dict[Any, Pending],
        ends: dict[Any, Pending],
        now: float,
        new_s: list[Any] | None,
        new_e: list[Any] | None,
    ) -> tuple[list[tuple[Any, Pending, Pending]], list[int]]:
        """One pass over a chunk: each start or end pairs with its other half waiting in
        ``starts``/``ends`` (popped), or waits there itself (its key appended to
        ``new_s``/``new_e`` when given). The matches (key, start, end) and the positions
        of the halves (for ``drop_inputs``). Shared by the memory and Redis stores."""
        sp = self.spec
        st, en, done = sp.start_type, sp.end_type, self.done
        tget, kget, timeget, cget = self._type, self._key, self._time, self._carry
        matches: list[tuple[Any, Pending, Pending]] = []
        used: list[int] = []
        c = self.counters
        one_carry = len(sp.carry) == 1
        drop = sp.drop_inputs
        for i, e in enumerate(events):
            t = tget(e)
            if t != st and t != en:
                continue
            if drop:
                used.append(i)
            try:
                key = kget(e)
                if None in key:
                    raise TypeError
                other = ends.pop(key, None) if t == st else starts.pop(key, None)  # TypeError: unhashable
            except (AttributeError, TypeError):
                c["missing_key"] += 1
                continue
            ts: float | None
            if timeget is None:
                ts = now
            else:
                ts = timeget(e)
                if type(ts) is not float:
                    ts = parse_time(ts)
            mine = (now, ts, ((cget(e),) if one_carry else cget(e)) if cget is not None else ())
            # the replay guard is only asked before a key would wait: a paired key is
            # never pending, so the matching path (half of all events) skips it
            if other is not None:
                matches.append((key, mine, other) if t == st else (key, other, mine))
            elif key in done:
                c["replayed"] += 1
            else:
                table, new, dup = (starts, new_s, "duplicate_start") if t == st else (ends, new_e, "duplicate_end")
                if table.setdefault(key, mine) is not mine:
                    c[dup] += 1  # the first one waits on
                elif new is not None:
                    new.append(key)
        return matches, used

    def _emit(self, matches: list[tuple[Any, Pending, Pending]]) -> None:
        self.counters["paired"] += len(matches)
        otype, names, fields = self.spec.output_type, self.spec.carry, self._fields
        one = names[0] if len(names) == 1 else None  # a dict display: 10x cheaper than dict(zip())
        out = self.out
        for key, start, end in matches:
            t0, t1, cv = start[1], end[1], start[2]
            if one is not None and cv[0] is not None:
                fs = {one: cv[0]}
            else:
                fs = fields(start, end) if names else {}
            out.append(
                PairRecord(
                    otype, key, True, t1 - t0 if t0 is not None and t1 is not None else None, t0, t1, "paired", fs
                )
            )
        self._out_cap()

    def _fields(self, start: Pending | None, end: Pending | None) -> dict[str, Any]:
        names = self.spec.carry
        if not names:
            return {}
        if start is not None and None not in start[2]:
            return dict(zip(names, start[2], strict=True))
        vals = [
            a if a is not None else b
            for a, b in zip(
                start[2] if start else (None,) * len(names), end[2] if end else (None,) * len(names), strict=True
            )
        ]
        return dict(zip(names, vals, strict=True))

    def _out_cap(self) -> None:
        out = self.out
        if len(out) > self.spec.max_output:
            n = len(out) - self.spec.max_output
            del out[:n]
            self.counters["output_dropped"] += n

    def _unpaired(self, key: Any, p: Pending, start: bool, reason: str) -> None:
        rec = PairRecord(
            self.spec.output_type, key, False, None, p[1] if start else None, None if start else p[1],
            reason, self._fields(p, None) if start else self._fields(None, p),
        )
        self.out.append(rec)
        self._out_cap()

    def expire(self, now: float) -> None:
        """Emit starts older than ``ttl`` and ends older than ``orphan_ttl``; forget old paired keys."""
        sp = self.spec
        for order, table, ttl, start in (
            (self.order_s, self.starts, sp.ttl, True),
            (self.order_e, self.ends, sp.orphan_ttl, False),
        ):
            while order and order[0][0] + ttl <= now:
                at, keys = order.popleft()
                self._evict(table, at, keys, start, "expired" if start else "orphan_end")
        od = self.order_d
        while od and od[0][0] <= now:
            self._forget(*od.popleft())

    def _forget(self, until: float, keys: list[Any]) -> None:
        done = self.done
        for k in keys:
            if done.get(k) == until:  # not paired again since
                del done[k]

    def _evict(self, table: dict[Any, Pending], at: float, keys: list[Any], start: bool, reason: str) -> None:
        c = self.counters
        for k in keys:
            p = table.get(k)
            if p is not None and p[0] == at:  # still the same pending entry
                del table[k]
                c["expired" if reason == "expired" else "orphan" if reason == "orphan_end" else "evicted"] += 1
                self._unpaired(k, p, start, reason)

    def _cap(self) -> None:
        cap = self.spec.max_pending
        for order, table, start in ((self.order_s, self.starts, True), (self.order_e, self.ends, False)):
            while len(table) > cap and order:
                at, keys = order[0]
                n = len(table) - cap
                head, rest = keys[:n], keys[n:]
                if rest:
                    order[0] = (at, rest)
                else:
                    order.popleft()
                self._evict(table, at, head, start, "evicted")
        while len(self.done) > cap and self.order_d:
            self._forget(*self.order_d.popleft())

    def snapshot(self) -> bytes:
        """Everything pending (and the undrained records) as msgpack bytes."""
        return _enc.encode(
            _State(
                [(k, a, t, list(cv)) for k, (a, t, cv) in self.starts.items()],
                [(k, a, t, list(cv)) for k, (a, t, cv) in self.ends.items()],
                list(self.done.items()),
                dict(self.counters),
                list(self.out),
            )
        )

    def restore(self, data: bytes) -> None:
        """Replace this runtime's state with a ``snapshot()``."""
        s = _dec.decode(data)
        self._reset()
        for rows, table, order in ((s.starts, self.starts, self.order_s), (s.ends, self.ends, self.order_e)):
            groups: dict[float, list[Any]] = {}
            for k, a, t, cv in sorted(rows, key=lambda r: r[1]):
                key = tuple(k)
                table[key] = (a, t, tuple(cv))
                groups.setdefault(a, []).append(key)
            order.extend(groups.items())
        dgroups: dict[float, list[Any]] = {}
        for k, until in sorted(s.done, key=lambda r: r[1]):
            self.done[tuple(k)] = until
            dgroups.setdefault(until, []).append(tuple(k))
        self.order_d.extend(dgroups.items())
        self.counters.update(s.counters)
        self.out = list(s.out)
