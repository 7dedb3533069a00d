"""Sinks: where committed events go (issue 5).

::

    worker ─► SinkSet.commit(events) ─┬─► stdout    JSON lines on standard output
                                      ├─► jsonl     rotated JSON-lines files, fsync policy
                                      ├─► sqlite    embedded default (WAL, stdlib, on a thread, group commit)
                                      ├─► postgres  asyncpg binary COPY (via staging + ON CONFLICT after a conflict)
                                      ├─► mysql     aiomysql multi-row INSERT IGNORE (seed 004 table)
                                      ├─► nats      JetStream publish, Nats-Msg-Id = event id, PubAcks awaited
                                      └─► clickhouse HTTP INSERT ... FORMAT JSONEachRow, ReplacingMergeTree on id
           SinkSet.reject(records) ───► deadletter  JSON lines: payload, reason, path, stage, time

Sinks are configured with the frozen structs of :mod:`collector.sinks.config` (a
tagged union on ``kind``); :data:`SINKS` maps each ``kind`` to its class, loaded
through :func:`collector.registry.load`. The contract is :mod:`.base`, the fan-out
and retry :mod:`.sinkset`, group commit :mod:`.batching`. The worker calls::

    sinkset = build_sinkset(configs, deadletter=..., event_type=T, id_field="id", slot=slot, worker=i)
    await sinkset.open(); await sinkset.commit(events); await sinkset.close()

``commit`` returns only when every sink holds the chunk (or a sink spent its retry
budget and the chunk went to the dead-letter sink); outages are retried with
backoff and jitter and never raise. Drivers are imported only when their sink is
built; a missing one names the extra to install.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from .. import registry
from ..errors import ConfigError
from .base import Batch, DeadLetter, EventCodec, Sink, default_name
from .config import (
    ClickhouseSinkConfig,
    DeadLetterConfig,
    JsonlSinkConfig,
    MysqlSinkConfig,
    NatsSinkConfig,
    PostgresSinkConfig,
    SinkConfig,
    SqliteSinkConfig,
    StdoutSinkConfig,
    decode_sink_config,
    options_table,
)
from .sinkset import SinkSet

# a sink kind → "module:attr" of its class (imported only when a sink of that kind is
# built); a new kind is one module and one line here
SINKS = {
    "stdout": "collector.sinks.files:StdoutSink",
    "jsonl": "collector.sinks.files:JsonlSink",
    "sqlite": "collector.sinks.sqlite:SqliteSink",
    "postgres": "collector.sinks.postgres:PostgresSink",
    "mysql": "collector.sinks.mysql:MysqlSink",
    "nats": "collector.sinks.nats:NatsSink",
    "clickhouse": "collector.sinks.clickhouse:ClickhouseSink",
}

__all__ = [
    "SINKS",
    "Batch",
    "ClickhouseSinkConfig",
    "DeadLetter",
    "DeadLetterConfig",
    "JsonlSinkConfig",
    "MysqlSinkConfig",
    "NatsSinkConfig",
    "PostgresSinkConfig",
    "Sink",
    "SinkConfig",
    "SinkSet",
    "SqliteSinkConfig",
    "StdoutSinkConfig",
    "build_sink",
    "build_sinkset",
    "decode_sink_config",
    "options_table",
    "sink_names",
]


def sink_names(pipeline: Any) -> list[str]:
    """The name behind each ``SinkStats.index`` of ``pipeline``: its sinks, then ``deadletter``.

    ``pipeline`` is a :class:`collector.Pipeline` (anything with ``sinks`` and
    ``deadletter``); dict configs are decoded as the worker decodes them.
    """
    names = []
    for i, c in enumerate(pipeline.sinks):
        cfg = c if not isinstance(c, dict) else decode_sink_config(c, f"$.sinks[{i}]")
        names.append(default_name(cfg, i))
    if pipeline.deadletter is not None:
        names.append("deadletter")
    return names


def build_sink(cfg: SinkConfig, *, index: int, codec: EventCodec, worker: int) -> Sink:
    """The running sink for one config (imports its driver now)."""
    kind = getattr(cfg, "kind", None)
    if not isinstance(kind, str):
        raise ConfigError(f"sinks[{index}]: not a sink config: {cfg!r}")
    cls = registry.load(SINKS, kind, "sink")
    sink: Sink = cls(cfg, name=default_name(cfg, index), codec=codec, worker=worker)
    return sink


def build_sinkset(
    configs: Sequence[SinkConfig | dict[str, Any]],
    *,
    deadletter: DeadLetterConfig | dict[str, Any] | None = None,
    event_type: type[msgspec.Struct] | None = None,
    id_field: str | None = "id",
    slot: Any = None,
    worker: int = 0,
) -> SinkSet:
    """The sinks of one worker. ``configs`` may also be plain dicts (decoded here).

    ``slot`` is the worker's :class:`collector.stats.Slot`; sink ``i`` accounts its
    rows, batches, errors, retries and last commit latency under index ``i`` and the
    dead-letter sink under ``len(configs)``. With no configs and no dead-letter sink
    every call is a cheap no-op.
    """
    from ..stats import MAX_SINKS

    cfgs = [c if not isinstance(c, dict) else decode_sink_config(c, f"$.sinks[{i}]") for i, c in enumerate(configs)]
    if len(cfgs) + (deadletter is not None) > MAX_SINKS:
        raise ConfigError(f"at most {MAX_SINKS} sinks (dead-letter included) per pipeline (got {len(cfgs)})")
    codec = EventCodec(event_type, id_field)
    sinks = [build_sink(c, index=i, codec=codec, worker=worker) for i, c in enumerate(cfgs)]
    names = [s.name for s in sinks]
    dups = {n for n in names if names.count(n) > 1}
    if dups:
        raise ConfigError(f"sinks: names must be unique (repeated: {sorted(dups)})")
    dl = None
    if deadletter is not None:
        if isinstance(deadletter, dict):
            try:
                deadletter = msgspec.convert(deadletter, DeadLetterConfig)
            except msgspec.ValidationError as e:
                raise ConfigError(f"deadletter config: {e}") from None
        from .files import DeadLetterSink

        dl = DeadLetterSink(deadletter, name="deadletter", codec=codec, worker=worker)
    return SinkSet(sinks, dl, codec, slot, worker)
