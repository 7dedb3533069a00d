"""The clickstream pack (seed 002): an online cinema's analytics events.

::

    POST /events(/batch) ─► ClickEvent (tagged union on "event", validated, 422 + field path)
      ─► Dedup by id (duplicates counted per type)
      ─► TokenAuth: token ─► user_id (auth service, Redis cache; local JWT check when the
                    service is down; "anonymous" for a null token; the token removed)
      ─► Stamp: timestamp
      ├─ role "ingest": ─► NATS JetStream, subject clickstream.<event> (the seed's Kafka key),
      │                    clickstream.<event>.<partition of user_id> with ``partitions = N``
      └─ role "all" (no NATS) / "etl" (consuming that stream):
           ─► Gaps (client ``seq`` per ``session_id``)
           ─► Pair page_view_start + page_view_end by (user_id, page_view_id) ─► page_view
           ─► one table per event type: SQLite (embedded default) or ClickHouse

Built only from the generic parts (Structs, stages, sinks): adding a seventh event type
is one Struct and one :func:`register` call::

    class Rating(ClickBase, tag="rating"):
        data: RatingData

    register(Rating)   # before the pipeline is built; the class must be importable
"""

from __future__ import annotations

import typing
import uuid
from typing import Annotated, Any, Literal

import msgspec

from ..config import in_dir
from ..errors import ConfigError
from ..pipeline import Pipeline

__all__ = [
    "EVENT_TYPES",
    "OUTPUT_TYPES",
    "ClickBase",
    "ClickEvent",
    "ClickstreamOptions",
    "ElementClick",
    "PageView",
    "PageViewEnd",
    "PageViewStart",
    "QualityChange",
    "SearchFilter",
    "VideoComplete",
    "builtin_auth",
    "click_event_type",
    "clickstream_pipeline",
    "default_sinks",
    "migrate",
    "pack_pipeline",
    "page_view_record",
    "register",
    "table_names",
]


