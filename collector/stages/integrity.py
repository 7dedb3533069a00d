"""``Gaps``: sequence gaps, late arrivals and repeats from a client sequence number.

Seed 002 (non-functional requirement 6): monitor gaps and duplicates. A client numbers
the events of a session (``seq`` 1, 2, 3, ...); the stage follows each session::

    worker i: chunk ─► Gaps runtime(events) ─► []   (never drops an event)
              sinks committed the chunk ─► settle(events, ok=True) ─► per session:
                  seq == high + 1 ─────────── high = seq                   (the common case)
                  seq >  high + 1 ─────────── gaps, skipped += numbers skipped; remembered
                  seq a remembered number ─── late += 1, gaps -= 1          (the gap filled)
                  seq seen already ────────── repeated += 1                 (a client-side repeat)
                  seq below what is tracked ─ untracked += 1                (late or repeated: unknown)
              snapshot() ─► msgpack counters per ``by`` value, sessions tracked ──┐
    supervisor: Gaps.merge([worker 0's, worker 1's, ...]) ◄───────────────────────┘ ─► read(result, key)

Sessions are keyed state: they live in the worker that sees them. Give the pipeline
``key`` = the session field (``shard = "key"``, the default) so every event of a
session reaches one worker; otherwise each worker sees a part of each session and
counts the other workers' numbers as gaps. The workers' counters are summed on read.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter
from typing import Any

import msgspec

from ..errors import ConfigError
from ..protocol import ErrorRecord
from .base import Stage

__all__ = ["COUNTERS", "Gaps", "GapsPartial", "GapsRuntime", "field_path", "values_of"]

# per ``by`` value, summed across workers by Gaps.merge
COUNTERS = ("gaps", "skipped", "late", "repeated", "untracked")
_GAPS, _SKIP, _LATE, _REP, _UNTR = range(len(COUNTERS))


@dataclass(frozen=True)
class Gaps(Stage):
    """Count the gaps in each session's sequence numbers, their late fillers and repeats.

    ``session`` is the field (a dotted path works, into Structs and dicts:
    ``"data.session_id"``) naming the session; ``seq`` the field holding the client's
    sequence number (an int; events without one, or without a session, are skipped).
    ``by`` (e.g. ``"event"``, the type) splits the counts by that field's value: a
    repeat or a late number counts under the type of the event that arrived; a gap,
    whose events never arrived, under the type of the event that revealed it (the first
    one after the hole), and it leaves that count when its number arrives late.

    Counters: ``gaps`` numbers skipped and still missing (it falls when one arrives);
    ``skipped`` numbers ever skipped (a counter: ``gaps`` plus the ones filled since);
    ``late`` missing numbers that arrived later; ``repeated`` numbers seen again;
    ``untracked`` numbers below a session's tracked range (before its first number seen,
    or forgotten by the ``max_missing`` bound), which cannot be told late from repeated;
    ``sessions`` tracked now and ``evicted_sessions``. A session's first number starts
    its tracking: numbers before it are not gaps (the collector may have restarted).

    Only committed events count (the worker's ``settle`` after the sinks): a chunk that
    failed and is retried is not a repeat, and an event a sink dead-lettered has not
    arrived. At most ``max_sessions`` sessions are tracked per worker (the least
    recently seen is forgotten, its missing numbers staying counted as gaps) and
    ``max_missing`` missing numbers per session (the lowest are forgotten first, still
    counted as gaps). A worker's state lives in its memory: a worker that dies keeps the
    counters of its last snapshot, and its replacement starts its sessions afresh.
    """

    session: str = "session_id"
    seq: str = "seq"
    by: str | None = None
    max_sessions: int = 100_000
    max_missing: int = 1_000
    name: str = "gaps"

    def __post_init__(self) -> None:
        where = f"gaps stage {self.name!r}"
        for f in ("session", "seq"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                raise ConfigError(f"{where}: {f} must name a field")
        if self.by is not None and not self.by:
            raise ConfigError(f"{where}: by must name a field (or be left out)")
        if self.max_sessions < 1 or self.max_missing < 1:
            raise ConfigError(f"{where}: max_sessions and max_missing must be >= 1 "
                              f"(got {self.max_sessions}, {self.max_missing})")

    @property
    def integrity(self) -> str:
        """What the daemon's metrics show of this stage: sequence counters."""
        return "sequence"

    def build(self) -> GapsRuntime:
        """The sessions of one worker."""
        return GapsRuntime(self)

    def retired(self, partial: bytes) -> bytes:
        """A dead worker's last partial as it stays merged: its counters, no sessions
        tracked (they died with it)."""
        p = _decoder.decode(partial)
        p.sessions = 0
        return _encoder.encode(p)

    def merge(self, partials: Sequence[bytes]) -> dict[str, Any]:
        """The workers' counters summed: totals, ``sessions``, and ``by`` value → counters."""
        by: dict[Any, dict[str, int]] = {}
        sessions = evicted = 0
        for b in partials:
            p = _decoder.decode(b)
            sessions += p.sessions
            evicted += p.evicted
            for label, row in zip(p.labels, p.counts, strict=True):
                tgt = by.setdefault(label, dict.fromkeys(COUNTERS, 0))
                for c, v in zip(COUNTERS, row, strict=False):
                    tgt[c] += v
        out: dict[str, Any] = {c: sum(r[c] for r in by.values()) for c in COUNTERS}
        out["sessions"] = sessions
        out["evicted_sessions"] = evicted
        out["by"] = by
        return out

    def read(self, result: dict[str, Any], key: Any = None, **_: Any) -> Any:
        """The merged counters (with ``by``, per value too: ``"by": {value: counters}``,
        "" for events without one), or one value's counters (``key``; zeros if unseen)."""
        if key is None:
            out = {k: v for k, v in result.items() if k != "by"}
            if self.by is not None:
                out["by"] = {k: dict(v) for k, v in result["by"].items()}
            return out
        return dict(result["by"].get(key) or dict.fromkeys(COUNTERS, 0))


class GapsPartial(msgspec.Struct, array_like=True):
    """One worker's counters: ``counts[i]`` are ``labels[i]``'s, in :data:`COUNTERS` order."""

    stage: str
    labels: list[Any]
    counts: list[list[int]]
    sessions: int
    evicted: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(GapsPartial)


class _Session:
    """One session: the highest number seen, the missing ones below it (number → the
    label their gap was counted under, ascending), and ``floor``: numbers below it are
    no longer tracked."""

    __slots__ = ("floor", "high", "missing")

    def __init__(self, seq: int) -> None:
        self.high = seq
        self.floor = seq
        self.missing: dict[int, Any] = {}


class GapsRuntime:
    """The running form of :class:`Gaps` in one worker: call it with a chunk (no drops),
    ``settle`` it after the sinks, ``snapshot()`` its counters."""

    def __init__(self, spec: Gaps) -> None:
        self.name = spec.name
        self.session = field_path(spec.session)
        self.seq = field_path(spec.seq)
        self.by = field_path(spec.by) if spec.by else None
        # both fields top-level (the common case): one C call per event for the pair
        plain = "." not in spec.seq and "." not in spec.session
        self.both = attrgetter(spec.seq, spec.session) if plain else None
        self.max_sessions = spec.max_sessions
        self.max_missing = spec.max_missing
        self.sessions: dict[Any, _Session] = {}  # least recently seen first
        self.counts: dict[Any, list[int]] = {}  # by value → COUNTERS
        self.evicted = 0
        self._snap: bytes | None = None

    def __call__(self, events: list[Any]) -> list[ErrorRecord]:
        """No drops: events are counted once the sinks committed them (``settle``)."""
        return []

    def settle(self, events: list[Any], ok: bool, failed: Collection[Any] = ()) -> None:
        """The sinks committed ``events`` (``ok``): follow their sessions' numbers.

        ``failed`` (events a sink dead-lettered) did not arrive as far as the store knows.
        """
        if not ok or not events:
            return
        skip = {id(e) for e in failed} if failed else None
        sget, qget, bget, both = self.session, self.seq, self.by, self.both
        sessions = self.sessions
        changed = False
        for e in events:
            if skip is not None and id(e) in skip:
                continue
            if both is not None:
                try:
                    q, s = both(e)
                except AttributeError:  # a union member without one of them, a dict
                    q, s = qget(e), sget(e)
            else:
                q, s = qget(e), sget(e)
            if type(q) is not int or s is None:  # absent, None, or not a number
                continue
            try:
                st = sessions.pop(s, None)
                if st is None:
                    sessions[s] = _Session(q)
            except TypeError:  # an unhashable session value (a JSON object): skipped
                continue
            changed = True
            if st is None:
                if len(sessions) > self.max_sessions:
                    del sessions[next(iter(sessions))]  # its missing numbers stay counted
                    self.evicted += 1
                continue
            sessions[s] = st  # now the most recently seen
            high = st.high
            if q == high + 1:
                st.high = q
                continue
            label = _label(bget, e)
            row = self.counts.get(label)
            if row is None:
                row = self.counts[label] = [0] * len(COUNTERS)
            if q > high:
                self._skip(st, high, q, label, row)
            elif q == high:
                row[_REP] += 1
            elif q in st.missing:
                was = st.missing.pop(q)
                self.counts[was][_GAPS] -= 1
                row[_LATE] += 1
            elif q < st.floor:
                row[_UNTR] += 1
            else:
                row[_REP] += 1
        if changed:
            self._snap = None

    def _skip(self, st: _Session, high: int, q: int, label: Any, row: list[int]) -> None:
        """``q`` jumped over ``high + 1 .. q - 1``: count them, remember the newest ones."""
        row[_GAPS] += q - high - 1
        row[_SKIP] += q - high - 1
        st.high = q
        cap = self.max_missing
        first = max(high + 1, q - cap)
        if first > high + 1:  # a jump longer than the bound: the older numbers are forgotten
            st.missing.clear()
            st.floor = first
        missing = st.missing
        missing.update(dict.fromkeys(range(first, q), label))
        over = len(missing) - cap
        if over > 0:  # ascending: the lowest go first, found in one pass over the dict
            gone = list(islice(missing, over))
            for n in gone:
                del missing[n]
            st.floor = gone[-1] + 1

    def snapshot(self) -> bytes:
        """The counters as msgpack; the same bytes object while nothing changed."""
        if self._snap is None:
            labels = list(self.counts)
            self._snap = _encoder.encode(GapsPartial(
                self.name, labels, [self.counts[k] for k in labels], len(self.sessions), self.evicted))
        return self._snap


def field_path(path: str) -> Callable[[Any], Any]:
    """A getter for ``path`` (dotted: attributes of Structs and properties, keys of
    dicts such as a free-form ``data``) giving None where a part is absent or None."""
    parts = path.split(".")
    if len(parts) == 1:
        get1 = attrgetter(path)

        def one(e: Any) -> Any:
            try:
                return get1(e)
            except AttributeError:  # a member of a union without the field
                return e.get(path) if type(e) is dict else None

        return one

    def dotted(e: Any) -> Any:
        for p in parts:
            e = e.get(p) if type(e) is dict else getattr(e, p, None)
            if e is None:
                return None
        return e

    return dotted


def values_of(path: str) -> Callable[[list[Any]], list[Any]]:
    """``path`` of every event of a chunk, as :func:`field_path` reads it: one C-level map
    when the field is top-level and every event has it (the common case), else the
    per-event getter (a union member without the field, a dict, a dotted path)."""
    get = field_path(path)
    if "." in path:
        return lambda events: list(map(get, events))
    plain = attrgetter(path)

    def values(events: list[Any]) -> list[Any]:
        try:
            return list(map(plain, events))
        except AttributeError:
            return list(map(get, events))

    return values


def _label(get: Any, e: Any) -> Any:
    """The ``by`` value of ``e`` as a partial and a JSON key carry it ("" without ``by``
    or when the event has no such value)."""
    if get is None:
        return ""
    v = get(e)
    return "" if v is None else v if type(v) in (str, int, float) else str(v)
