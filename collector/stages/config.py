"""Configuration Structs of the stateful stages, so ``[[stages]]`` tables can declare them.

``kind = "aggregate"`` decodes into :class:`AggregateConfig` (its ``window`` a
:class:`WindowConfig`, tagged on ``kind``: ``global``, ``tumbling``, ``hopping``,
``sliding``), ``kind = "pair"`` into :class:`PairConfig`; ``collector.stages.build_stage``
then makes the stage (``Aggregate.from_config``, ``Pair.from_config``; each names its
Struct in ``config_struct``, so a ``module:attr`` kind of either decodes the same). Every Struct
forbids unknown fields and bounds its numbers, so a typo or a bad value fails
``collector check-config`` with its path (``$.stages[0].window.size``)::

    [[stages]]
    kind = "aggregate"
    name = "per_minute"
    fn = "sum"
    value = "amount_eur"
    by = ["type", "currency"]
    where = { type = "bet" }
    window = { kind = "tumbling", size = 60, time_field = "created_at", lateness = 10 }

Layer 1 (msgspec only): the stages import this module, never the reverse.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ..sinks.config import option_row

__all__ = [
    "WINDOWS",
    "AggregateConfig",
    "GlobalWindowConfig",
    "HoppingWindowConfig",
    "PairConfig",
    "SlidingWindowConfig",
    "TumblingWindowConfig",
    "WindowConfig",
    "options_table",
]

Positive = Annotated[float, Meta(gt=0)]
Seconds = Annotated[float, Meta(ge=0)]


class _WindowBase(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="kind"):
    time_field: Annotated[
        str | None,
        Meta(description="event time: the field holding epoch seconds or ISO 8601 (naive: UTC); null: processing "
             "time (the stage's clock, once per chunk)"),
    ] = None
    lateness: Annotated[Seconds, Meta(description="seconds after its end a window still takes events (later: `late`)")] = 0.0
    retention: Annotated[Seconds, Meta(description="seconds a closed pane is kept for reads (sliding: none kept)")] = 3600.0


class GlobalWindowConfig(_WindowBase, frozen=True, tag="global"):
    """Since start: one window that never closes (the default)."""


class TumblingWindowConfig(_WindowBase, frozen=True, tag="tumbling"):
    """Back-to-back windows of ``size`` seconds, aligned to the epoch."""

    size: Annotated[Positive, Meta(description="window length, seconds")] = 60.0


class HoppingWindowConfig(_WindowBase, frozen=True, tag="hopping"):
    """Windows of ``size`` seconds starting every ``hop`` seconds."""

    size: Annotated[Positive, Meta(description="window length, seconds")] = 60.0
    hop: Annotated[Positive, Meta(description="seconds between window starts")] = 10.0


class SlidingWindowConfig(_WindowBase, frozen=True, tag="sliding"):
    """The last ``size`` seconds as of the read, in panes of ``step`` seconds."""

    size: Annotated[Positive, Meta(description="window length, seconds")] = 60.0
    step: Annotated[Positive, Meta(description="pane width, seconds (the read's resolution)")] = 1.0


WindowConfig = GlobalWindowConfig | TumblingWindowConfig | HoppingWindowConfig | SlidingWindowConfig
WINDOWS: tuple[type[_WindowBase], ...] = (GlobalWindowConfig, TumblingWindowConfig, HoppingWindowConfig,
                                          SlidingWindowConfig)


class AggregateConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``kind = "aggregate"``: one aggregate (``collector.stages.aggregates.Aggregate``)."""

    name: Annotated[str, Meta(min_length=1, description="what reads name it by (`GET /processor/aggregation?aggregator=`)")]
    fn: Annotated[
        Literal["count", "sum", "avg", "min", "max", "distinct", "top_k", "rate"],
        Meta(description="the function; sum, avg, min, max and distinct need `value`, top_k needs `by`"),
    ] = "count"
    by: Annotated[
        str | list[str] | None,
        Meta(description="group field, or fields (the group is then their values together); null: one global figure; "
             "top_k: the field whose values are ranked"),
    ] = None
    value: Annotated[str | None, Meta(description="the field summed, averaged, compared or counted distinct")] = None
    window: Annotated[
        WindowConfig,
        Meta(description="a table: `kind` (`global`, `tumbling`, `hopping` or `sliding`) and that window's "
             "fields (below)"),
    ] = GlobalWindowConfig()
    where: Annotated[
        dict[str, Any] | str | None,
        Meta(description="only events whose fields have these values (`{ type = \"bet\" }`, all must hold), or a "
             "`module:function` predicate; null: every event"),
    ] = None
    k: Annotated[int, Meta(ge=1, description="top_k: how many items")] = 10
    max_groups: Annotated[int, Meta(ge=2, description="groups per pane at most (the oldest are evicted, counted)")] = 100_000
    exact_distinct: Annotated[
        int, Meta(ge=0, description="distinct: exact up to this many values per group, then HyperLogLog")
    ] = 10_000
    snapshot_top: Annotated[int, Meta(ge=0, description="top_k: items per pane a worker publishes (0: max(4k, 50))")] = 0
    prometheus: Annotated[bool, Meta(description="show the aggregate in the Prometheus text")] = True
    max_series: Annotated[
        int, Meta(ge=1, description="Prometheus: values shown only while the current window has at most this many "
                  "groups (top_k: its items, at most this many)"),
    ] = 100


class PairConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``kind = "pair"``: start/end pairing (``collector.stages.pairing.Pair``)."""

    name: Annotated[str, Meta(min_length=1, description="the stage's name (its counters: `GET /aggregates`)")] = "pair"
    start_type: Annotated[str, Meta(description="`type_field` value of a start")] = "page_view_start"
    end_type: Annotated[str, Meta(description="`type_field` value of an end")] = "page_view_end"
    type_field: Annotated[str, Meta(description="the field naming the event's type")] = "event"
    key: Annotated[
        list[str], Meta(min_length=1, description="fields (dotted paths allowed) a start and its end share")
    ] = msgspec.field(default_factory=lambda: ["user_id", "page_view_id"])
    time_field: Annotated[
        str | None, Meta(description="event time of each half (durations); null: arrival time")
    ] = "timestamp"
    carry: Annotated[list[str], Meta(description="fields copied into the record (from the start, else the end)")] = (
        msgspec.field(default_factory=list))
    ttl: Annotated[Positive, Meta(description="seconds a start waits for its end (then: unpaired, `expired`)")] = 43200.0
    orphan_ttl: Annotated[Positive, Meta(description="seconds an end waits for its start (then: `orphan_end`)")] = 600.0
    replay_ttl: Annotated[Seconds, Meta(description="seconds a paired key is remembered: a replayed half does not pair "
                                        "twice")] = 3600.0
    max_pending: Annotated[int, Meta(ge=1, description="waiting starts (and ends) at most; the oldest are evicted "
                                     "unpaired")] = 1_000_000
    max_output: Annotated[int, Meta(ge=1, description="records held between drains at most")] = 100_000
    output_type: Annotated[str, Meta(description="`type` of the records")] = "page_view"
    drop_inputs: Annotated[bool, Meta(description="drop the start and end events (only the records go on)")] = False
    emit: Annotated[
        str | None, Meta(description="`module:attr` of a function `PairRecord -> event`; null: the record itself")
    ] = None
    tick: Annotated[Positive, Meta(description="seconds between expiry rounds without traffic")] = 1.0
    store: Annotated[
        str, Meta(description="`memory` (per worker, lost on restart), `sqlite` (the file `state_path`, shared by the "
                  "workers, kept across restarts), `redis` (shared by daemons, `redis_url`) or `module:attr`"),
    ] = "memory"
    redis_url: Annotated[str, Meta(description="store `redis`: the server")] = "redis://127.0.0.1:6379/0"
    prefix: Annotated[str, Meta(description="store `redis`: key prefix")] = "pv:"
    redis_grace: Annotated[Seconds, Meta(description="store `redis`: seconds a waiting half's key outlives its "
                                         "deadline")] = 86400.0
    sweep_limit: Annotated[
        int, Meta(ge=1, description="store `redis`, `sqlite`: deadlines taken per expiry round trip")
    ] = 1000
    state_path: Annotated[
        str, Meta(description="store `sqlite`: the state file; relative or empty: in `data_dir` (empty: "
                  "`pairs-{name}.sqlite3`)"),
    ] = ""


def options_table() -> str:
    """The options of ``kind = "aggregate"`` (and its windows) and ``kind = "pair"`` as markdown."""
    rows = ["| stage | option | type | default | description |", "|---|---|---|---|---|"]
    labels: list[tuple[str, Any]] = [("`aggregate`", AggregateConfig)]
    labels += [(f"`window` `{w.__struct_config__.tag}`", w) for w in WINDOWS]
    labels.append(("`pair`", PairConfig))
    common = set(_WindowBase.__struct_fields__)
    for label, cls in labels:
        for f in msgspec.structs.fields(cls):
            if f.name in common and cls is not GlobalWindowConfig:
                continue  # time_field, lateness, retention: once, under global (every kind has them)
            rows.append(option_row(cls, f, "`window` (all kinds)" if f.name in common else label,
                                   "table" if f.name == "window" else None))
    return "\n".join(rows) + "\n"
