"""Filters and rules: keep, drop, mark or transform events by conditions on their fields.

::

    Rules(rules=[Rule(name, when=Cond, action, set/rename/remove/render, missing, on_error)])
      ── __post_init__: compiled once to check (ConfigError naming rules[i].when.all[0].regex)
      ── build(): compiled once per worker into closures ─► RulesRuntime(events) ─► drops
                                                             take_routes() ─► id(event) → sinks
                                                             snapshot() ─► msgpack counters
    supervisor: Rules.merge(partials) ─► {rule: {evaluated, matched, ...}} ─► read(result, key)

Rules run in order, one rule over the chunk's undecided events at a time. ``allow`` and
``block`` decide an event (later rules do not see it); ``transform`` changes it and
evaluation goes on with the next rule; ``route`` names the sinks the event goes to
(:mod:`collector.stages.routing`; the runner hands them to the sink set) and goes on.
An event no rule decides passes. Conditions (:mod:`collector.stages.conditions`) are
closures over ``operator`` functions and attribute getters: no parsing per event, no
``eval``; regexes are compiled once. A rule first runs over the whole chunk by C-level
maps (``CompiledCond.many``); a chunk with a missing field or a raising value runs that
rule one event at a time (``CompiledCond.one``), with the rule's ``missing`` and
``on_error``. See docs/rules.md. ``Filter`` (a Python predicate) is kept as it was.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from itertools import compress
from operator import attrgetter
from typing import Any, Literal

import msgspec

from ..errors import ConfigError
from ..protocol import ErrorRecord
from .base import Stage
from .conditions import MISSED_AT, OPERATORS, CompiledCond, Cond, Missing, compile_cond, path_getter
from .routing import ACTIONS, Routes, add_routes, check_route

__all__ = ["COUNTERS", "Cond", "Filter", "Rule", "Rules", "RulesRuntime", "decode_rules"]

log = logging.getLogger("collector.rules")

# per rule, summed across workers by Rules.merge
COUNTERS = ("evaluated", "matched", "allowed", "blocked", "transformed", "missing", "errors", "routed")
_EV, _MA, _AL, _BL, _TR, _MI, _ER, _RO = range(len(COUNTERS))
assert _MI == MISSED_AT
Edit = Callable[[Any], None]


@dataclass(frozen=True)
class Filter(Stage):
    """Keep events for which ``predicate(event)`` is true; drop the rest as ``filtered``.

    ``predicate`` is a picklable callable or a ``"module:function"`` import string.
    """

    predicate: Any = None
    reason: str = "filtered out"
    name: str = "filter"
    options: dict[str, Any] = dc_field(default_factory=dict)

    def build(self) -> Callable[[list[Any]], list[ErrorRecord]]:
        """The filter function for one worker."""
        from ..registry import import_string

        pred = self.predicate
        if isinstance(pred, str):
            pred = import_string(pred, "filter predicate")
        reason = self.reason

        def run(events: list[Any]) -> list[ErrorRecord]:
            return [ErrorRecord(i, "$", reason, "filtered") for i, e in enumerate(events) if not pred(e)]

        return run


# ---------------------------------------------------------------------------- the config form
class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A named rule: a condition (none: every event) and an action.

    ``action``: ``allow`` (pass; decided), ``block`` (drop as ``filtered``, the reason
    naming the rule; decided), ``transform`` (apply the edits, go on with the next rule),
    ``route`` (the event goes to the named ``sinks`` only, plus those of any later
    ``route`` rule it matches; edits apply as a hint; go on with the next rule).
    The edits (``set`` path → value, ``render`` path → template, ``rename`` old path →
    new path, ``remove`` paths) apply with ``transform`` and, as a mark, with ``allow``.
    ``missing``: the value of a comparison whose field is missing (absent, None, or a
    path through a value that has no such key or attribute): ``false`` (default) or
    ``true``, then combined by ``all``/``any``/``not`` as usual (``not`` of a missing
    comparison with ``missing = false`` is true), or ``"error"``: the rule raises on
    that event (counted in ``errors``; ``on_error`` decides). ``exists`` never counts
    as missing: it is the question.
    ``on_error``: what happens to an event the rule raised on (a type mismatch):
    ``allow`` (seed 003: filter failures let events through) or ``block``.
    """

    name: str
    when: Cond | None = None
    action: str = "allow"  # allow, block, transform, route (checked when compiled)
    sinks: list[str] = msgspec.field(default_factory=list)  # route: the sinks the event goes to
    set: dict[str, Any] = msgspec.field(default_factory=dict)
    render: dict[str, str] = msgspec.field(default_factory=dict)
    rename: dict[str, str] = msgspec.field(default_factory=dict)
    remove: list[str] = msgspec.field(default_factory=list)
    reason: str = ""
    missing: bool | Literal["error"] = False
    on_error: Literal["allow", "block"] = "allow"


class RulesConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The dict/TOML form of a :class:`Rules` stage."""

    rules: list[Rule]
    name: str = "rules"
    maps: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)


_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`(?: - at `\$(.*)`)?")
_AT = re.compile(r"^(.*?)(?: - at `\$(.*)`)?$")


def decode_rules(obj: Any, where: str = "") -> Rules:
    """A :class:`Rules` stage from its dict form (TOML); errors name the path.

    ``{"name": "filters", "rules": [{"name": ..., "when": {...}, "action": ...}]}``.
    """
    try:
        cfg = msgspec.convert(obj, RulesConfig)
    except msgspec.ValidationError as e:
        msg = str(e)
        m = _UNKNOWN.match(msg)
        if m is not None:
            at = _join(where, (m.group(2) or "").lstrip("."), m.group(1))
            if ".when" in at or at.startswith("when"):
                raise ConfigError(f"{at}: unknown operator {m.group(1)!r} (known: {', '.join(OPERATORS)})") from None
            raise ConfigError(f"{at}: unknown key {m.group(1)!r}") from None
        m = _AT.match(msg)
        assert m is not None
        raise ConfigError(f"{_join(where, (m.group(2) or '').lstrip('.'))}: {m.group(1)}") from None
    return Rules(rules=tuple(cfg.rules), name=cfg.name, maps=cfg.maps)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p).replace(".[", "[") or "$"


# ---------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class Rules(Stage):
    """An ordered list of :class:`Rule` (or their dicts), checked when constructed.

    ``maps`` are the static mappings ``render`` templates read (``{game:map:titles}``).
    Counters per rule (:data:`COUNTERS`) are the stage's partial state:
    ``Collector.aggregate(name)`` gives ``{rule: {counter: n}}`` summed over workers.
    """

    rules: Sequence[Any] = ()
    name: str = "rules"
    maps: Mapping[str, Mapping[Any, Any]] = dc_field(default_factory=dict)
    is_rules: bool = True

    def __post_init__(self) -> None:
        rules = tuple(
            r if isinstance(r, Rule) else decode_rules({"rules": [r]}, "").rules[0] for r in self.rules
        )
        object.__setattr__(self, "rules", rules)
        names = [r.name for r in rules]
        for i, n in enumerate(names):
            if not isinstance(n, str) or not n:
                raise ConfigError(f"rules[{i}].name: a rule needs a name")
            if n in names[:i]:
                raise ConfigError(f"rules[{i}].name: {n!r} is the name of an earlier rule; names must be unique")
        _compile_all(rules, self.maps)  # config errors now, not in a worker

    def build(self) -> RulesRuntime:
        """The compiled rules of one worker."""
        return RulesRuntime(self)

    def merge(self, partials: Sequence[bytes]) -> dict[str, dict[str, int]]:
        """The workers' counters summed per rule (every rule listed, zeros without partials)."""
        out = {r.name: dict.fromkeys(COUNTERS, 0) for r in self.rules}
        for b in partials:
            p = _decoder.decode(b)
            for rname, row in zip(p.rules, p.counters, strict=True):
                tgt = out.setdefault(rname, dict.fromkeys(COUNTERS, 0))
                for c, v in zip(COUNTERS, row, strict=False):
                    tgt[c] += v
        return out

    def read(self, result: dict[str, dict[str, int]], key: Any = None, **_: Any) -> Any:
        """Every rule's counters, or one rule's (``key``: its name; None if unknown)."""
        if key is None:
            return {k: dict(v) for k, v in result.items()}
        found = result.get(key)
        return dict(found) if found is not None else None


class RulesPartial(msgspec.Struct, array_like=True):
    """One worker's counters: ``counters[i]`` are rule ``rules[i]``'s, in :data:`COUNTERS` order."""

    stage: str
    rules: list[str]
    counters: list[list[int]]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RulesPartial)


