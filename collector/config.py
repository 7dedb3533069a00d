"""The daemon's configuration: one TOML file decoded into frozen msgspec Structs.

::

    collector.toml ──tomllib──► dict ──msgspec.convert──► DaemonConfig (frozen)
                                         │ unknown key, wrong type → ConfigError naming
                                         │ its path: ``$.server.prot``, ``$.sinks[1].dsn``
                                         ▼
                     packs.build_pipeline(cfg) → Pipeline (pack + sinks + dead-letter)
                     engine_options(cfg) → Collector(**options)

Every option's description is written once, in its ``msgspec.Meta``; :func:`options_table`
renders the README's configuration table from them, so the docs cannot drift.
With no file at all the daemon runs on :func:`default_config`: the ``generic`` pack,
a JSONL sink and a dead-letter file in ``data_dir``, port 8080 on 127.0.0.1.
"""

from __future__ import annotations

import os
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .errors import ConfigError
from .sinks.config import DeadLetterConfig, JsonlSinkConfig, SinkConfig, option_row

__all__ = [
    "DaemonConfig",
    "EngineConfig",
    "LogConfig",
    "NatsIngressConfig",
    "PipelineConfig",
    "ServerConfig",
    "default_config",
    "engine_options",
    "in_dir",
    "load_config",
    "options_table",
]


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The HTTP server: address, limits, deadlines, auth."""

    host: Annotated[str, Meta(description="address to listen on")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535, description="TCP port (0: any free port, logged at start)")] = 8080
    max_body_bytes: Annotated[
        int, Meta(ge=1, description="largest request body; larger is 413, decided from Content-Length before reading "
                  "(and, for a gzip or deflate body, on the decompressed size too)")
    ] = 1 << 20
    max_batch_items: Annotated[int, Meta(ge=1, description="most events in one `POST /events/batch` (413 above)")] = 100
    max_json_depth: Annotated[
        int, Meta(ge=2, description="deepest nesting of arrays/objects in a body (400 above)")
    ] = 32
    header_timeout: Annotated[
        float, Meta(gt=0, description="seconds a client has to send a request's headers (then the connection is cut)")
    ] = 10.0
    body_timeout: Annotated[float, Meta(gt=0, description="seconds a client has to send a request's body")] = 30.0
    keepalive_timeout: Annotated[float, Meta(gt=0, description="seconds an idle keep-alive connection stays open")] = 75.0
    max_connections: Annotated[
        int, Meta(ge=1, description="open connections at most; above, new ones get 503 and are closed")
    ] = 2048
    retry_after: Annotated[int, Meta(ge=1, description="`Retry-After` seconds sent with 503 when overloaded")] = 1
    auth_tokens: Annotated[
        list[str], Meta(description="bearer tokens accepted on ingest (`Authorization: Bearer …`); empty: no auth")
    ] = msgspec.field(default_factory=list)
    auth_tokens_env: Annotated[
        str | None,
        Meta(description="environment variable holding comma-separated bearer tokens (added to `auth_tokens`)"),
    ] = None


class EngineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The engine under the server: workers, bounds, timeouts (``Collector`` options)."""

    workers: Annotated[int, Meta(ge=0, description="worker processes (0: one per CPU)")] = 0
    max_inflight: Annotated[
        int, Meta(ge=1, description="events accepted and not yet stored; above it ingest answers 503 + Retry-After")
    ] = 200_000
    chunk_size: Annotated[int, Meta(ge=1, description="events per chunk sent to a worker")] = 2048
    window: Annotated[int, Meta(ge=1, description="chunks in flight per worker")] = 16
    heartbeat_timeout: Annotated[
        float, Meta(gt=0, description="a worker silent this long is killed and replaced")
    ] = 10.0
    coalesce_ops: Annotated[
        int,
        Meta(ge=0, description="engine operations the HTTP server keeps running at once; requests that "
             "arrive meanwhile wait (20 ms at most) and go together in the next (0: one per loop turn, no "
             "bound; 2 cuts the single-event p99 at half load by a third for 3-5 % of the maximum rate, see "
             "docs/performance.md)"),
    ] = 2
    shutdown_timeout: Annotated[
        float, Meta(gt=0, description="seconds SIGTERM may spend finishing requests and draining before exit")
    ] = 30.0
    cpus: Annotated[
        list[int] | None,
        Meta(description="CPUs the workers are pinned to, worker i on `cpus[i % len(cpus)]`; `[]`: not pinned "
             "(the kernel places them: faster HTTP ingest when there are no more CPUs than workers, see "
             "docs/performance.md); null: the CPUs the daemon may run on, one per worker"),
    ] = None


class PipelineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which pipeline the daemon runs."""

    pack: Annotated[
        str,
        Meta(description="a registered pack (`generic`: seed 004; `playback`: seed 000) or an import string "
             "`module:attr` of a Pipeline or a factory"),
    ] = "generic"
    enrich_latency: Annotated[
        float, Meta(ge=0, description="registered packs: latency of the built-in simulated enrichment service, seconds")
    ] = 0.005
    client: Annotated[
        str | None,
        Meta(description="registered packs: `module:factory` building the enrichment client (generic: has "
             "`get_segment(user_id)`; playback: `get_region(user_id)`, `get_model(device_type)`)"),
    ] = None
    dedup_ttl: Annotated[
        float, Meta(ge=0, description="generic pack: seconds an event id is remembered for duplicate detection")
    ] = 600.0
    dedup_max: Annotated[
        int,
        Meta(ge=1, description="generic pack: the most event ids each worker remembers (the oldest are forgotten "
             "first; ~48 bytes each in the C table, see docs/stateful-stages.md)"),
    ] = 1_000_000
    dedup_wait: Annotated[
        float,
        Meta(ge=0, description="generic pack: seconds a repeated id waits for its original to be stored "
             "before it is answered `failed` (503, retry later)"),
    ] = 30.0
    dedup_count_by: Annotated[
        str | None,
        Meta(description="generic pack: count duplicates per value of this field (`type`): "
             "`collector_duplicates_total{type=...}` and `integrity` in `/metrics`; null: not counted"),
    ] = None
    cache_ttl: Annotated[float, Meta(ge=0, description="registered packs: seconds an enrichment answer is cached")] = 300.0
    options: Annotated[
        dict[str, typing.Any],
        Meta(description="`[pipeline.options]`: the pack's own settings, checked by the pack (casino: "
             "`rates_url`, `rates_max_age`, `players_dsn`, `players_dsn_env`, `players_schema`, `stdout`)"),
    ] = msgspec.field(default_factory=dict)


class LogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Logging: JSON lines on stderr."""

    level: Annotated[
        typing.Literal["debug", "info", "warning", "error"], Meta(description="least severe level logged")
    ] = "info"
    stats_interval: Annotated[
        float, Meta(ge=0, description="seconds between `stats` log lines with the event counts (0: none)")
    ] = 60.0


class NatsIngressConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The JetStream source: where to read, how the stream and consumer are made, the bounds.

    The daemon's ``[source]`` table; :mod:`collector.ingress.nats` consumes it.
    """

    kind: Annotated[Literal["nats"], Meta(description="the source kind (only `nats`: a JetStream pull consumer)")] = "nats"
    url: Annotated[str, Meta(description="server URL(s), comma-separated")] = "nats://127.0.0.1:4222"
    stream: Annotated[str, Meta(description="stream name")] = "EVENTS"
    subjects: Annotated[
        list[str], Meta(description="subjects the stream captures (and the consumer reads) when they are created")
    ] = msgspec.field(default_factory=lambda: ["events.>"])
    durable: Annotated[
        str, Meta(description="durable consumer name: collectors sharing it share the messages")
    ] = "collector"
    stream_subjects: Annotated[
        list[str],
        Meta(description="subjects the stream captures when this collector creates it (empty: `subjects`); "
             "partitions: `subjects = [\"clickstream.*.0\"]`, `stream_subjects = [\"clickstream.>\"]`"),
    ] = msgspec.field(default_factory=list)
    connect_timeout: Annotated[
        float, Meta(gt=0, description="seconds to reach the server at start (later outages are retried for ever)")
    ] = 10.0
    batch: Annotated[int, Meta(ge=1, description="messages per fetch (one engine operation)")] = 256
    max_batches: Annotated[int, Meta(ge=1, description="fetched batches not yet settled, at most")] = 4
    fetchers: Annotated[int, Meta(ge=1, description="fetch requests outstanding at once (one subscription each)")] = 2
    fetch_timeout: Annotated[float, Meta(gt=0, description="seconds one fetch waits for messages")] = 1.0
    create: Annotated[
        bool, Meta(description="create the stream and the consumer when missing (existing ones are used as they are)")
    ] = True
    retention: Annotated[
        Literal["limits", "workqueue", "interest"],
        Meta(description="stream retention when created: `limits` keeps messages for `max_age`; `workqueue` "
             "deletes a message once acknowledged"),
    ] = "limits"
    max_age: Annotated[float, Meta(ge=0, description="stream: seconds a message is kept (0: no limit)")] = 7 * 86400.0
    duplicate_window: Annotated[
        float, Meta(gt=0, description="stream: seconds a `Nats-Msg-Id` is remembered (a repeated id is dropped)")
    ] = 120.0
    ack_wait: Annotated[
        float, Meta(gt=0, description="consumer: seconds before an unacknowledged delivery is delivered again")
    ] = 30.0
    max_deliver: Annotated[
        int, Meta(ge=1, description="deliveries of a message before it is terminated and dead-lettered (poison)")
    ] = 5
    max_ack_pending: Annotated[
        int, Meta(ge=1, description="consumer: delivered and unacknowledged messages at most (backpressure)")
    ] = 20_000
    nak_delay: Annotated[float, Meta(ge=0, description="seconds before a nakked message is delivered again")] = 1.0
    work_timeout: Annotated[
        float,
        Meta(ge=0, description="seconds a fetched batch may wait for its sinks before its messages are nakked "
             "(0: no limit; they stay in progress while the sinks retry, and are delivered again only if this "
             "collector dies)"),
    ] = 0.0
    lag_interval: Annotated[float, Meta(gt=0, description="seconds between consumer-lag (`num_pending`) reads")] = 1.0
    drain_timeout: Annotated[float, Meta(gt=0, description="seconds `stop()` waits for batches in flight")] = 30.0
    deadletter: Annotated[
        str | None,
        Meta(description="dead-letter file of the ingress (default: the pipeline's, `{worker}` → `nats`; "
             "without either, dead letters are logged)"),
    ] = None


class DaemonConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole daemon configuration (the top level of the TOML file)."""

    data_dir: Annotated[
        str,
        Meta(description="folder for relative sink paths (default: `$STATE_DIRECTORY` under systemd, else `./collector-data`)"),
    ] = ""
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    sinks: Annotated[
        list[SinkConfig],
        Meta(description="`[[sinks]]` tables (see Sinks); none: one JSONL sink `events-{worker}.jsonl` in `data_dir`"),
    ] = msgspec.field(default_factory=list)
    deadletter: Annotated[
        DeadLetterConfig | None,
        Meta(description="`[deadletter]` table; default: `deadletter-{worker}.jsonl` in `data_dir`"),
    ] = None
    source: Annotated[
        NatsIngressConfig | None,
        Meta(description="`[source]` table: also consume a NATS JetStream stream (see NATS JetStream); "
             "`collector serve --source nats://…` sets it"),
    ] = None
    sources: Annotated[
        list[dict[str, Any]],
        Meta(description="`[[sources]]` tables: enrichment sources, each with a `name` and a `kind` (see Enrichment "
             "sources); checked when the pipeline is built"),
    ] = msgspec.field(default_factory=list)
    enrich: Annotated[
        list[dict[str, Any]],
        Meta(description="`[[enrich]]` steps (`source`, `key`, `key_fields`, `target`, `name`): each adds a lookup "
             "of a named source to the pack's pipeline, `target` a field of its event type; `on_failure` (`keep`, "
             "`dead_letter`, `hold`), `on_missing`, `on_error`, `log`, `hold_for`, `then`: its failure policy "
             "(docs/sources.md)"),
    ] = msgspec.field(default_factory=list)

    stages: Annotated[
        list[dict[str, Any]],
        Meta(description="`[[stages]]` tables: stages added after the pack's (`kind` = `dedup`, `filter`, "
             "`enrich`, `render`, `aggregate`, `pair`, `gaps`, `auth` or `module:attr`, then the stage's fields; "
             "`aggregate` and `pair`: the stage options table); checked when the pipeline is built"),
    ] = msgspec.field(default_factory=list)
    rules: Annotated[
        list[dict[str, Any]],
        Meta(description="`[[rules]]` tables: filter rules (`name`, `when`, `action`, ...; see docs/rules.md) run as "
             "one `Rules` stage named `rules` after the pack's stages; checked when the pipeline is built"),
    ] = msgspec.field(default_factory=list)

    def resolved_data_dir(self) -> Path:
        """``data_dir``, or ``$STATE_DIRECTORY`` (systemd), or ``./collector-data``; absolute."""
        d = self.data_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "collector-data"
        return Path(d).expanduser().resolve()

    def tokens(self) -> frozenset[str]:
        """Every accepted bearer token (config and environment)."""
        toks = set(self.server.auth_tokens)
        env = self.server.auth_tokens_env
        if env:
            toks.update(t.strip() for t in os.environ.get(env, "").split(",") if t.strip())
        return frozenset(toks)


