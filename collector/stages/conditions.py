"""Conditions of rules: the ``Cond`` config form and its compiler into closures.

::

    Cond(path, one operator) | Cond(all/any/not) ── compile_cond(cond, at, missing, counts)
        ─► CompiledCond(one(event) -> bool, many(events, cache) -> mask)

``one`` decides one event (short-circuit; a missing field gives the rule's ``missing``
value or raises :class:`Missing`); ``many`` is the fast path over a chunk: C-level maps
of getters and ``operator`` functions, a path's values read once per chunk and shared
through ``cache``; it raises when any event lacks a field or a value does not fit, and
the caller then runs ``one`` per event. Regexes are compiled once (their answers
remembered per value). Split from :mod:`collector.stages.rules`, which runs them.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from itertools import repeat
from operator import attrgetter
from typing import Any

import msgspec

from ..errors import ConfigError

__all__ = ["MISSED_AT", "OPERATORS", "CompiledCond", "Cond", "Missing", "Pred", "compile_cond", "path_getter"]

MISSED_AT = 5  # the index of the "missing" counter in a rule's counters (collector.stages.rules.COUNTERS)
_U = msgspec.UNSET
Unset = msgspec.UnsetType
Scalar = int | float | str | bool


class Cond(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A condition: one operator on ``path``, or one combinator (``all``, ``any``, ``not``).

    ``{path = "user.type", eq = "premium"}``, ``{path = "data.score", range = [90, 100]}``,
    ``{all = [{...}, {...}]}``, ``{not = {...}}``. ``range`` is inclusive at both ends;
    ``contains`` is substring (strings) or membership (lists, dict keys); ``regex`` is a
    search (anchor it with ``^...$``); ``in`` is membership of the field's value in the
    list; ``exists`` is true when the path resolves to a value that is not None.
    """

    path: str | Unset = _U
    eq: Any = _U
    ne: Any = _U
    gt: int | float | str | Unset = _U
    ge: int | float | str | Unset = _U
    lt: int | float | str | Unset = _U
    le: int | float | str | Unset = _U
    contains: Scalar | Unset = _U
    regex: str | Unset = _U
    in_: list[Any] | Unset = msgspec.field(default=_U, name="in")
    range: tuple[int | float | str, int | float | str] | Unset = _U
    exists: bool | Unset = _U
    all: list[Cond] | Unset = _U
    any: list[Cond] | Unset = _U
    not_: Cond | Unset = msgspec.field(default=_U, name="not")


class Missing(Exception):
    """A condition read a field that is absent or None."""


_MISSING_EXC = Missing()

Pred = Callable[[Any], bool]


class CompiledCond:
    """A compiled condition: ``one(event)`` and ``many(events) -> mask``.

    ``many`` is the fast path over a chunk: C-level maps of getters and ``operator``
    functions, every condition evaluated on every event; it raises when any event
    lacks a field, has a value of another kind, or raises, and the chunk then goes
    through ``one`` (short-circuit, missing fields and errors as the rule says).
    """

    __slots__ = ("many", "one")

    def __init__(self, one: Pred, many: Many) -> None:
        self.one = one
        self.many = many


Many = Callable[[list[Any], dict[str, Any]], list[Any]]


class _Slow(Exception):
    """The chunk cannot take the fast path (a missing field, a mixed container)."""


_SLOW = _Slow()
_GAP: list[Any] = []  # in a chunk's cache: this path has a gap (by identity)


def _many_path(path: str) -> Many:
    """The values of ``path`` in each event by C-level maps, shared through the chunk's
    ``cache`` by every condition reading the path or a prefix; raises _Slow on a gap."""
    head, _, last = path.rpartition(".")
    attr = attrgetter(last)
    parent = _many_path(head) if head else None
    dict_get = dict.get

    def get(events: list[Any], cache: dict[str, Any]) -> list[Any]:
        vals = cache.get(path)
        if vals is None:
            try:
                if parent is None:
                    vals = list(map(attr, events))
                else:
                    up = parent(events, cache)
                    kinds = cache.get(head + ".")  # the kinds of the parent's values, once per chunk
                    if kinds is None:
                        kinds = cache[head + "."] = set(map(type, up))
                    if type(None) in kinds:
                        raise _SLOW
                    if kinds == {dict}:
                        vals = list(map(dict_get, up, repeat(last, len(up))))
                    elif dict in kinds:
                        raise _SLOW
                    else:
                        vals = list(map(attr, up))
            except (_Slow, AttributeError):
                vals = _GAP
            cache[path] = vals
        if vals is _GAP:
            raise _SLOW
        return vals

    return get


