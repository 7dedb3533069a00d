"""The ``Aggregate`` stage: keyed, windowed aggregates as mergeable per-worker partials.

::

    worker i: chunk ─► AggregateRuntime(events) ─► panes {pane: {group: state}}   (returns [] drops)
                                        snapshot() ─► bytes (msgpack Partial) ──┐
    supervisor:          merge([bytes of worker 0, bytes of worker 1, ...]) ◄───┘ ─► AggregateResult
                         read(result, key=None, start=, end=, now=) ─► plain values

An aggregate never drops an event. Events that fail ``where`` are not counted; a
missing group key or time, or a value of the wrong kind (``bad_value``), is counted
per aggregate and skipped; so is a late event. Group tables are capped at
``max_groups`` per pane: the oldest-created groups are evicted (``evicted_groups``);
``top_k`` instead prunes its smallest items and remembers the largest pruned count as
its error floor.

Exactness: count, sum, avg, min and max merge exactly. ``distinct`` is exact up to
``exact_distinct`` values per group, then a HyperLogLog estimate (about 1.6 %
standard error; needs the ``datasketches`` package). ``top_k`` counts are lower bounds:
the true count of an item is at most ``count + error_bound()``. Each worker ships only
its largest ``snapshot_top`` items per pane, so the bound adds each worker's next
count; when the pipeline shards by the item's field, items are disjoint across
workers and the merged top K (for K <= ``snapshot_top``) is exact whenever no worker
pruned.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import compress, islice
from operator import attrgetter, itemgetter
from typing import Any

import msgspec

from ..errors import ConfigError
from ..protocol import ErrorRecord
from . import aggregators as F
from .config import AggregateConfig
from .windows import Global, Window, WindowShape, times_of, window_from_config

__all__ = [
    "Aggregate",
    "AggregateResult",
    "AggregateRuntime",
    "Partial",
    "merge",
    "read",
]

log = logging.getLogger("collector.aggregates")
# what each aggregate counts (summed across workers by merge)
COUNTERS = ("events", "matched", "bad_value", "missing_key", "missing_time", "late", "evicted_groups", "expired_panes", "errors")


@dataclass(frozen=True)
class Aggregate:
    """One aggregate as a pipeline stage (built once per worker).

    ``fn`` is one of count, sum, avg, min, max, distinct, top_k, rate. ``by`` names
    the group field (or fields: the group is then a tuple; None: one global group);
    for ``top_k`` it names the item counted. ``value`` is the field summed, averaged,
    compared or counted distinct (``top_k``: sums it; without it, counts events).
    ``where`` keeps only some events: a ``(field, value)`` pair, a ``{field: value}``
    dict (all must hold), a picklable predicate or a ``"module:function"`` string.
    ``rate`` counts events per second: over the ``Sliding`` window's last ``size``
    seconds (a moving average) or since the first event (``Global``).

    ``prometheus``: shown in the daemon's Prometheus text, its values while it has at
    most ``max_series`` groups (``collector.stages.exposition``).
    """

    name: str
    fn: str = "count"
    by: str | tuple[str, ...] | None = None
    value: str | None = None
    window: Window = field(default_factory=Global)
    where: Any = None
    k: int = 10
    max_groups: int = 100_000
    exact_distinct: int = 10_000
    snapshot_top: int = 0  # top_k: items per pane in a snapshot (0: max(4k, 50))
    clock: Callable[[], float] = time.time  # processing time (patch it in tests)
    prometheus: bool = True
    max_series: int = 100

    def __post_init__(self) -> None:
        where = f"aggregate {self.name!r}"
        if self.fn not in F.FUNCTIONS:
            raise ConfigError(f"{where}: fn must be one of {', '.join(F.FUNCTIONS)} (got {self.fn!r})")
        if (self.fn in F.NUMERIC or self.fn == "distinct") and not self.value:
            raise ConfigError(f"{where}: fn {self.fn!r} needs a value field")
        if self.fn == "top_k" and not self.by:
            raise ConfigError(f"{where}: top_k needs by= (the field whose values are ranked)")
        if self.fn == "rate" and (self.by or self.value):
            raise ConfigError(f"{where}: rate counts all matching events; it takes no by= or value=")
        if self.k < 1 or self.max_groups < 2 or self.exact_distinct < 0 or self.max_series < 1:
            raise ConfigError(f"{where}: k must be >= 1, max_groups >= 2, exact_distinct >= 0, max_series >= 1")
        self.window.shape()  # checks sizes

    config_struct = AggregateConfig  # what a [[stages]] table decodes into (a class attribute, not a field)

    @classmethod
    def from_config(cls, cfg: AggregateConfig) -> Aggregate:
        """The aggregate a ``[[stages]]`` table declares (decoded into ``AggregateConfig``)."""
        fields = {f: getattr(cfg, f) for f in cfg.__struct_fields__}
        fields.update(by=tuple(cfg.by) if isinstance(cfg.by, list) else cfg.by, window=window_from_config(cfg.window))
        return cls(**fields)

    def merge(self, partials: Sequence[bytes]) -> AggregateResult:
        """The workers' partials merged (the engine calls this on read); none yet: empty."""
        return merge(partials or [self.build().snapshot()])

    def read(self, result: AggregateResult, key: Any = None, **window: Any) -> Any:
        """Plain values from a merged result (see :func:`read`)."""
        return read(result, key, **window)

    def build(self) -> AggregateRuntime:
        """The running aggregate of one worker."""
        return AggregateRuntime(self)