def default_config() -> DaemonConfig:
    """The embedded defaults (no file)."""
    return DaemonConfig()


def _path_error(e: msgspec.ValidationError, where: str) -> ConfigError:
    msg = str(e)
    return ConfigError(f"{where}: {msg}; see `collector check-config --help` or the README's configuration table")


def decode_config(obj: Any, where: str = "config") -> DaemonConfig:
    """A :class:`DaemonConfig` from a dict (as TOML gives it); errors name the path."""
    try:
        return msgspec.convert(obj, DaemonConfig)
    except msgspec.ValidationError as e:
        raise _path_error(e, where) from None


def load_config(path: str | os.PathLike[str] | None) -> DaemonConfig:
    """Read and validate a TOML file; ``None`` gives the embedded defaults."""
    if path is None:
        return default_config()
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
    try:
        obj = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    cfg = decode_config(obj, str(p))
    _check(cfg, str(p))
    return cfg


def _check(cfg: DaemonConfig, where: str) -> None:
    """Cross-field checks msgspec cannot express."""
    names = [s.name for s in cfg.sinks if s.name]
    if len(names) != len(set(names)):
        raise ConfigError(f"{where}: `$.sinks`: sink names must be unique (got {names})")


def in_dir(path: str, data_dir: Path | str | None) -> str:
    """``path`` placed in ``data_dir`` when it is relative (and a data directory is given)."""
    return path if data_dir is None or os.path.isabs(path) else os.path.join(str(data_dir), path)


def resolved_sinks(cfg: DaemonConfig) -> tuple[tuple[SinkConfig, ...], DeadLetterConfig]:
    """The sinks and dead-letter sink with relative file paths placed in ``data_dir``."""
    d = cfg.resolved_data_dir()
    sinks: list[SinkConfig] = list(cfg.sinks) or [JsonlSinkConfig(name="events", path="events-{worker}.jsonl")]
    out: list[SinkConfig] = []
    for s in sinks:
        p = getattr(s, "path", None)
        if isinstance(p, str) and s.kind in ("jsonl", "sqlite"):
            s = msgspec.structs.replace(s, path=in_dir(p, d))
        out.append(s)
    dl = cfg.deadletter or DeadLetterConfig(path="deadletter-{worker}.jsonl")
    dl = msgspec.structs.replace(dl, path=in_dir(dl.path, d))
    return tuple(out), dl


def engine_options(cfg: DaemonConfig) -> dict[str, Any]:
    """Keyword arguments for :class:`~collector.Collector` from ``[engine]``."""
    e = cfg.engine
    return {
        "workers": e.workers or None,
        "max_inflight": e.max_inflight,
        "chunk_size": e.chunk_size,
        "window": e.window,
        "heartbeat_timeout": e.heartbeat_timeout,
        "shutdown_timeout": e.shutdown_timeout,
        "cpus": e.cpus,
    }


def options_table() -> str:
    """Every daemon option (not the sinks: see ``collector.sinks.options_table``) as markdown."""
    rows = ["| section | option | type | default | description |", "|---|---|---|---|---|"]
    sections: list[tuple[str, Any]] = [
        ("top level", DaemonConfig),
        ("`[server]`", ServerConfig),
        ("`[engine]`", EngineConfig),
        ("`[pipeline]`", PipelineConfig),
        ("`[log]`", LogConfig),
        ("`[source]`", NatsIngressConfig),
    ]
    tables = {"sinks": "array of tables", "deadletter": "table", "source": "table", "sources": "array of tables",
              "enrich": "array of tables", "rules": "array of tables", "stages": "array of tables"}
    for label, cls in sections:
        for f in msgspec.structs.fields(cls):
            if f.name not in ("server", "engine", "pipeline", "log"):
                rows.append(option_row(cls, f, label, tables.get(f.name)))
    return "\n".join(rows) + "\n"