OPERATORS = ("eq", "ne", "gt", "ge", "lt", "le", "contains", "regex", "in", "range", "exists", "all", "any", "not")
# test(arg, value): the comparisons mirrored (value > arg is arg < value)
_CMP: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq, "ne": operator.ne, "gt": operator.lt, "ge": operator.le, "lt": operator.gt, "le": operator.ge,
    "contains": lambda arg, v: arg in v,
}
_ORDERED = (int, float, str)


def path_getter(p: Any, at: str) -> Callable[[Any], Any]:
    """A getter for a dotted path: attributes of Structs, keys of dicts; raises Missing."""
    if not isinstance(p, str) or not p or not all(s.isidentifier() for s in p.split(".")):
        raise ConfigError(f"{at}: {p!r} is not a field path (names separated by dots: data.value)")
    parts = p.split(".")
    if len(parts) == 1:
        (a,) = parts

        def get1(e: Any) -> Any:
            v = e.get(a) if type(e) is dict else getattr(e, a, None)
            if v is None:
                raise _MISSING_EXC
            return v

        return get1
    if len(parts) == 2:
        a, b = parts

        def get2(e: Any) -> Any:  # the common case, unrolled: data.value
            d = e.get(a) if type(e) is dict else getattr(e, a, None)
            v = d.get(b) if type(d) is dict else getattr(d, b, None)
            if v is None:
                raise _MISSING_EXC
            return v

        return get2

    def get(e: Any) -> Any:
        for s in parts:
            e = e.get(s) if isinstance(e, dict) else getattr(e, s, None)
            if e is None:
                raise _MISSING_EXC
        return e

    return get


def compile_cond(c: Any, at: str, miss: Any, counts: list[int]) -> CompiledCond:
    """The predicate of condition ``c``; a leaf reading a missing field gives ``miss``
    (False, True, or "error": raise) and counts it in ``counts``."""
    if not isinstance(c, Cond):
        raise ConfigError(f"{at}: expected a condition (Cond or its dict), got {type(c).__name__}")
    given = [op for op in OPERATORS if getattr(c, "in_" if op == "in" else "not_" if op == "not" else op) is not _U]
    if len(given) != 1:
        what = "no operator" if not given else f"several operators ({', '.join(given)})"
        raise ConfigError(f"{at}: a condition needs exactly one operator, got {what}; known: {', '.join(OPERATORS)}")
    op = given[0]
    at_op = f"{at}.{op}"
    if op in ("all", "any", "not"):
        if c.path is not _U:
            raise ConfigError(f"{at}.path: {op} combines conditions; put the path in each of them")
        if op == "not":
            inner = compile_cond(c.not_, at_op, miss, counts)
            one, many = inner.one, inner.many
            return CompiledCond(lambda e: not one(e), lambda es, cache: list(map(operator.not_, many(es, cache))))
        subs = c.all if op == "all" else c.any
        if not isinstance(subs, list | tuple) or not subs:
            raise ConfigError(f"{at_op}: needs a non-empty list of conditions")
        preds = [compile_cond(s, f"{at_op}[{j}]", miss, counts) for j, s in enumerate(subs)]
        if len(preds) == 1:
            return preds[0]
        return _combine(preds, op)
    if c.path is _U:
        raise ConfigError(f"{at}.path: {op} needs the path of the field it reads")
    get = path_getter(c.path, f"{at}.path")
    arg = getattr(c, "in_" if op == "in" else op)
    if op == "exists":
        if not isinstance(arg, bool):
            raise ConfigError(f"{at_op}: expected true or false, got {arg!r}")

        def exists(e: Any) -> bool:
            try:
                get(e)
            except Missing:
                return not arg
            return arg

        mget = _many_path(c.path)
        same = operator.is_not if arg else operator.is_

        def all_exist(events: list[Any], cache: dict[str, Any]) -> list[Any]:
            vals = mget(events, cache)
            return list(map(same, vals, repeat(None, len(vals))))

        return CompiledCond(exists, all_exist)
    if op in ("gt", "ge", "lt", "le"):
        if isinstance(arg, bool) or not isinstance(arg, _ORDERED):
            raise ConfigError(f"{at_op}: expected a number or a string, got {type(arg).__name__} {arg!r}")
    elif op == "contains":
        if isinstance(arg, list | dict | tuple):
            raise ConfigError(f"{at_op}: expected one value (a string or a number), got {type(arg).__name__}")
    elif op == "regex":
        if not isinstance(arg, str):
            raise ConfigError(f"{at_op}: expected a regular expression string, got {type(arg).__name__}")
        try:
            rx = re.compile(arg)
        except re.error as ex:
            raise ConfigError(f"{at_op}: bad regular expression {arg!r}: {ex}") from None
        test, memo = _memo_search(rx)

        def searched(vals: list[Any]) -> list[Any]:
            hits = list(map(memo.get, vals))  # TypeError on an unhashable value: the slow path
            return list(map(test, repeat(None, len(vals)), vals)) if None in hits else hits

        return _leaf(c.path, get, test, None, miss, counts, searched)
    elif op == "in":
        if not isinstance(arg, list | tuple | set | frozenset):
            raise ConfigError(f"{at_op}: expected a list of values, got {type(arg).__name__} {arg!r}")
        try:
            values: Any = frozenset(arg)
        except TypeError:
            values = tuple(arg)
        return _leaf(c.path, get, operator.contains, values, miss, counts)
    elif op == "range":
        if (
            not isinstance(arg, list | tuple) or len(arg) != 2
            or any(isinstance(x, bool) or not isinstance(x, _ORDERED) for x in arg)
        ):
            raise ConfigError(f"{at_op}: expected [low, high] (numbers or strings), got {arg!r}")
        lo, hi = arg
        try:
            if lo > hi:
                raise ConfigError(f"{at_op}: low {lo!r} is above high {hi!r}")
        except TypeError:
            raise ConfigError(f"{at_op}: low and high must be of one kind, got {lo!r} and {hi!r}") from None
        le, ge = operator.le, operator.ge

        def within(vals: list[Any]) -> list[Any]:
            n = len(vals)
            return list(map(operator.and_, map(le, repeat(lo, n), vals), map(ge, repeat(hi, n), vals)))

        return _leaf(c.path, get, lambda _, v: lo <= v <= hi, None, miss, counts, within)
    if op == "contains":
        return _leaf(c.path, get, _CMP[op], arg, miss, counts,
                     lambda vals: list(map(operator.contains, vals, repeat(arg, len(vals)))))
    return _leaf(c.path, get, _CMP[op], arg, miss, counts)