class PanePartial(msgspec.Struct, array_like=True):
    """One pane of a partial: ``(group, state)`` pairs and the top_k error floor."""

    pane: int
    groups: list[tuple[Any, Any]]
    floor: float = 0.0


class Partial(msgspec.Struct, forbid_unknown_fields=True):
    """A worker's partial of one aggregate, as ``snapshot()`` encodes it (msgpack)."""

    name: str
    fn: str
    kind: str
    width: float
    size: float
    hop: float
    k: int
    bound: int
    panes: list[PanePartial]
    watermark: float
    started: float
    counters: dict[str, int]
    grouped: bool
    version: int = 1


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Partial)


class AggregateRuntime:
    """One worker's state of an ``Aggregate``: call it with a chunk, ``snapshot()`` it."""

    def __init__(self, spec: Aggregate) -> None:
        self.spec = spec
        self.fn = spec.fn
        self.shape: WindowShape = spec.window.shape()
        self.clock = spec.clock
        by = spec.by
        self.multi = isinstance(by, tuple) and len(by) > 1
        self.keyget = attrgetter(*by) if isinstance(by, tuple) else (attrgetter(by) if by else None)
        self.valget = attrgetter(spec.value) if spec.value else None
        tf = spec.window.time_field
        self.timeget = attrgetter(tf) if tf else None
        self.where = F.compile_where(spec.where)
        self.panes: dict[int, dict[Any, Any]] = {}
        self.floors: dict[int, float] = {}
        self.watermark = -math.inf
        self.started = math.inf
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.last_error = ""
        self._last_pane: int | None = None
        self._snap: bytes | None = None

    def __call__(self, events: list[Any]) -> list[ErrorRecord]:
        """Fold a chunk in; never drops an event and never raises (errors are counted)."""
        self._snap = None
        try:
            self.process(events)
        except Exception as e:  # a bug must not take the worker and its chunk with it
            self.counters["errors"] += 1
            if str(e) != self.last_error:
                log.exception("aggregate %r failed on a chunk", self.spec.name)
            self.last_error = str(e)
        return []

    def process(self, events: list[Any]) -> None:
        """Fold a chunk's events into the panes."""
        c = self.counters
        c["events"] += len(events)
        if self.where is not None:
            events = self.where(events)
        if not events:
            return
        c["matched"] += len(events)
        keys = list(map(self.keyget, events)) if self.keyget else None
        vals = list(map(self.valget, events)) if self.valget else None
        ts = times_of(events, self.timeget) if self.timeget else None
        ok = self._valid(keys, vals, ts)
        if ok is not None:
            keys = list(compress(keys, ok)) if keys is not None else None
            vals = list(compress(vals, ok)) if vals is not None else None
            ts = list(compress(ts, ok)) if ts is not None else None
        if ts is None:
            now = self.clock()
            self._fold(self.shape.pane(now), keys, vals, len(events) if ok is None else sum(ok))
            self._advance(now, now)
            return
        if not ts:
            return
        pane = self.shape.pane
        if not self.shape.width:
            self._fold(0, keys, vals, len(ts))
        else:
            ps = [pane(t) for t in ts]  # type: ignore[arg-type]
            if min(ps) == max(ps):
                self._fold(ps[0], keys, vals, len(ps))
            else:
                by_pane: dict[int, list[int]] = {}
                for i, p in enumerate(ps):
                    by_pane.setdefault(p, []).append(i)
                for p, idx in by_pane.items():
                    ks = [keys[i] for i in idx] if keys is not None else None
                    vs = [vals[i] for i in idx] if vals is not None else None
                    self._fold(p, ks, vs, len(idx))
        self._advance(min(ts), max(ts))  # type: ignore[type-var, arg-type]

    def _valid(self, keys: list[Any] | None, vals: list[Any] | None, ts: list[Any] | None) -> list[bool] | None:
        """None when every event is usable, else a keep mask (the rest counted)."""
        bad_key = keys is not None and (
            any(None in k for k in keys) if self.multi else None in keys
        )
        bad_val = False
        if vals is not None:
            if self.fn in F.NUMERIC or self.fn == "top_k":
                try:
                    sum(vals)  # a C loop that rejects None and strings (bools count as 0/1)
                except TypeError:
                    bad_val = True
            else:
                bad_val = None in vals
        bad_time = ts is not None and None in ts
        if not (bad_key or bad_val or bad_time):
            return None
        n = len(keys if keys is not None else vals if vals is not None else ts)  # type: ignore[arg-type]
        ok = [True] * n
        c = self.counters
        if bad_key:
            assert keys is not None
            for i, k in enumerate(keys):
                if k is None or (self.multi and None in k):
                    ok[i] = False
                    c["missing_key"] += 1
        if bad_val:
            assert vals is not None
            numeric = self.fn != "distinct"
            for i, v in enumerate(vals):
                if ok[i] and (v is None or (numeric and not isinstance(v, int | float))):
                    ok[i] = False
                    c["bad_value"] += 1
        if bad_time:
            assert ts is not None
            for i, t in enumerate(ts):
                if ok[i] and t is None:
                    ok[i] = False
                    c["missing_time"] += 1
        return ok

    def _fold(self, p: int, keys: list[Any] | None, vals: list[Any] | None, n: int) -> None:
        if not n:
            return
        shape = self.shape
        if shape.width and self.watermark >= shape.closes(p) + self.spec.window.lateness:
            self.counters["late"] += n
            return
        g = self.panes.get(p)
        if g is None:
            g = self.panes[p] = F.new_groups(self.fn, self.valget is not None)
        F.update(self.fn, g, keys, vals, n, self.spec.exact_distinct)
        if len(g) > self.spec.max_groups:
            self._cap(p, g)

    def _cap(self, p: int, g: dict[Any, Any]) -> None:
        cap = self.spec.max_groups
        if self.fn == "top_k":
            keep = cap // 2
            ranked = sorted(g.items(), key=itemgetter(1), reverse=True)
            self.floors[p] = max(self.floors.get(p, 0.0), ranked[keep][1])
            self.counters["evicted_groups"] += len(ranked) - keep
            g.clear()
            dict.update(g, ranked[:keep])  # (a Counter's update would count the pairs)
            return
        # evict a tenth more than needed, so one walk from the dict's start serves many
        drop = list(islice(g, len(g) - cap + cap // 10))
        for k in drop:
            del g[k]
        self.counters["evicted_groups"] += len(drop)

    def _advance(self, lo: float, hi: float) -> None:
        if lo < self.started:
            self.started = lo
        if hi <= self.watermark:
            return
        self.watermark = hi
        shape = self.shape
        if shape.width and shape.pane(hi) != self._last_pane:  # once per pane: forget old panes
            self._last_pane = shape.pane(hi)
            w = self.spec.window
            # a sliding read never looks past its size, so closed panes are not retained
            keep_for = w.lateness + (0.0 if shape.kind == "sliding" else w.retention)
            for p in [p for p in self.panes if hi >= shape.closes(p) + keep_for]:
                del self.panes[p]
                self.floors.pop(p, None)
                self.counters["expired_panes"] += 1

    def expire(self, now: float) -> None:
        """Retire the panes that ``now`` closed (the worker's idle tick calls this).

        Only a processing-time window (no ``time_field``) advances here: there the
        clock is the stage's time, so panes close as it passes, traffic or not. An
        event-time window's watermark moves with its events only (a quiet stream
        says nothing about the times still to come).
        """
        if self.timeget is not None or not self.shape.width or not self.panes or now <= self.watermark:
            return
        before = len(self.panes)
        self._advance(now, now)
        if len(self.panes) != before:
            self._snap = None

    def restore(self, data: bytes) -> None:
        """Replace this runtime's state with a ``snapshot()`` of the same aggregate.

        A top_k snapshot holds only its ``snapshot_top`` largest items per pane; the
        rest is lost and its largest count becomes the restored error floor.
        """
        q = _decoder.decode(data)
        if (q.name, q.fn, q.width) != (self.spec.name, self.fn, self.shape.width):
            raise ValueError(f"a partial of {q.name!r} ({q.fn}) cannot restore {self.spec.name!r} ({self.fn})")
        has_value = self.valget is not None
        self.panes = {}
        for pp in q.panes:
            g = self.panes[pp.pane] = F.new_groups(self.fn, has_value)
            g.update(F.decode_groups(self.fn, pp.groups))
        self.floors = {pp.pane: pp.floor for pp in q.panes if pp.floor}
        self.watermark = q.watermark if q.watermark else -math.inf
        self.started = q.started if q.started else math.inf
        self.counters = {**dict.fromkeys(COUNTERS, 0), **q.counters}
        self._snap = None

    def snapshot(self) -> bytes:
        """This worker's partial as msgpack bytes (what ``merge`` takes)."""
        if self._snap is not None:  # nothing came in since the last one
            return self._snap
        fn, s = self.fn, self.shape
        top = self.spec.snapshot_top or max(4 * self.spec.k, 50)
        panes = []
        for p, g in self.panes.items():
            floor = self.floors.get(p, 0.0)
            if fn == "top_k" and len(g) > top:
                # the (top+1)-th largest over the bare values (no key function), then
                # the items at or above it
                cut = heapq.nlargest(top + 1, g.values())[-1]
                items: Any = [kv for kv in g.items() if kv[1] >= cut]
                if len(items) > top:
                    items = sorted(items, key=itemgetter(1), reverse=True)[:top]
                floor = max(floor, cut)
            elif fn == "distinct":
                items = [(k, F.encode_state(fn, v)) for k, v in g.items()]
            else:
                items = list(g.items())
            panes.append(PanePartial(p, items, floor))
        self._snap = _encoder.encode(
            Partial(
                self.spec.name, fn, s.kind, s.width, s.size, s.hop, self.spec.k, self.spec.exact_distinct,
                panes, self.watermark if self.watermark > -math.inf else 0.0,
                self.started if self.started < math.inf else 0.0, dict(self.counters),
                self.keyget is not None,
            )
        )
        return self._snap


@dataclass
class AggregateResult:
    """The merge of all workers' partials of one aggregate; read it with ``read``."""

    name: str
    fn: str
    shape: WindowShape
    k: int
    panes: dict[int, dict[Any, Any]]
    floors: dict[int, float]
    watermark: float
    started: float
    counters: dict[str, int]
    grouped: bool
    workers: int

    def error_bound(self) -> float:
        """top_k: how much a reported count may be below the true one (0: exact)."""
        return sum(self.floors.values())


def merge(partials: Sequence[bytes]) -> AggregateResult:
    """Merge the ``snapshot()`` bytes of one aggregate from each worker."""
    if not partials:
        raise ValueError("merge needs at least one partial")
    parts = [_decoder.decode(b) for b in partials]
    first = parts[0]
    for q in parts[1:]:
        if (q.name, q.fn, q.kind, q.width) != (first.name, first.fn, first.kind, first.width):
            raise ValueError(f"cannot merge partials of {first.name!r} ({first.fn}) and {q.name!r} ({q.fn})")
    fn, bound = first.fn, first.bound
    panes: dict[int, dict[Any, Any]] = {}
    floors: dict[int, float] = {}
    counters = dict.fromkeys(COUNTERS, 0)
    for q in parts:
        for name, v in q.counters.items():
            counters[name] = counters.get(name, 0) + v
        for pp in q.panes:
            if pp.floor:
                floors[pp.pane] = floors.get(pp.pane, 0.0) + pp.floor
            new = F.decode_groups(fn, pp.groups)
            g = panes.get(pp.pane)
            if g is None:
                panes[pp.pane] = new
            elif g.keys().isdisjoint(new):  # sharded by the group key: the usual case, in C
                g.update(new)
            else:
                for k, st in new.items():
                    old = g.get(k)
                    g[k] = st if old is None else F.combine(fn, old, st, bound)
    started = min((q.started for q in parts if q.started), default=0.0)
    shape = WindowShape(first.kind, first.width, first.size, first.hop)
    return AggregateResult(
        first.name, fn, shape, first.k, panes, floors, max(q.watermark for q in parts), started, counters,
        first.grouped, len(parts),
    )


def read(
    result: AggregateResult, key: Any = None, *, start: float | None = None, end: float | None = None,
    now: float | None = None,
) -> Any:
    """Plain values of a merged aggregate.

    Global and sliding windows give one value; tumbling and hopping give a list of
    ``{"start", "end", "value"}`` for the windows within ``[start, end]``. The value
    is: the global group's figure when ``by`` is None; ``{group: figure}``, or one
    group's figure when ``key`` is given; for top_k, ``[(item, count), ...]``
    (largest first, K of them) or one item's count; for rate, events per second.
    ``key=None`` means every group (groups never have a None key: those events are
    skipped as ``missing_key``). ``now`` defaults to the wall clock (sliding windows
    and rate read up to it).
    """
    if now is None:
        now = time.time()
    shape = result.shape
    wins = shape.windows(sorted(result.panes), start, end, now)
    values = [_value(result, key, ws, we, ps, now) for ws, we, ps in wins]
    if shape.kind in ("global", "sliding"):
        return values[0]
    return [{"start": ws, "end": we, "value": v} for (ws, we, _), v in zip(wins, values, strict=True)]


def _value(r: AggregateResult, key: Any, ws: float, we: float, ps: list[int], now: float) -> Any:
    fn = r.fn
    if r.grouped and key is not None:  # one group: no need to put the others together
        sts = [st for p in ps if (st := r.panes[p].get(key)) is not None]
        g = {key: functools.reduce(lambda a, b: F.combine(fn, a, b, 1 << 62), sts)} if sts else {}
    elif len(ps) == 1:
        g = r.panes[ps[0]]  # only read below
    else:
        g = {}
        for p in ps:
            for k, st in r.panes[p].items():
                old = g.get(k)
                g[k] = st if old is None else F.combine(fn, old, st, 1 << 62)
    if fn == "rate":
        n = g.get(None, 0)
        if r.shape.kind == "global" or r.shape.kind == "sliding":
            lo = -math.inf if r.shape.kind == "global" else math.ceil(ws / r.shape.width - 1e-9) * r.shape.width
            span = now - max(lo, r.started)
            return n / span if span > 0 else 0.0
        return n / r.shape.size
    if fn == "top_k":
        if key is not None:
            return g.get(key, 0)
        return heapq.nlargest(r.k, g.items(), key=itemgetter(1))  # ties: first merged first
    if not r.grouped or key is not None:
        st = g.get(None if not r.grouped else key)
        return (0 if fn in ("count", "sum") else None) if st is None else F.finalize(fn, st)
    if fn in ("avg", "distinct"):
        return {k: F.finalize(fn, st) for k, st in g.items()}
    return dict(g)  # count, sum, min, max: the state is the value
