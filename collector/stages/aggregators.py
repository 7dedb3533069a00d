"""Aggregate functions: per-group state, a chunk's update, the merge of two states, the value.

Each function keeps one state per group (per pane of a window), mergeable across
workers::

    count, rate     int                    a + b
    sum             int | float            a + b
    avg             [sum, count]           pairwise +
    min, max        number                 min / max
    distinct        set, then Hll          union (exact up to a bound, then HyperLogLog)
    top_k           count or sum per item  a + b, with an error floor (see aggregates)

Updates take a whole chunk's keys and values as lists and run one tight loop (or a C
call: ``Counter.update``, ``sum``, ``set.update``); values were checked before, so an
update never fails half way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from itertools import compress
from operator import attrgetter
from typing import Any

from ..errors import missing

__all__ = [
    "FUNCTIONS",
    "HLL_LG_K",
    "HLL_RELATIVE_ERROR",
    "NUMERIC",
    "Hll",
    "combine",
    "compile_where",
    "decode_groups",
    "decode_state",
    "encode_state",
    "finalize",
    "new_groups",
    "update",
]

FUNCTIONS = ("count", "sum", "avg", "min", "max", "distinct", "top_k", "rate")
NUMERIC = frozenset({"sum", "avg", "min", "max"})  # the value must be a number
HLL_LG_K = 12
HLL_RELATIVE_ERROR = 1.04 / 2 ** (HLL_LG_K / 2)  # one standard error, about 1.6 %


def _datasketches() -> Any:
    try:
        import datasketches
    except ImportError as e:
        raise missing("datasketches", "sketches", "a distinct count above its exact bound") from e
    return datasketches


class Hll:
    """A HyperLogLog sketch (Apache DataSketches, lg_k 12: about 1.6 % standard error)."""

    __slots__ = ("sk",)

    def __init__(self, sk: Any = None) -> None:
        self.sk = sk if sk is not None else _datasketches().hll_sketch(HLL_LG_K)

    @classmethod
    def of(cls, values: Any) -> Hll:
        """A sketch holding ``values``."""
        h = cls()
        h.update(values)
        return h

    def add(self, v: Any) -> None:
        """Count ``v`` (str, int and float as themselves, anything else by its repr)."""
        self.sk.update(v if isinstance(v, str | int | float) else repr(v))

    def update(self, values: Any) -> None:
        """Count each of ``values``."""
        add = self.add
        for v in values:
            add(v)

    def union(self, other: Hll | set[Any]) -> Hll:
        """A new sketch counting both."""
        if isinstance(other, set):
            other = Hll.of(other)
        u = _datasketches().hll_union(HLL_LG_K)
        u.update(self.sk)
        u.update(other.sk)
        return Hll(u.get_result())

    def estimate(self) -> float:
        """The distinct-count estimate."""
        return float(self.sk.get_estimate())

    def to_bytes(self) -> bytes:
        """The compact serialised sketch."""
        return bytes(self.sk.serialize_compact())

    @classmethod
    def from_bytes(cls, b: bytes) -> Hll:
        """The sketch ``to_bytes`` wrote."""
        return cls(_datasketches().hll_sketch.deserialize(b))


def new_groups(fn: str, has_value: bool) -> dict[Any, Any]:
    """An empty group table (a Counter where the update is ``Counter.update``)."""
    return Counter() if fn in ("count", "rate") or (fn == "top_k" and not has_value) else {}


def update(fn: str, g: dict[Any, Any], keys: list[Any] | None, vals: list[Any] | None, n: int, bound: int) -> None:
    """Fold one chunk's ``keys`` (None: one global group) and ``vals`` into ``g``."""
    if fn in ("count", "rate") or (fn == "top_k" and vals is None):
        if keys is None:
            g[None] += n
        else:
            g.update(keys)  # Counter.update: a C loop
        return
    assert vals is not None
    if keys is None:
        _UPDATE_ONE[fn](g, vals, bound)
        return
    get = g.get
    if fn in ("sum", "top_k"):
        for k, v in zip(keys, vals, strict=True):
            g[k] = get(k, 0) + v
    elif fn == "avg":
        for k, v in zip(keys, vals, strict=True):
            s = get(k)
            if s is None:
                g[k] = [v, 1]
            else:
                s[0] += v
                s[1] += 1
    elif fn == "min":
        for k, v in zip(keys, vals, strict=True):
            s = get(k)
            if s is None or v < s:
                g[k] = v
    elif fn == "max":
        for k, v in zip(keys, vals, strict=True):
            s = get(k)
            if s is None or v > s:
                g[k] = v
    elif fn == "distinct":
        for k, v in zip(keys, vals, strict=True):
            s = get(k)
            if s is None:
                s = g[k] = set()
            s.add(v)
        for k in set(keys):
            s = g[k]
            if type(s) is set and len(s) > bound:
                g[k] = Hll.of(s)
    else:  # pragma: no cover - Aggregate checks fn
        raise ValueError(fn)


