"""String templates rendered from an event, compiled once per worker into closures.

::

    "Player #{player_id}[ ({player.email})] placed a bet of {amount:money:currency}..."
      ─► compile: literal text, fields (dotted paths), formatters, optional sections
      ─► render(event): list of closures joined; no parsing or eval per event

Syntax:

* ``{path}``: a field, by dotted path (``player.email``); ``{{`` and ``}}`` are braces.
* ``{path:fmt}`` / ``{path:fmt:arg}``: a formatter (:data:`FORMATTERS`):
  ``money:CURRENCY_PATH`` (minor units → major units without trailing zeros:
  500 USD cents → ``5 USD``; the currency read from the field ``CURRENCY_PATH``, or the
  literal code when it is upper case: ``money:EUR``), ``date`` (``January 10th, 2022 at
  12:34 UTC``), ``map:NAME`` (a static mapping given to the template), ``upper``,
  ``lower``.
* ``[...]``: an optional section, rendered only when every field in it is present and
  not empty/zero; ``[path!=VALUE|...]`` and ``[path==VALUE|...]`` also compare a field
  with a literal first.

A template that names an unknown formatter or map, or is malformed, raises
:class:`~collector.errors.ConfigError` naming the template and the position.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from .errors import ConfigError

__all__ = ["DECIMALS", "FORMATTERS", "compile_template", "format_date", "format_money", "get_path", "path_getter"]

DECIMALS = {"BTC": 8}  # minor-unit digits by currency; others have 2
_MISSING = object()


def get_path(obj: Any, path: str) -> Any:
    """``obj.a.b`` or ``obj["a"]["b"]``, whichever each step has; ``None`` if absent."""
    return path_getter(path)(obj)


@functools.lru_cache(maxsize=1024)
def path_getter(path: str) -> Callable[[Any], Any]:
    """:func:`get_path` for one path, split once and kept (templates read fields per event)."""
    parts = tuple(path.split("."))
    if len(parts) == 1:
        (name,) = parts
        return lambda obj: obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)

    def get(obj: Any) -> Any:
        for part in parts:
            if obj is None:
                return None
            obj = obj.get(part) if isinstance(obj, Mapping) else getattr(obj, part, None)
        return obj

    return get


def format_money(minor: int, currency: str, decimals: Mapping[str, int] = DECIMALS) -> str:
    """Minor units as major units without trailing zeros: ``(468, "EUR")`` → ``4.68 EUR``."""
    d = decimals.get(currency, 2)
    value = Decimal(int(minor)).scaleb(-d)
    text = format(value.normalize(), "f") if value else "0"
    return f"{text} {currency}"


def _ordinal(n: int) -> str:
    if 11 <= n % 100 <= 13:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"


def format_date(value: Any) -> str:
    """``January 10th, 2022 at 12:34 UTC`` from a datetime or an ISO 8601 string."""
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    dt = dt.astimezone(UTC)
    return f"{dt:%B} {_ordinal(dt.day)}, {dt.year} at {dt:%H:%M} UTC"


Formatter = Callable[[Any, Any, str | None, Mapping[str, Mapping[Any, Any]]], str]


def _money(v: Any, event: Any, arg: str | None, maps: Mapping[str, Mapping[Any, Any]]) -> str:
    if arg is None:
        raise ValueError("money needs the currency: {amount:money:currency} or {amount:money:EUR}")
    cur = arg if arg.isupper() else get_path(event, arg)
    return format_money(v, str(cur))


def _map(v: Any, event: Any, arg: str | None, maps: Mapping[str, Mapping[Any, Any]]) -> str:
    assert arg is not None
    m = maps[arg]
    found = m.get(v, _MISSING)
    if found is _MISSING:
        found = m.get(str(v), v)  # maps read from TOML have string keys
    return str(found)


FORMATTERS: dict[str, Formatter] = {
    "money": _money,
    "date": lambda v, e, a, m: format_date(v),
    "map": _map,
    "upper": lambda v, e, a, m: str(v).upper(),
    "lower": lambda v, e, a, m: str(v).lower(),
}

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|\[|\]|[^{}\[\]]+|[{}]")
_FIELD = re.compile(r"[A-Za-z_][\w.]*")
_GUARD = re.compile(r"([A-Za-z_][\w.]*)(==|!=)([^|\]]*)\|")
Part = Callable[[Any, list[Any]], str]


def compile_template(text: str, maps: Mapping[str, Mapping[Any, Any]] | None = None, *, name: str = "template") -> Callable[[Any], str]:
    """Compile ``text`` once; the result renders an event to a string."""
    maps = dict(maps or {})

    def fail(pos: int, why: str) -> ConfigError:
        return ConfigError(f"{name}: {why} at position {pos} of {text!r}")

    def field(spec: str, pos: int) -> tuple[Part, str]:
        path, _, rest = spec.partition(":")
        fmt, _, arg = rest.partition(":")
        if not _FIELD.fullmatch(path):
            raise fail(pos, f"{{{spec}}} is not a field path")
        if fmt and fmt not in FORMATTERS:
            raise fail(pos, f"unknown formatter {fmt!r} (known: {', '.join(sorted(FORMATTERS))})")
        if fmt == "map" and arg not in maps:
            raise fail(pos, f"unknown map {arg!r} (given: {', '.join(sorted(maps)) or 'none'})")
        if fmt == "money" and not arg:
            raise fail(pos, "money needs the currency: {amount:money:currency} or {amount:money:EUR}")
        f = FORMATTERS.get(fmt) if fmt else None
        a = arg or None
        get = path_getter(path)

        def part(event: Any, seen: list[Any]) -> str:
            v = get(event)
            seen.append(v)
            if v is None:
                return ""
            return f(v, event, a, maps) if f is not None else str(v)

        return part, path

    # a stack of (parts, guard, start) for nested optional sections
    stack: list[tuple[list[Part], Callable[[Any], bool] | None, int]] = [([], None, 0)]
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m is not None
        tok = m.group(0)
        parts = stack[-1][0]
        if tok == "{{":
            parts.append(_literal("{"))
        elif tok == "}}":
            parts.append(_literal("}"))
        elif m.group(1) is not None:
            parts.append(field(m.group(1), pos)[0])
        elif tok == "[":
            guard = None
            g = _GUARD.match(text, pos + 1)
            if g is not None:
                gpath, op, lit = g.group(1), g.group(2), g.group(3).strip()
                guard = _guard(gpath, op, lit)
                stack.append(([], guard, pos))
                pos = g.end()
                continue
            stack.append(([], None, pos))
        elif tok == "]":
            if len(stack) == 1:
                raise fail(pos, "']' closes no section")
            inner, guard, _ = stack.pop()
            stack[-1][0].append(_section(inner, guard))
        elif tok in "{}":
            raise fail(pos, f"unmatched {tok!r} (write {tok * 2} for a brace)")
        else:
            parts.append(_literal(tok))
        pos = m.end()
    if len(stack) > 1:
        raise fail(stack[-1][2], "'[' is never closed")
    top = stack[0][0]

    def render(event: Any) -> str:
        seen: list[Any] = []
        return "".join([p(event, seen) for p in top])

    return render


def _literal(text: str) -> Part:
    return lambda event, seen: text


def _guard(path: str, op: str, lit: str) -> Callable[[Any], bool]:
    get = path_getter(path)
    if op == "==":
        return lambda e: str(get(e)) == lit
    return lambda e: str(get(e)) != lit


def _section(inner: list[Part], guard: Callable[[Any], bool] | None) -> Part:
    def part(event: Any, seen: list[Any]) -> str:
        if guard is not None and not guard(event):
            return ""
        mine: list[Any] = []
        out = "".join([p(event, mine) for p in inner])
        if not all(mine):  # a field is absent, empty or zero
            return ""
        seen.extend(mine)
        return out

    return part
