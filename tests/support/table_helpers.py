"""Events with a per-type table for the table-template tests (workers import this by name).

:class:`Click` has an ``event`` field naming its type; :func:`clicks` makes ``n`` of
them spread over :data:`TYPES` plus, when asked, some whose type makes no valid table
name (``bad-name``, empty). :class:`ClickhouseReader` reads a ClickHouse database over
HTTP with the standard library (the tests do not use the sink's own code to check it).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import msgspec

from collector import Pipeline

TYPES = ("page_view", "click", "scroll", "form_submit", "search", "add_to_cart")
BAD = ("bad-name", "", "x" * 70)


class Click(msgspec.Struct):
    id: str
    event: str
    user: str
    n: int = 0


def clicks(n: int, *, bad_every: int = 0, start: int = 0) -> list[Click]:
    """``n`` events, ids ``c<k>``; every ``bad_every``-th one has a type that is no table name."""
    out = []
    for k in range(start, start + n):
        t = BAD[k % len(BAD)] if bad_every and k % bad_every == 0 else TYPES[k % len(TYPES)]
        out.append(Click(id=f"c{k}", event=t, user=f"u{k % 97}", n=k))
    return out


def click_pipeline(sinks: tuple[Any, ...], deadletter: Any = None) -> Pipeline:
    """``Click`` events straight to ``sinks``."""
    return Pipeline(name="clicks", event_type=Click, key="id", id_field="id", sinks=sinks, deadletter=deadletter)


class ClickhouseReader:
    """Queries over ClickHouse's HTTP interface (urllib, bounded timeouts)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") + "/"

    def query(self, sql: str, timeout: float = 30) -> str:
        req = urllib.request.Request(self.url, data=sql.encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return str(r.read().decode())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"ClickHouse refused {sql!r}: {e.read().decode()}") from None

    def rows(self, sql: str) -> list[dict[str, Any]]:
        text = self.query(sql + " FORMAT JSONEachRow")
        return [json.loads(line) for line in text.splitlines() if line]

    def tables(self, database: str) -> list[str]:
        q = urllib.parse.quote(database)
        return sorted(r["name"] for r in self.rows(f"SELECT name FROM system.tables WHERE database = '{q}'"))
