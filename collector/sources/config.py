"""Source configuration: frozen msgspec Structs, one per ``kind``, tagged on ``kind``.

Every struct forbids unknown fields, so a typo decoded from TOML names its path
(``$.sources[0].urll``). Each source config carries a :class:`CacheConfig` (none /
local / two-level, one TTL per outcome, stale-on-error) and a
:class:`ResilienceConfig` (timeout, retries with full-jitter backoff, concurrency,
circuit breaker, micro-batching linger)::

    HttpSourceConfig(url="http://users/{key}", value_path="data.segment",
                     cache=CacheConfig(mode="two-level", ttl=300, redis_ttl=900))
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ..sinks.config import redact_dsn

__all__ = [
    "CacheConfig",
    "ClientSourceConfig",
    "EnrichStep",
    "HttpBatch",
    "HttpSourceConfig",
    "MapSourceConfig",
    "MysqlSourceConfig",
    "PostgresSourceConfig",
    "RatesSourceConfig",
    "RedisSourceConfig",
    "ResilienceConfig",
    "SourceConfig",
    "SourceConfigs",
    "SourcesDoc",
    "SqliteSourceConfig",
    "decode_source_config",
    "decode_sources",
]

Seconds = Annotated[float, Meta(ge=0)]
Policy = Literal["keep", "dead_letter", "hold"]  # pipeline.FAILURE_POLICIES
Fallback = Literal["keep", "dead_letter"]  # pipeline.FALLBACKS


class CacheConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How a source's answers are cached in each worker (and optionally in Redis)."""

    mode: Annotated[
        Literal["none", "local", "two-level"],
        Meta(description="`none`: every chunk reads fresh values (duplicates in one chunk share one call); "
             "`local`: per worker; `two-level`: per worker, then Redis shared by all workers and daemons"),
    ] = "local"
    ttl: Annotated[Seconds, Meta(description="seconds a found value is served from the local cache")] = 60.0
    not_found_ttl: Annotated[Seconds, Meta(description="seconds a not-found answer is cached")] = 10.0
    error_ttl: Annotated[Seconds, Meta(description="seconds a failed key is not asked again (served stale or default)")] = 1.0
    stale_ttl: Annotated[Seconds, Meta(description="seconds past `ttl` a value may still be served when the source fails")] = 300.0
    max_entries: Annotated[int, Meta(ge=1, description="local cache size bound per worker")] = 100_000
    redis_url: Annotated[str, Meta(description="two-level: the shared Redis")] = "redis://127.0.0.1:6379/0"
    redis_ttl: Annotated[Seconds, Meta(description="two-level: seconds a found value lives in Redis")] = 900.0
    redis_not_found_ttl: Annotated[Seconds, Meta(description="two-level: seconds a not-found answer lives in Redis")] = 60.0
    redis_prefix: str = "collector:enrich:"
    namespace: Annotated[str, Meta(description="two-level: key namespace (default: the source's name, else the lookup's)")] = ""


class ResilienceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Timeout, retries, concurrency bound, circuit breaker and micro-batching of one source."""

    timeout: Annotated[float, Meta(gt=0, description="seconds one call (all its keys) may take")] = 5.0
    retries: Annotated[int, Meta(ge=0, description="more tries after a failed call")] = 2
    backoff: Annotated[float, Meta(gt=0, description="first retry waits up to this many seconds (full jitter), doubling")] = 0.05
    backoff_cap: Annotated[float, Meta(gt=0, description="longest retry wait")] = 2.0
    concurrency: Annotated[int, Meta(ge=1, description="calls in flight at once per worker")] = 64
    breaker_failures: Annotated[int, Meta(ge=0, description="consecutive failed calls that open the breaker (0: off)")] = 5
    breaker_error_rate: Annotated[float, Meta(ge=0, le=1, description="failed share of the last `breaker_window` calls that opens it (0: off)")] = 0.0
    breaker_window: Annotated[int, Meta(ge=1)] = 20
    breaker_reset: Annotated[Seconds, Meta(description="seconds open before one probe call (half-open)")] = 10.0
    linger: Annotated[Seconds, Meta(description="seconds misses wait for more keys from other chunks before a batched call")] = 0.0


def _cache() -> CacheConfig:
    return CacheConfig()


def _uncached() -> CacheConfig:
    return CacheConfig(mode="none")


class SourceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="kind"):
    """Options every source kind has."""

    name: Annotated[str, Meta(description="what enrichment steps call this source (`[[sources]]` in TOML)")] = ""
    cache: CacheConfig = msgspec.field(default_factory=_cache)
    resilience: ResilienceConfig = msgspec.field(default_factory=ResilienceConfig)
    log_not_found: Annotated[bool, Meta(description="log each key the source does not have (seed 001: log the missing player)")] = False

    def __repr__(self) -> str:
        # a DSN or a header may carry a secret: reprs (and so logs and tracebacks) hide it
        parts = []
        for f in self.__struct_fields__:
            v = getattr(self, f)
            if f in ("dsn", "url", "redis_url") and isinstance(v, str):
                v = redact_dsn(v)
            elif f == "headers" and isinstance(v, dict):
                v = {k: "***" for k in v}
            parts.append(f"{f}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class ClientSourceConfig(SourceConfig, frozen=True, tag="client"):
    """Today's path: ``client.<method>(key)`` of an object built by an import string."""

    client: Annotated[str, Meta(description="`module:attr`, an object or a no-argument factory")]
    method: str


class HttpBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Many keys per request: ``?<param>=a,b,c`` (GET) or ``{"<body_key>": [...]}`` (POST)."""

    param: str = "ids"
    separator: str = ","
    body_key: Annotated[str, Meta(description="POST a JSON body with the keys under this name instead of a query")] = ""
    max_keys: Annotated[int, Meta(ge=1)] = 100
    response_path: Annotated[str, Meta(description="dotted path to the object mapping each key to its answer")] = ""


class HttpSourceConfig(SourceConfig, frozen=True, tag="http"):
    """An HTTP service answering JSON; ``{key}`` in ``url`` is the key (URL-quoted)."""

    url: str
    method: Literal["GET", "POST"] = "GET"
    value_path: Annotated[str, Meta(description="dotted path to the value in an answer (`data.items.0.name`); empty: all of it")] = ""
    headers: dict[str, str] = {}
    batch: HttpBatch | None = None
    connections: Annotated[int, Meta(ge=1, description="connection pool size per worker")] = 32
    max_body: Annotated[int, Meta(ge=1, description="bytes an answer may have; a longer one is a failure")] = 1 << 20
    not_found_status: tuple[int, ...] = (404,)


class _SqlConfig(SourceConfig, frozen=True):
    dsn: str = ""
    dsn_env: Annotated[str, Meta(description="environment variable holding the DSN (never logged)")] = ""
    table: str = ""
    key_column: str = "id"
    columns: Annotated[tuple[str, ...], Meta(description="value columns: one gives a scalar, several a dict")] = ()
    query: Annotated[str, Meta(description="instead of table/columns: SELECT key, value... with the keys as $1 (postgres, an array) or `IN ({keys})` (mysql: one placeholder per key; sqlite: the keys as one JSON array)")] = ""
    pool_size: Annotated[int, Meta(ge=1)] = 4
    max_keys: Annotated[int, Meta(ge=1, description="keys per query")] = 1000
    cache: CacheConfig = msgspec.field(default_factory=_uncached)


class PostgresSourceConfig(_SqlConfig, frozen=True, tag="postgres"):
    """A PostgreSQL table read with asyncpg: ``WHERE key = ANY($1)``, one query per batch."""

    schema: str = "public"


class MysqlSourceConfig(_SqlConfig, frozen=True, tag="mysql"):
    """A MariaDB/MySQL table read with aiomysql: ``WHERE key IN (...)``, one query per batch."""


class SqliteSourceConfig(_SqlConfig, frozen=True, tag="sqlite"):
    """A SQLite file read on a thread of its own, read-only: ``WHERE key IN (...)``, one
    query per batch. ``dsn``: ``sqlite:///absolute/path.db`` or a plain path."""


class RedisSourceConfig(SourceConfig, frozen=True, tag="redis"):
    """Redis values: ``GET`` (one ``MGET`` per batch) or ``HGETALL`` (pipelined) of ``key_template``."""

    url: str = "redis://127.0.0.1:6379/0"
    key_template: str = "{key}"
    command: Literal["get", "hgetall"] = "get"
    json: Annotated[bool, Meta(description="GET values are JSON documents")] = False
    max_keys: Annotated[int, Meta(ge=1)] = 1000


class MapSourceConfig(SourceConfig, frozen=True, tag="map"):
    """A mapping given in Python (``data``), or a JSON object / CSV file re-read when it changes."""

    data: dict[Any, Any] | None = None
    path: str = ""
    format: Literal["auto", "json", "csv"] = "auto"
    key_column: str = "key"
    value_column: Annotated[str, Meta(description="CSV: the value column; empty: the whole row as a dict")] = ""
    check_interval: Annotated[Seconds, Meta(description="seconds between mtime checks of `path`")] = 1.0
    cache: CacheConfig = msgspec.field(default_factory=_uncached)


DEFAULT_DECIMALS = {"EUR": 2, "USD": 2, "GBP": 2, "NZD": 2, "BTC": 8}