class _Compiled:
    __slots__ = ("action", "counts", "edits", "index", "many", "missing", "name", "on_error", "pred", "reason", "sinks")

    def __init__(self, index: int, rule: Rule, pred: CompiledCond | None, edits: list[Edit], counts: list[int]) -> None:
        self.counts = counts  # this rule's counters (COUNTERS order), shared with its leaves
        self.index = index
        self.name = rule.name
        self.action = rule.action
        self.pred = pred.one if pred is not None else None
        self.many = pred.many if pred is not None else None
        self.edits = edits
        self.missing = rule.missing
        self.on_error = rule.on_error
        self.reason = rule.reason or f"blocked by rule {rule.name!r}"
        self.sinks = frozenset(rule.sinks)


class RulesRuntime:
    """One worker's compiled rules and counters; call it with a chunk's events."""

    def __init__(self, spec: Rules) -> None:
        self.spec = spec
        self.compiled = _compile_all(spec.rules, spec.maps)
        self.counters = [c.counts for c in self.compiled]
        self.names = [c.name for c in self.compiled]
        self._snap: bytes | None = None
        self._logged: set[tuple[str, str]] = set()
        self.routing = any(c.sinks for c in self.compiled)
        self._routes: Routes = {}

    def take_routes(self) -> Routes:
        """The sinks the last chunk's routed events go to, by ``id(event)`` (taken once)."""
        out, self._routes = self._routes, {}
        return out

    def __call__(self, events: list[Any]) -> list[ErrorRecord]:
        """Apply the rules to a chunk; the blocked events are returned as drops."""
        if self.routing:
            self._routes = {}
        if not events:
            return []
        self._snap = None
        pos = list(range(len(events)))
        alive = events
        drops: list[ErrorRecord] = []
        cache: dict[str, Any] = {}  # path → its values in `alive` (for the fast paths)
        for r in self.compiled:
            if not alive:
                break
            c = r.counts
            c[_EV] += len(alive)
            mask: list[Any]
            if r.pred is None:
                mask = [True] * len(alive)
            else:
                try:  # the fast path over the chunk
                    mask = r.many(alive, cache)  # type: ignore[misc]
                except Exception:
                    missing = c[_MI]
                    try:  # one event at a time, no event raises
                        mask = list(map(r.pred, alive))
                    except Exception:
                        c[_MI] = missing  # counted again below
                        mask = self._one_by_one(r, alive, c)
                if not any(mask):
                    continue
            matched = [i for i, m in enumerate(mask) if m and m is not _BLOCK]
            c[_MA] += len(matched)
            drop = [i for i, m in enumerate(mask) if m is _BLOCK]  # raised, and on_error = block
            if r.action == "block":
                drop = sorted(drop + matched)
            elif r.edits and matched:  # transform, route with a hint, or allow with a mark
                for i in matched:
                    self._edit(r, alive[i], c)
                cache.clear()
            if r.sinks and matched:
                c[_RO] += len(matched)
                add_routes(self._routes, [alive[i] for i in matched], r.sinks)
            if r.action == "allow":
                c[_AL] += len(matched)
            if drop:
                c[_BL] += len(drop)
                drops.extend(ErrorRecord(pos[i], "$", r.reason, "filtered") for i in drop)
            decided = set(drop)
            if r.action == "allow":
                decided.update(matched)
            if decided:
                keep = [i not in decided for i in range(len(alive))]
                alive = list(compress(alive, keep))
                pos = list(compress(pos, keep))
                cache.clear()
        drops.sort(key=attrgetter("pos"))
        return drops

    def _one_by_one(self, r: _Compiled, alive: list[Any], c: list[int]) -> list[Any]:
        """The slow path: each event on its own, a missing field or an error as the rule says."""
        pred = r.pred
        assert pred is not None
        out: list[Any] = []
        for e in alive:
            try:
                out.append(pred(e))
                continue
            except Missing:  # only with missing = "error"
                why = "a field the rule reads is missing"
            except Exception as ex:
                why = f"{type(ex).__name__}: {ex}"
            c[_ER] += 1
            self._log(r.name, why)
            out.append(_BLOCK if r.on_error == "block" else False)
        return out

    def _edit(self, r: _Compiled, e: Any, c: list[int]) -> None:
        try:
            for ed in r.edits:
                ed(e)
        except Exception as ex:  # the event passes as far as it was edited
            c[_ER] += 1
            self._log(r.name, f"transform failed: {type(ex).__name__}: {ex}")
            return
        c[_TR] += 1

    def _log(self, rule: str, why: str) -> None:
        if (rule, why) not in self._logged and len(self._logged) < 1000:
            self._logged.add((rule, why))
            log.warning("rule %r: %s (counted in its errors; logged once)", rule, why)

    def snapshot(self) -> bytes:
        """The per-rule counters as msgpack; the same bytes object while nothing changed."""
        if self._snap is None:
            self._snap = _encoder.encode(RulesPartial(self.spec.name, self.names, self.counters))
        return self._snap