class ClickBase(msgspec.Struct, tag_field="event", forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """What every clickstream event has besides its ``data``.

    ``id``: the event id (the ingest route generates a UUID when absent); ``token``: the
    client's token (removed once resolved); ``user_id``: set from the token
    (``anonymous`` without one); ``timestamp``: set when the collector handled it;
    ``session_id`` and ``seq``: optional, a client sequence number per session, for gap
    detection. ``event`` (the tag) names the type and is readable as an attribute.
    """

    id: str = ""
    token: str | None = None
    user_id: str = ""
    timestamp: str = ""
    session_id: str | None = None
    seq: int | None = None

    @property
    def event(self) -> str:
        """The event type: the union's tag (``element_click``, ...)."""
        tag = self.__struct_config__.tag
        assert isinstance(tag, str)
        return tag


class _Data(msgspec.Struct, forbid_unknown_fields=True):
    pass


class ElementClickData(_Data):
    """A click on an element of a page (movie, category, trailer, ...)."""

    element_type: str
    page_type: str


UUID_TEXT = Annotated[str, msgspec.Meta(
    pattern=r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$",
    description="a UUID")]


class PageViewData(_Data):
    """One half of a page view; the client keeps ``page_view_id`` until it leaves the page.

    The id stays text (checked as a UUID): it is a pairing key, kept in snapshots and
    Redis as it was sent."""

    page_view_id: UUID_TEXT
    page_type: str


class QualityChangeData(_Data):
    """A change of video quality (720 → 1080)."""

    video_id: str
    old_quality: int
    new_quality: int


class VideoCompleteData(_Data):
    """A video watched to its end."""

    video_id: str
    duration_total: bool


class SearchFilterData(_Data):
    """Search filters used (genre, rating, actors)."""

    search_query: str
    filters: str


class PageViewResult(msgspec.Struct, forbid_unknown_fields=True):
    """The ``data`` of a ``page_view``: time on the page (null when unpaired)."""

    duration_seconds: float | None
    page_type: str
    paired: bool
    page_view_id: str = ""


class ElementClick(ClickBase, tag="element_click"):
    """``element_click``."""

    data: ElementClickData


class PageViewStart(ClickBase, tag="page_view_start"):
    """``page_view_start``."""

    data: PageViewData


class PageViewEnd(ClickBase, tag="page_view_end"):
    """``page_view_end``."""

    data: PageViewData


class QualityChange(ClickBase, tag="quality_change"):
    """``quality_change``."""

    data: QualityChangeData


class VideoComplete(ClickBase, tag="video_complete"):
    """``video_complete``."""

    data: VideoCompleteData


class SearchFilter(ClickBase, tag="search_filter"):
    """``search_filter``."""

    data: SearchFilterData


class PageView(ClickBase, tag="page_view"):
    """``page_view``: made by the pack from a start and its end (never sent by clients)."""

    data: PageViewResult


EVENT_TYPES: list[type[ClickBase]] = [ElementClick, PageViewStart, PageViewEnd, QualityChange, VideoComplete, SearchFilter]
"""The event types clients send, in registration order; :func:`register` adds one."""
OUTPUT_TYPES: list[type[ClickBase]] = [PageView]
"""Types the pack makes itself (one table each)."""



def _tag_attribute(cls: type[ClickBase]) -> None:
    # the tag as a plain class attribute: read once per event by dedup counts, routing
    # and pairing, it costs an eighth of the property's two lookups
    cls.event = cls.__struct_config__.tag  # type: ignore[assignment]


for _t in (*EVENT_TYPES, *OUTPUT_TYPES):
    _tag_attribute(_t)

ClickEvent = ElementClick | PageViewStart | PageViewEnd | QualityChange | VideoComplete | SearchFilter
"""The tagged union of the six seed types (tag: ``event``)."""


def register(cls: type[ClickBase]) -> type[ClickBase]:
    """Add an event type (a :class:`ClickBase` subclass with a ``tag``); usable as a decorator.

    Pipelines built afterwards accept it and give it its own table. The class must be
    importable by its module path: workers receive the pipeline by reference.
    """
    if not (isinstance(cls, type) and issubclass(cls, ClickBase)) or not isinstance(cls.__struct_config__.tag, str):
        raise ConfigError(f"register: {cls!r} is not a ClickBase subclass with a tag (class X(ClickBase, tag='x'))")
    tags = {t.__struct_config__.tag for t in (*EVENT_TYPES, *OUTPUT_TYPES)}
    if cls not in EVENT_TYPES:
        if cls.__struct_config__.tag in tags:
            raise ConfigError(f"register: event type {cls.__struct_config__.tag!r} is registered already")
        EVENT_TYPES.append(cls)
        _tag_attribute(cls)
    return cls


def click_event_type() -> Any:
    """The tagged union of every registered event type (``ClickEvent`` plus registrations)."""
    return typing.Union[tuple(EVENT_TYPES)]  # noqa: UP007 - built from a runtime list


def table_names() -> list[str]:
    """One table per type: the registered event types and ``page_view``."""
    return [str(t.__struct_config__.tag) for t in (*EVENT_TYPES, *OUTPUT_TYPES)]


_PV_NS = uuid.UUID("6f1c2f4e-9c61-4d0e-8a43-2d1f0f5b7a11")


def page_view_record(rec: Any) -> PageView:
    """A :class:`~collector.stages.pairing.PairRecord` as seed 002's ``page_view`` event.

    Its id is derived from (user id, page view id), so a record made twice (a replay, a
    redelivery) is one row in the idempotent tables; ``timestamp`` is the start's (the
    end's for an orphan end); ``duration_seconds`` is null when unpaired."""
    user_id, pv = rec.key
    f = rec.fields
    when = f.get("timestamp") or ""
    return PageView(
        id=str(uuid.uuid5(_PV_NS, f"{user_id}.{pv}")),
        user_id=str(user_id),
        timestamp=str(when),
        session_id=f.get("session_id"),
        data=PageViewResult(
            duration_seconds=None if rec.duration_seconds is None else round(rec.duration_seconds, 3),
            page_type=str(f.get("data.page_type") or f.get("page_type") or ""),
            paired=bool(rec.paired),
            page_view_id=str(pv),
        ),
    )


class ClickstreamOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[pipeline.options]`` of the clickstream pack."""

    role: Literal["all", "ingest", "etl"] = "all"
    auth_url: str = ""  # the auth service's verify URL; empty: the built-in one, started in the daemon
    auth_key: str = ""  # key of the local JWT check (HS256); empty: the built-in service's demo key
    auth_key_env: str = ""
    auth_algorithms: tuple[str, ...] = ("HS256",)
    redis_url: str = ""  # token cache and (pair_store = "redis") pairing state; empty: per worker
    nats_url: str = ""  # role "ingest": publish here
    subject_prefix: str = "clickstream"
    partitions: int = 0  # role "ingest": > 0 publishes to <prefix>.<event>.<partition of user_id out of N>
    stream: str = "CLICKSTREAM"
    clickhouse_url: str = ""  # per-type tables in ClickHouse; empty: per-type tables in SQLite
    clickhouse_database: str = "default"
    sqlite_path: str = "clickstream.db"
    pair_ttl: float = 12 * 3600.0
    # "sqlite": the waiting halves in data_dir/pairs.sqlite3, kept across restarts (seed 002)
    pair_store: Literal["sqlite", "memory", "redis"] = "sqlite"
    pair_state_path: str = "pairs.sqlite3"  # pair_store = "sqlite": relative to the data directory
    pair_prefix: str = "pv:"  # Redis key prefix of the waiting halves (pair_store = "redis")
    dedup_ttl: float = 600.0


def _tables_sinks(opts: ClickstreamOptions, data_dir: str | None) -> tuple[Any, ...]:
    """One table per event type: ClickHouse when configured, else SQLite."""
    if opts.clickhouse_url:
        from ..sinks.config import ClickhouseSinkConfig

        return (ClickhouseSinkConfig(name="clickhouse", url=opts.clickhouse_url, database=opts.clickhouse_database,
                                     table="{event}"),)
    from ..sinks.config import SqliteSinkConfig

    return (SqliteSinkConfig(name="tables", path=in_dir(opts.sqlite_path, data_dir), table="{event}"),)


def clickstream_pipeline(
    options: ClickstreamOptions | None = None,
    *,
    sinks: tuple[Any, ...] | None = None,
    deadletter: Any = None,
    data_dir: str | None = None,
) -> Pipeline:
    """Seed 002's pipeline for ``options.role`` (see the module docstring).

    ``sinks``: where events go (default: NATS for role ``ingest``, else one table per
    type, in ClickHouse when ``clickhouse_url`` is set, else SQLite in ``data_dir``)."""
    from ..stages import Dedup
    from ..stages.auth import TokenAuth
    from ..stages.integrity import Gaps
    from ..stages.pairing import Pair
    from ..stages.stamp import Stamp

    o = options or ClickstreamOptions()
    if o.role == "ingest" and not o.nats_url and sinks is None:
        raise ConfigError("clickstream role 'ingest' publishes to NATS: set `nats_url` (or give sinks)")
    stages: list[Any] = [Dedup(field="id", ttl=o.dedup_ttl, count_by="event")]
    if o.role in ("all", "ingest"):
        stages += [_auth(o, TokenAuth), Stamp(target="timestamp")]
    if o.role in ("all", "etl"):
        if o.pair_store == "redis" and not o.redis_url:
            raise ConfigError("clickstream pair_store = 'redis' needs `redis_url`")
        stages += [
            Gaps(session="session_id", seq="seq", by="event"),
            Pair(start_type="page_view_start", end_type="page_view_end", type_field="event",
                 key=("user_id", "data.page_view_id"), time_field="timestamp",
                 carry=("timestamp", "data.page_type", "session_id"), ttl=o.pair_ttl,
                 output_type="page_view", emit="collector.packs.clickstream:page_view_record",
                 store=o.pair_store, redis_url=o.redis_url, prefix=o.pair_prefix,
                 state_path=in_dir(o.pair_state_path, data_dir) if o.pair_store == "sqlite" else ""),
        ]
    if sinks is None:
        if o.role == "ingest":
            from ..sinks.config import NatsSinkConfig

            subject = f"{o.subject_prefix}.{{event}}" + (f".{{user_id:p{o.partitions}}}" if o.partitions > 0 else "")
            sinks = (NatsSinkConfig(name="nats", url=o.nats_url, subject=subject, stream=o.stream),)
        else:
            sinks = _tables_sinks(o, data_dir)
    # role "all": shard by token, so one user's page-view halves (one token) meet in one
    # worker before user_id is known; the ETL consumer reads user_id itself
    return Pipeline(
        name="clickstream",
        event_type=click_event_type(),
        key="user_id" if o.role == "etl" else "token",
        id_field="id",
        stages=tuple(stages),
        sinks=tuple(sinks),
        deadletter=deadletter,
        count_by=("event",),
    )


def _auth(o: ClickstreamOptions, cls: Any) -> Any:
    url, key = o.auth_url, o.auth_key
    if not url:
        svc = builtin_auth()
        url, key = svc.verify_url, key or svc.key
    return cls(service_url=url, redis_url=o.redis_url, jwt_key=key, jwt_key_env=o.auth_key_env,
               algorithms=tuple(o.auth_algorithms))


def options_of(cfg: Any) -> ClickstreamOptions:
    """``[pipeline.options]`` as :class:`ClickstreamOptions` (errors name the option)."""
    try:
        return msgspec.convert(getattr(cfg, "options", None) or {}, ClickstreamOptions)
    except msgspec.ValidationError as e:
        raise ConfigError(f"`$.pipeline.options`: {e} (clickstream options: "
                          f"{', '.join(ClickstreamOptions.__struct_fields__)})") from None


def pack_pipeline(cfg: Any, sinks: tuple[Any, ...], deadletter: Any) -> Pipeline:
    """``[pipeline] pack = "clickstream"``: :func:`clickstream_pipeline` from ``[pipeline.options]``."""
    return clickstream_pipeline(options_of(cfg), sinks=sinks or None, deadletter=deadletter)


def default_sinks(cfg: Any, data_dir: str) -> tuple[Any, ...]:
    """The pack's sinks when the daemon config names none (per-type tables, or NATS)."""
    o = options_of(cfg)
    if o.role == "ingest":
        return ()  # clickstream_pipeline publishes to nats_url
    return _tables_sinks(o, data_dir)


def builtin_auth() -> Any:
    """The built-in auth service (:class:`collector.sources.auth.AuthService`, the demo
    key), started in this process on first use and kept for the process's life:
    ``collector serve --pack clickstream`` without ``auth_url``."""
    import logging

    from ..sources.auth import AuthService

    svc = AuthService.shared()
    logging.getLogger("collector.packs").info(
        "clickstream: no auth_url given; the built-in auth service runs at %s (POST /tokens issues tokens)", svc.url)
    return svc


async def migrate(dsn: str, schema: str = "public") -> list[str]:
    """``collector migrate --pack clickstream``: one table per type (:func:`table_names`).

    ``dsn`` is ClickHouse's HTTP URL (``http://127.0.0.1:8123``; ``schema`` is then the
    database, ``default`` for ``public``) or a SQLite file (``sqlite:///path/clickstream.db``
    or a plain path). Idempotent: the steps applied, none when every table exists."""
    tables = table_names()
    if dsn.startswith(("http://", "https://")):
        from ..sinks.clickhouse import migrate as clickhouse_migrate
        from ..sinks.config import ClickhouseSinkConfig

        db = "default" if schema == "public" else schema
        return await clickhouse_migrate(ClickhouseSinkConfig(url=dsn, database=db, table="{event}"), tables)
    from ..sinks.base import EventCodec
    from ..sinks.config import SqliteSinkConfig
    from ..sinks.sqlite import SqliteSink

    path = dsn.removeprefix("sqlite://")
    sink = SqliteSink(SqliteSinkConfig(path=path, table="{event}"), name="tables",
                      codec=EventCodec(click_event_type(), "id"), worker=0)
    try:
        return await sink.migrate(tables)
    finally:
        await sink.close()
