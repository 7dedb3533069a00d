"""Enrichment sources: where a lookup's values come from, and how they are fetched.

::

    chunk's events ─► fill (per event, inline): local cache hit → set the field
                    └► distinct misses ─► single-flight (join a call under way: coalesced)
                         ─► micro-batch (``linger``) ─► cut into calls of ``max_batch`` keys
                         ─► shared cache (Redis MGET, two-level mode) ─► circuit breaker
                         ─► concurrency bound ─► timeout ─► Source.get_many(keys)
                         ─► retries (full-jitter backoff) ─► cache per outcome
                         ─► fill the missed events (failure: stale value, else the field's default)

One module per kind, each importing its driver lazily: ``client`` (today's "object
with methods" path), ``http`` (aiohttp), ``postgres``/``mysql`` (asyncpg / aiomysql),
``redis``, ``map`` (a Python mapping or a JSON/CSV file), ``rates`` (FX rates in
exchangerate.host's format, with a built-in deterministic service). A kind is found
through :data:`SOURCES` (name → ``"module:attr"``, imported only when used); a kind may
also be an import string of a :class:`~collector.sources.base.Source` subclass.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SOURCES", "build_source", "source_class"]

SOURCES: dict[str, str] = {
    "client": "collector.sources.client:ClientSource",
    "http": "collector.sources.http:HttpSource",
    "postgres": "collector.sources.sql:PostgresSource",
    "mysql": "collector.sources.sql:MysqlSource",
    "sqlite": "collector.sources.sql:SqliteSource",
    "redis": "collector.sources.redis:RedisSource",
    "map": "collector.sources.memory:MapSource",
    "rates": "collector.sources.rates:RatesSource",
}


def source_class(kind: str) -> Any:
    """The Source class of ``kind`` (a name in :data:`SOURCES` or an import string)."""
    from ..errors import ConfigError
    from ..pipeline import import_string

    spec = SOURCES.get(kind)
    if spec is None:
        if ":" not in kind:
            raise ConfigError(f"unknown source kind {kind!r}; known kinds: {sorted(SOURCES)}")
        spec = kind
    return import_string(spec, "source")


def build_source(obj: Any) -> Any:
    """A Source from a Source (as is) or a source config Struct (through its ``kind``)."""
    from .base import Source

    if isinstance(obj, Source):
        return obj
    kind = getattr(type(obj), "__struct_config__", None)
    tag = kind.tag if kind is not None else None
    if not isinstance(tag, str):
        from ..errors import ConfigError

        raise ConfigError(f"a lookup's source must be a Source or a source config, got {type(obj).__name__}")
    return source_class(tag)(obj)