class _Block:
    """Marks an event a rule raised on whose ``on_error`` is ``block`` (truthy, not a match)."""

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "<error: block>"


_BLOCK: Any = _Block()


# ---------------------------------------------------------------------------- compiling
def _compile_all(rules: Sequence[Rule], maps: Mapping[str, Mapping[Any, Any]]) -> list[_Compiled]:
    out = []
    for i, r in enumerate(rules):
        at = f"rules[{i}]"
        if not isinstance(r, Rule):
            raise ConfigError(f"{at}: expected a Rule or its dict, got {type(r).__name__}")
        if r.action not in ACTIONS:
            raise ConfigError(f"{at}.action: unknown action {r.action!r}; known: {', '.join(ACTIONS)}")
        check_route(r.action, r.sinks, bool(r.set or r.render or r.rename or r.remove), at)
        if r.missing not in (False, True, "error"):
            raise ConfigError(f"{at}.missing: must be false, true or \"error\" (got {r.missing!r})")
        if r.on_error not in ("allow", "block"):
            raise ConfigError(f"{at}.on_error: must be \"allow\" or \"block\" (got {r.on_error!r})")
        counts = [0] * len(COUNTERS)
        pred = None if r.when is None else compile_cond(r.when, f"{at}.when", r.missing, counts)
        edits = _edits(r, at, maps)
        if r.action == "transform" and not edits:
            raise ConfigError(f"{at}: a transform rule needs set, render, rename or remove")
        if r.action == "block" and edits:
            raise ConfigError(f"{at}: a block rule drops the event; set, render, rename and remove do not apply")
        out.append(_Compiled(i, r, pred, edits, counts))
    return out


def _set_path(path: str, at: str) -> tuple[Callable[[Any], Any], str]:
    """The parent getter and the last name of a path that is written to."""
    path_getter(path, at)  # checks the syntax
    head, _, last = path.rpartition(".")
    parent = path_getter(head, at) if head else (lambda e: e)
    return parent, last


def _put(obj: Any, name: str, value: Any) -> None:
    if isinstance(obj, dict):
        obj[name] = value
    else:
        setattr(obj, name, value)  # a Struct: only its own fields (AttributeError otherwise)


def _drop(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.pop(name, None)
    v = getattr(obj, name)
    setattr(obj, name, None)  # a Struct field cannot go away: it becomes None
    return v


def _const(v: Any) -> Callable[[Any], Any]:
    return lambda e: v


def _edits(r: Rule, at: str, maps: Mapping[str, Mapping[Any, Any]]) -> list[Edit]:
    """The rule's edits in order: set, rename, remove, render (a template sees the rest)."""
    from ..template import compile_template

    def setter(path: str, where: str, value: Callable[[Any], Any]) -> Edit:
        parent, name = _set_path(path, where)
        return lambda e: _put(parent(e), name, value(e))

    def remover(path: str, where: str) -> Callable[[Any], Any]:
        parent, name = _set_path(path, where)
        return lambda e: _drop(parent(e), name)

    out: list[Edit] = []
    for path, value in r.set.items():
        out.append(setter(path, f"{at}.set.{path}", _const(value)))
    for old, new in r.rename.items():
        if not isinstance(new, str):
            raise ConfigError(f"{at}.rename.{old}: expected the new path, got {new!r}")
        out.append(setter(new, f"{at}.rename.{old}", remover(old, f"{at}.rename.{old}")))
    for j, path in enumerate(r.remove):
        out.append(remover(path, f"{at}.remove[{j}]"))
    for path, text in r.render.items():
        out.append(setter(path, f"{at}.render.{path}", compile_template(text, maps, name=f"{at}.render.{path}")))
    return out