class RatesSourceConfig(SourceConfig, frozen=True, tag="rates"):
    """FX rates in exchangerate.host's ``/latest`` format; see :mod:`collector.sources.rates`."""

    url: str = "http://127.0.0.1:8089/latest"
    target: Annotated[str, Meta(description="the currency amounts are converted to")] = "EUR"
    decimals: Annotated[dict[str, int], Meta(description="minor-unit digits per currency")] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_DECIMALS)
    )
    default_decimals: int = 2
    max_age: Annotated[Seconds, Meta(description="seconds a fetched rates table is used (seed 001: 60)")] = 60.0
    max_body: int = 1 << 20
    cache: CacheConfig = msgspec.field(default_factory=_uncached)


SourceConfigs = (
    ClientSourceConfig
    | HttpSourceConfig
    | PostgresSourceConfig
    | MysqlSourceConfig
    | SqliteSourceConfig
    | RedisSourceConfig
    | MapSourceConfig
    | RatesSourceConfig
)


class EnrichStep(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One enrichment step of a pipeline: ``event.<target>`` from source ``source`` by ``key``,
    and what an event whose lookup failed gets (the failure policy of :class:`~collector.Lookup`)."""

    source: Annotated[str, Meta(description="the `name` of a `[[sources]]` entry")]
    key: str
    target: str
    key_fields: tuple[str, ...] = ()
    name: Annotated[str, Meta(description="the lookup's name in statistics (default: the target field)")] = ""
    on_failure: Annotated[
        Policy,
        Meta(description="an event whose lookup failed: `keep` (the field keeps its default), `dead_letter` (to the "
             "dead-letter sink, not the sinks) or `hold` (ask again for up to `hold_for` s, then `then`)"),
    ] = "keep"
    on_missing: Annotated[Policy | None, Meta(description="instead of `on_failure` when the source does not have the key")] = None
    on_error: Annotated[Policy | None, Meta(description="instead of `on_failure` when the call failed (no stale value)")] = None
    log: Annotated[bool, Meta(description="log one line per event kept at its default (step, source, key, reason)")] = False
    log_rate: Annotated[float, Meta(gt=0, description="per-event log lines per second per worker; the rest are counted")] = 100.0
    hold_for: Annotated[float, Meta(gt=0, description="hold: seconds a chunk waits for the source at most")] = 5.0
    hold_retries: Annotated[int, Meta(ge=1, description="hold: times the held keys are asked again at most")] = 10
    hold_backoff: Annotated[float, Meta(gt=0, description="hold: first wait before asking again, doubling up to 2 s (equal jitter)")] = 0.1
    then: Annotated[Fallback, Meta(description="hold: what the events still unanswered get, `keep` or `dead_letter`")] = "keep"


class SourcesDoc(msgspec.Struct, frozen=True, kw_only=True):
    """The source part of a configuration document: ``[[sources]]`` and ``[[enrich]]``."""

    sources: list[SourceConfigs] = []
    enrich: list[EnrichStep] = []


def decode_sources(doc: Any) -> tuple[Any, ...]:
    """The Lookups of ``{"sources": [...], "enrich": [...]}`` (decoded TOML).

    Errors name the path (``$.sources[1]``: unknown field ``urll``) or the step whose
    source does not exist.
    """
    from ..errors import ConfigError
    from ..pipeline import Lookup

    try:
        d = msgspec.convert(doc, SourcesDoc)
    except msgspec.ValidationError as e:
        raise ConfigError(f"sources: {e}") from None
    named: dict[str, SourceConfig] = {}
    for i, src in enumerate(d.sources):
        if not src.name:
            raise ConfigError(f"sources: $.sources[{i}] needs a `name` for enrichment steps to use")
        if src.name in named:
            raise ConfigError(f"sources: $.sources[{i}].name {src.name!r} is used twice")
        named[src.name] = src
    lookups = []
    for i, step in enumerate(d.enrich):
        cfg = named.get(step.source)
        if cfg is None:
            raise ConfigError(f"sources: $.enrich[{i}].source {step.source!r} is not a source (known: {sorted(named)})")
        try:
            lookups.append(Lookup(
                name=step.name or step.target, key=step.key, target=step.target, key_fields=step.key_fields,
                source=cfg, on_failure=step.on_failure, on_missing=step.on_missing or "",
                on_error=step.on_error or "", log=step.log, log_rate=step.log_rate, hold_for=step.hold_for,
                hold_retries=step.hold_retries, hold_backoff=step.hold_backoff, then=step.then,
            ))
        except ConfigError as e:
            raise ConfigError(f"sources: {e} - at `$.enrich[{i}]`") from None
    return tuple(lookups)


def decode_source_config(obj: Any) -> SourceConfig:
    """A source config from a decoded TOML/JSON table (the error names the bad path)."""
    from ..errors import ConfigError

    try:
        cfg: SourceConfig = msgspec.convert(obj, SourceConfigs)
    except msgspec.ValidationError as e:
        raise ConfigError(f"source: {e}") from None
    return cfg
