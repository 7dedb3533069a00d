"""Sink configuration: frozen msgspec Structs, one per ``kind``, decoded from TOML.

A daemon config's ``[[sinks]]`` tables decode into :data:`SinkConfig` (a tagged union
on ``kind``) and ``[deadletter]`` into :class:`DeadLetterConfig`::

    [[sinks]]
    kind = "postgres"
    dsn_env = "PG_DSN"          # the DSN is read from the environment, never logged
    table = "events"

Every option's description is written once, in its ``msgspec.Meta`` annotation;
:func:`options_table` renders them as the README's markdown table. Unknown keys are
errors that name their path (``$.sinks[1].tabel``) because every struct forbids them.
"""

from __future__ import annotations

import os
import re
import typing
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec
from msgspec import Meta

from ..errors import ConfigError

__all__ = [
    "ClickhouseSinkConfig",
    "DeadLetterConfig",
    "JsonlSinkConfig",
    "MysqlSinkConfig",
    "NatsSinkConfig",
    "PostgresSinkConfig",
    "SinkConfig",
    "SqliteSinkConfig",
    "StdoutSinkConfig",
    "decode_sink_config",
    "options_table",
    "redact_dsn",
    "redact_urls",
]

_IDENT = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"  # SQL identifiers are interpolated: keep them plain
_FIELD = r"\{[A-Za-z_][A-Za-z0-9_]*\}"
# a table name, or a template of one: `{field}` is the event's top-level field (collector.sinks.tables)
_TABLE = rf"^(?:[A-Za-z_]|{_FIELD})(?:[A-Za-z0-9_]|{_FIELD}){{0,126}}$"
TableName = Annotated[
    str,
    Meta(
        pattern=_TABLE,
        description="table name, or a template of one: `{field}` is replaced by the event's top-level field "
        "(`cs_{event}`: a table per event type, each created on first use if `create_table`); an event whose "
        "name is not a plain identifier (`[A-Za-z_][A-Za-z0-9_]{0,62}`) is dead-lettered",
    ),
]

Name = Annotated[
    str | None,
    Meta(description="name used in logs, metrics and dead-letter records (default: `<kind>[<index>]`)"),
]
Retries = Annotated[
    int,
    Meta(
        ge=-1,
        description="retries of a failed chunk before it goes to the dead-letter sink; -1 retries forever "
        "(without a dead-letter sink a sink always retries forever: nothing is dropped)",
    ),
]
Backoff = Annotated[float, Meta(gt=0, description="first retry delay in seconds; doubles per retry (each delay drawn from [d/2, d]: jitter)")]
BackoffMax = Annotated[float, Meta(gt=0, description="longest retry delay in seconds")]
Timeout = Annotated[float, Meta(gt=0, description="seconds one write attempt may take before it counts as failed")]
Default = Annotated[
    bool,
    Meta(description="take the events no `route` rule sent to named sinks (a routed event goes only to the sinks "
         "its rules name); false: only the events routed here (see docs/rules.md)"),
]
When = Annotated[
    dict[str, Any] | None,
    Meta(description="a condition in the rules' form (`{ path = \"type\", eq = \"page_view\" }`): of the events no "
         "`route` rule sent to named sinks, this sink takes those it selects (with `default` true); an event no "
         "sink takes is dead-lettered"),
]


