"""Per-event table names for the SQL-like sinks (``sqlite``, ``clickhouse``).

::

    table = "cs_{event}"   ─► event.event == "page_view"  ─► cs_page_view
                           ─► event.event == "bad name!"  ─► refused (dead-lettered)

``{field}`` is the event's top-level field (read with
:func:`collector.template.path_getter`: a dict key, an attribute, or a read-only
property such as a msgspec tagged union's tag). A table name is interpolated into SQL,
so the result must be a plain identifier (:data:`IDENT`); an event whose name is not
one, or whose field is missing or empty, is refused with the reason and the rest of
its chunk is stored. A template without fields is one fixed table.
"""

from __future__ import annotations

import re
import string
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ..template import path_getter
from .base import DeadLetter

__all__ = ["IDENT", "TableTemplate", "refused_records", "table_names"]

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class TableTemplate:
    """A table name template such as ``events`` or ``cs_{event}``; see the module docstring."""

    def __init__(self, template: str) -> None:
        self.template = template
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as e:
            raise ConfigError(f"table template {template!r}: {e}") from None
        self.fields: list[str] = []
        for _, f, spec, conv in parsed:
            if f is None:
                continue
            if not f.isidentifier() or spec or conv:
                raise ConfigError(f"table template {template!r}: {{{f}}} must name a top-level field")
            if f not in self.fields:
                self.fields.append(f)
        self._getters = [(f, path_getter(f)) for f in self.fields]
        if self.constant and not IDENT.match(template):
            raise ConfigError(f"table {template!r} is not a plain SQL identifier ({IDENT.pattern})")
        # table (or refusal) by field values: a chunk holds few distinct values
        self._cache: dict[Any, tuple[str | None, str]] = {}

    @property
    def constant(self) -> bool:
        """Whether every event goes to the same table."""
        return not self.fields

    def render(self, values: Mapping[str, Any]) -> tuple[str | None, str]:
        """``(table, "")`` for the field values, or ``(None, reason)`` when it is refused."""
        clean = {}
        for f in self.fields:
            v = values.get(f)
            if v is None or v == "":
                return None, f"table {self.template!r}: field {f!r} is missing or empty"
            clean[f] = str(v)
        name = self.template.format_map(clean)
        if not IDENT.match(name):
            return None, f"table {self.template!r}: {name[:80]!r} is not a plain SQL identifier ({IDENT.pattern})"
        return name, ""

    def _name(self, key: Any) -> tuple[str | None, str]:
        hit = self._cache.get(key)
        if hit is None:
            values = key if len(self.fields) > 1 else (key,)
            hit = self.render(dict(zip(self.fields, values, strict=True)))
            if len(self._cache) < 4096:
                self._cache[key] = hit
        return hit

    def route(self, events: Sequence[Any]) -> tuple[dict[str, list[int]], list[tuple[int, str, str]]]:
        """Positions of ``events`` by table, and ``(position, field path, reason)`` of the refused."""
        if self.constant:
            return {self.template: list(range(len(events)))}, []
        getters = [g for _, g in self._getters]
        if len(getters) == 1:
            keys: list[Any] = list(map(getters[0], events))
        else:
            keys = [tuple(g(e) for g in getters) for e in events]
        # positions by field value first (a chunk holds few values), then one name per value
        by_key: dict[Any, list[int]] = {}
        unhashable: list[int] = []
        for i, k in enumerate(keys):
            try:
                pos = by_key.get(k)
            except TypeError:  # a list or dict value: it cannot make a valid name anyway
                unhashable.append(i)
                continue
            if pos is None:
                by_key[k] = [i]
            else:
                pos.append(i)
        by_table: dict[str, list[int]] = {}
        refused: list[tuple[int, str, str]] = []
        path = "$." + self.fields[0] if len(self.fields) == 1 else "$"
        for k, pos in by_key.items():
            table, why = self._name(k)
            if table is None:
                refused.extend((i, path, why) for i in pos)
            elif table in by_table:  # two values, one name (1 and "1")
                by_table[table].extend(pos)
            else:
                by_table[table] = pos
        for i in unhashable:
            refused.append((i, path, f"table {self.template!r}: a field value is not a scalar"))
        if refused and len(by_key) > 1:
            refused.sort()
        return by_table, refused


def table_names(template: str, values: Iterable[Any]) -> list[str]:
    """The concrete tables of a one-field template for the given values (``cs_{event}`` x types).

    For a template without fields it is the table itself. A value that makes no valid
    name raises :class:`ConfigError`.
    """
    t = TableTemplate(template)
    if t.constant:
        return [template]
    if len(t.fields) != 1:
        raise ConfigError(f"table template {template!r}: table_names() fills one field only")
    out = []
    for v in values:
        name, why = t.render({t.fields[0]: v})
        if name is None:
            raise ConfigError(why)
        out.append(name)
    return out


def refused_records(refused: list[tuple[int, str, str]], texts: list[str], name: str, worker: int) -> list[DeadLetter] | None:
    """Dead-letter records of the events whose table name was refused (``TableTemplate.route``)."""
    if not refused:
        return None
    now = time.time()
    return [DeadLetter(texts[i], why, path, f"sink:{name}", now, worker) for i, path, why in refused]