def _leaf(
    path: str, get: Callable[[Any], Any], test: Callable[[Any, Any], Any], arg: Any, miss: Any, counts: list[int],
    vec: Callable[[list[Any]], list[Any]] | None = None,
) -> CompiledCond:
    """``test(arg, field value)``; a missing field gives ``miss`` (or raises on "error").

    ``vec(values)`` is the test over a chunk's values (default: ``test`` mapped in C).
    """
    mget = _many_path(path)
    if vec is None:
        def vec(vals: list[Any]) -> list[Any]:
            return list(map(test, repeat(arg, len(vals)), vals))
    test_all = vec

    def many(events: list[Any], cache: dict[str, Any]) -> list[Any]:
        vals = mget(events, cache)
        if None in vals:
            raise _SLOW
        return test_all(vals)

    if miss == "error":
        def strict(e: Any) -> bool:
            try:
                v = get(e)
            except Missing:
                counts[MISSED_AT] += 1
                raise
            return test(arg, v)

        return CompiledCond(strict, many)
    missing = bool(miss)

    def leaf(e: Any) -> bool:
        try:
            v = get(e)
        except Missing:
            counts[MISSED_AT] += 1
            return missing
        return test(arg, v)

    return CompiledCond(leaf, many)


def _memo_search(rx: re.Pattern[str]) -> tuple[Callable[[Any, Any], bool], dict[str, bool]]:
    """``rx.search(value) is not None``, remembered per value (user agents repeat: a
    dict hit is several times cheaper than a case-insensitive alternation)."""
    search = rx.search
    memo: dict[str, bool] = {}

    def test(_: Any, v: Any) -> bool:
        r = memo.get(v)
        if r is None:
            r = search(v) is not None  # TypeError on a value that is not a string
            if len(memo) >= 4096:
                memo.clear()
            memo[v] = r
        return r

    return test, memo


def _combine(subs: list[CompiledCond], op: str) -> CompiledCond:
    """``all`` or ``any`` of the conditions, one event at a time and over a chunk."""
    one = _short([p.one for p in subs], op == "any")
    both = operator.and_ if op == "all" else operator.or_
    manys = [p.many for p in subs]

    def many(events: list[Any], cache: dict[str, Any]) -> list[Any]:
        mask = manys[0](events, cache)
        for m in manys[1:]:
            mask = list(map(both, mask, m(events, cache)))  # bools from every condition
        return mask

    return CompiledCond(one, many)


def _short(preds: list[Pred], stop: bool) -> Pred:
    """``all`` (``stop=False``: the first false decides) or ``any`` (``stop=True``: the first true)."""
    if len(preds) == 2:
        a, b = preds
        return (lambda e: bool(a(e) or b(e))) if stop else (lambda e: bool(a(e) and b(e)))

    def short(e: Any) -> bool:
        for p in preds:  # a loop: all()/any() over a generator is slower
            if bool(p(e)) is stop:
                return stop
        return not stop

    return short