def _sum1(g: dict[Any, Any], vals: list[Any], bound: int) -> None:
    g[None] = g.get(None, 0) + sum(vals)


def _avg1(g: dict[Any, Any], vals: list[Any], bound: int) -> None:
    s = g.setdefault(None, [0, 0])
    s[0] += sum(vals)
    s[1] += len(vals)


def _min1(g: dict[Any, Any], vals: list[Any], bound: int) -> None:
    if vals:
        m = min(vals)
        g[None] = m if None not in g else min(g[None], m)


def _max1(g: dict[Any, Any], vals: list[Any], bound: int) -> None:
    if vals:
        m = max(vals)
        g[None] = m if None not in g else max(g[None], m)


def _distinct1(g: dict[Any, Any], vals: list[Any], bound: int) -> None:
    s = g.get(None)
    if s is None:
        s = g[None] = set()
    s.update(vals)
    if type(s) is set and len(s) > bound:
        g[None] = Hll.of(s)


_UPDATE_ONE: dict[str, Callable[[dict[Any, Any], list[Any], int], None]] = {
    "sum": _sum1,
    "top_k": _sum1,
    "avg": _avg1,
    "min": _min1,
    "max": _max1,
    "distinct": _distinct1,
}


def combine(fn: str, a: Any, b: Any, bound: int) -> Any:
    """The state of ``a`` and ``b`` together (``a`` may be reused)."""
    if fn == "avg":
        return [a[0] + b[0], a[1] + b[1]]
    if fn == "min":
        return min(a, b)
    if fn == "max":
        return max(a, b)
    if fn == "distinct":
        if isinstance(a, Hll):
            return a.union(b)
        if isinstance(b, Hll):
            return b.union(a)
        u = a | b
        return Hll.of(u) if len(u) > bound else u
    return a + b


def finalize(fn: str, state: Any) -> Any:
    """The plain value of one state."""
    if fn == "avg":
        return state[0] / state[1] if state[1] else None
    if fn == "distinct":
        return round(state.estimate()) if isinstance(state, Hll) else len(state)
    return state


def encode_state(fn: str, state: Any) -> Any:
    """A msgspec-encodable form of ``state`` (a sketch as its bytes)."""
    if fn == "distinct":
        return state.to_bytes() if isinstance(state, Hll) else list(state)
    return state


def decode_state(fn: str, raw: Any) -> Any:
    """The state ``encode_state`` wrote."""
    if fn == "distinct":
        return Hll.from_bytes(raw) if isinstance(raw, bytes) else set(map(_hashable, raw))
    return raw


def _hashable(v: Any) -> Any:
    return tuple(map(_hashable, v)) if isinstance(v, list) else v


def compile_where(where: Any) -> Callable[[list[Any]], list[Any]] | None:
    """A function keeping the events that satisfy ``where`` (see ``Aggregate``)."""
    if where is None:
        return None
    if isinstance(where, str):
        from importlib import import_module

        mod, _, attr = where.partition(":")
        where = getattr(import_module(mod), attr)
    if callable(where):
        pred = where
        return lambda events: list(filter(pred, events))
    pairs = list(where.items()) if isinstance(where, dict) else [tuple(where)]
    gets = [(attrgetter(f), v) for f, v in pairs]

    def keep(events: list[Any]) -> list[Any]:
        for get, want in gets:
            events = list(compress(events, [x == want for x in map(get, events)]))
        return events

    return keep


def decode_groups(fn: str, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A group table from a partial's ``(group, state)`` pairs."""
    if fn != "distinct":
        try:
            return dict(pairs)  # scalar keys, plain states: one C call
        except TypeError:  # tuple group keys came back as lists
            pass
    return {_hashable(k): decode_state(fn, raw) for k, raw in pairs}