class _SinkBase(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind"):
    """Options every sink has: its name and its retry policy."""

    name: Name = None
    retries: Retries = 10
    backoff: Backoff = 0.05
    backoff_max: BackoffMax = 5.0
    timeout: Timeout = 30.0
    default: Default = True
    when: When = None

    def __repr__(self) -> str:
        # a DSN may carry a password: reprs (and so logs, tracebacks) show it redacted
        parts = []
        for f in self.__struct_fields__:
            v = getattr(self, f)
            if f == "dsn" and isinstance(v, str):
                v = redact_dsn(v)
            parts.append(f"{f}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    @property
    def kind(self) -> str:
        """The ``kind`` tag of this config."""
        tag = self.__struct_config__.tag
        assert isinstance(tag, str)
        return tag


class StdoutSinkConfig(_SinkBase, frozen=True, forbid_unknown_fields=True, tag="stdout"):
    """One JSON object per line on standard output, with the event's own keys."""


FsyncPolicy = Literal["never", "batch", "always"]


class JsonlSinkConfig(_SinkBase, frozen=True, forbid_unknown_fields=True, tag="jsonl"):
    """JSON lines in a file, rotated by size and age."""

    path: Annotated[
        str,
        Meta(
            description="file to append to; `{worker}` in it becomes the worker index "
            "(one file per worker; without it, workers share the file under a lock)"
        ),
    ] = "events.jsonl"
    max_bytes: Annotated[
        int, Meta(ge=0, description="rotate when the file reaches this many bytes (0: never)")
    ] = 256 << 20
    max_age: Annotated[
        float, Meta(ge=0, description="rotate a file this many seconds after it was opened (0: never)")
    ] = 0.0
    fsync: Annotated[
        FsyncPolicy,
        Meta(
            description="`never` (written to the OS: survives a crash of the process, not of the machine), "
            "`batch` (fdatasync once per group of concurrent chunks before they are acknowledged), "
            "`always` (fsync after every chunk, and the directory on create/rotate)"
        ),
    ] = "batch"


class SqliteSinkConfig(_SinkBase, frozen=True, forbid_unknown_fields=True, tag="sqlite"):
    """An embedded SQLite database in WAL mode; one transaction per group of chunks (all their tables)."""

    path: Annotated[str, Meta(description="database file")] = "collector.db"
    table: TableName = "events"
    synchronous: Annotated[
        Literal["NORMAL", "FULL"],
        Meta(
            description="`NORMAL` (WAL: a commit survives a process crash; the last commits can be "
            "lost on power loss) or `FULL` (fsync of the WAL on every commit: survives power loss)"
        ),
    ] = "NORMAL"
    busy_timeout: Annotated[
        float, Meta(ge=0, description="seconds to wait for another writer's lock before the attempt fails")
    ] = 10.0
    create_table: Annotated[bool, Meta(description="run the table migration when the sink opens")] = True


class PostgresSinkConfig(_SinkBase, frozen=True, forbid_unknown_fields=True, tag="postgres"):
    """PostgreSQL through asyncpg: COPY into a staging table, then an idempotent insert."""

    dsn: Annotated[
        str | None,
        Meta(description="connection URL (`postgresql://user:pass@host:port/db`); prefer `dsn_env`"),
    ] = None
    dsn_env: Annotated[
        str | None, Meta(description="name of the environment variable holding the DSN (wins over `dsn`)")
    ] = None
    table: Annotated[str, Meta(pattern=_IDENT, description="table name (created if missing)")] = "events"
    schema: Annotated[str, Meta(pattern=_IDENT, description="schema of the table")] = "public"
    pool_size: Annotated[int, Meta(ge=1, description="connections in the pool of each worker")] = 4
    create_table: Annotated[bool, Meta(description="run the table migration when the sink opens")] = True


class MysqlSinkConfig(_SinkBase, frozen=True, forbid_unknown_fields=True, tag="mysql"):
    """MariaDB/MySQL through aiomysql into seed 004's ``processed_events`` table."""

    dsn: Annotated[
        str | None, Meta(description="connection URL (`mysql://user:pass@host:port/db`); prefer `dsn_env`")
    ] = None
    dsn_env: Annotated[
        str | None, Meta(description="name of the environment variable holding the DSN (wins over `dsn`)")
    ] = None
    table: Annotated[str, Meta(pattern=_IDENT, description="table name (created if missing)")] = "processed_events"
    pool_size: Annotated[int, Meta(ge=1, description="connections in the pool of each worker")] = 4
    rows_per_insert: Annotated[
        int, Meta(ge=1, description="rows per multi-row `INSERT IGNORE` statement")
    ] = 1000
    default_type: Annotated[
        str | None,
        Meta(description="`type` for events without a `type` field (`user_action`, `sensor_data`, `system_log`)"),
    ] = None
    default_source: Annotated[
        str | None, Meta(description="`source` for events without a `source` field")
    ] = None
    create_table: Annotated[bool, Meta(description="run the table migration when the sink opens")] = True


class NatsSinkConfig(_SinkBase, frozen=True, forbid_unknown_fields=True, tag="nats"):
    """NATS JetStream: each event (or chunk) published with its id as `Nats-Msg-Id`; PubAcks awaited."""

    url: Annotated[
        str, Meta(description="server URL(s), comma-separated (`nats://host:4222`); prefer `url_env` if it holds a token")
    ] = "nats://127.0.0.1:4222"
    url_env: Annotated[
        str | None, Meta(description="name of the environment variable holding the URL (wins over `url`)")
    ] = None
    subject: Annotated[
        str,
        Meta(
            description="subject template: `{field}` is replaced by the event's top-level field "
            "(`events.{type}`: keyed by event type), `{field:pN}` by its partition out of N (0..N-1, FNV-1a: "
            "one key, one partition); the stream must capture these subjects"
        ),
    ] = "events.{type}"
    mode: Annotated[
        Literal["event", "chunk"],
        Meta(
            description="`event`: one message per event, `Nats-Msg-Id` = the event id; `chunk`: one NDJSON "
            "message per subject and chunk, id = a hash of its event ids"
        ),
    ] = "event"
    stream: Annotated[
        str | None, Meta(description="expected stream name (`Nats-Expected-Stream`): a publish to another stream fails")
    ] = None
    max_pending: Annotated[
        int, Meta(ge=1, description="published messages awaiting their PubAck at most, per worker")
    ] = 4096


class ClickhouseSinkConfig(_SinkBase, frozen=True, forbid_unknown_fields=True, tag="clickhouse"):
    """ClickHouse over its HTTP interface (aiohttp): one `INSERT ... FORMAT JSONEachRow` per table and chunk."""

    url: Annotated[
        str, Meta(description="HTTP interface URL (`http://host:8123`); prefer `url_env`")
    ] = "http://127.0.0.1:8123"
    url_env: Annotated[
        str | None, Meta(description="name of the environment variable holding the URL (wins over `url`)")
    ] = None
    database: Annotated[str, Meta(pattern=_IDENT, description="database of the tables (created if missing)")] = "default"
    table: TableName = "events"
    user: Annotated[str | None, Meta(description="user (HTTP basic auth); none: the server's default user")] = None
    password_env: Annotated[
        str | None, Meta(description="name of the environment variable holding the user's password")
    ] = None
    connections: Annotated[
        int,
        Meta(
            ge=1,
            description="HTTP connections (rounds of inserts in flight) of each worker; chunks that arrive "
            "meanwhile are merged into the next round (fewer, larger inserts are faster)",
        ),
    ] = 1
    create_table: Annotated[
        bool, Meta(description="create the database and tables (`ReplacingMergeTree` on `id`) when first used")
    ] = True


SinkConfig = (
    StdoutSinkConfig
    | JsonlSinkConfig
    | SqliteSinkConfig
    | PostgresSinkConfig
    | MysqlSinkConfig
    | NatsSinkConfig
    | ClickhouseSinkConfig
)
"""Any sink's configuration; decodes from a table whose ``kind`` picks the type."""

SINK_KINDS: tuple[type[_SinkBase], ...] = typing.get_args(SinkConfig)
"""Every sink config class, in the order of the union."""


class DeadLetterConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The dead-letter sink: JSON lines of events that could not be handled or stored."""

    path: Annotated[
        str,
        Meta(description="JSON-lines file; `{worker}` in it becomes the worker index"),
    ] = "deadletter.jsonl"
    fsync: Annotated[
        FsyncPolicy, Meta(description="fsync policy, as for the jsonl sink")
    ] = "batch"
    max_bytes: Annotated[
        int, Meta(ge=0, description="rotate at this size (0: never)")
    ] = 0


def decode_sink_config(obj: Any, path: str = "$") -> SinkConfig:
    """One sink config from a dict (as TOML or JSON gives it); errors name the path."""
    try:
        return msgspec.convert(obj, SinkConfig)
    except msgspec.ValidationError as e:
        msg = str(e)
        msg = msg.replace("`$", f"`{path}", 1) if "`$" in msg else f"{msg} - at `{path}`"
        raise ConfigError(f"sink config: {msg}") from None


_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]+:)[^@\s]*@")


def redact_urls(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it replaced by ``***``."""
    return _PASSWORD_IN_URL.sub(r"\1***@", text)


def redact_dsn(dsn: str) -> str:
    """``dsn`` with its password (and any ``password=`` query value) replaced by ``***``."""
    try:
        u = urlsplit(dsn)
    except ValueError:
        return redact_urls(dsn)
    netloc = u.netloc
    if u.password is not None:
        host = netloc.rpartition("@")[2]
        netloc = f"{u.username or ''}:***@{host}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", u.query)
    return urlunsplit((u.scheme, netloc, u.path, query, u.fragment))


def resolve_dsn(cfg: PostgresSinkConfig | MysqlSinkConfig, default: str | None = None) -> str:
    """The DSN of a SQL sink: ``$<dsn_env>``, else ``dsn``, else ``default``."""
    if cfg.dsn_env:
        v = os.environ.get(cfg.dsn_env)
        if v:
            return v
        if cfg.dsn is None and default is None:
            raise ConfigError(f"{cfg.kind} sink: environment variable {cfg.dsn_env!r} is not set")
    dsn = cfg.dsn or default
    if not dsn:
        raise ConfigError(f"{cfg.kind} sink: set `dsn` or `dsn_env`")
    return dsn


def _describe(tp: Any) -> tuple[str, str]:
    """(type text, description) of an annotation."""
    desc = ""
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        for m in extras:
            if isinstance(m, msgspec.Meta) and m.description:
                desc = m.description
        tp = base
    if typing.get_origin(tp) is Literal:
        text = " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    else:
        text = getattr(tp, "__name__", None) or str(tp).replace("|", "\\|")
        text = text.replace("NoneType", "None").replace("typing.", "")
        text = f"`{text}`"
    return text, desc


def option_row(cls: Any, field: msgspec.structs.FieldInfo, label: str, type_text: str | None = None) -> str:
    """One markdown row (label, option, type, default, description) of a config Struct field.

    The README's option tables (sinks here, the daemon's in ``collector.config``) are
    made of these rows, so each option's description is written once, in its Meta.
    """
    text, desc = _describe(typing.get_type_hints(cls, include_extras=True)[field.name])
    if field.default is not msgspec.NODEFAULT:
        d = field.default
    elif field.default_factory is not msgspec.NODEFAULT:
        d = field.default_factory()
    else:
        d = msgspec.NODEFAULT
    dtext = "required" if d is msgspec.NODEFAULT else f"`{msgspec.json.encode(d).decode()}`"
    return f"| {label} | `{field.name}` | {type_text or text} | {dtext} | {desc} |"


def options_table() -> str:
    """The options of every sink kind and of the dead-letter sink, as a markdown table."""
    rows = ["| sink | option | type | default | description |", "|---|---|---|---|---|"]
    classes: list[Any] = [*SINK_KINDS, DeadLetterConfig]
    for cls in classes:
        kind = cls.__struct_config__.tag if cls is not DeadLetterConfig else "deadletter"
        for f in msgspec.structs.fields(cls):
            # the retry options are the same on every sink: listed once, under "all"
            common = f.name in _SinkBase.__struct_fields__
            if common and cls is not SINK_KINDS[0] and cls is not DeadLetterConfig:
                continue
            rows.append(option_row(cls, f, "all" if common else f"`{kind}`"))
    return "\n".join(rows) + "\n"
