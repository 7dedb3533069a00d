"""The ``generic`` domain pack (seed 004): user actions, sensor data and system logs.

::

    POST /events ─► GenericEvent (msgspec: id, type, source, timestamp, user_id, data)
                 ─► Dedup on id (per worker; the batch is sharded by id)
                 ─► enrich ``segment`` from ``user_id`` (the client; simulated by default)
                 ─► sinks (JSONL by default; seed 004's MySQL ``processed_events`` table)

The event model is seed 004's, validated by a Struct: ``id`` is a UUID generated when
absent, ``type`` and ``source`` are closed sets, ``timestamp`` is RFC 3339 and
defaults to the time the worker received the event, ``user_id`` is optional and
``data`` is any JSON object. Unknown top-level fields are refused so that a typo
(``"tpye"``) is reported, not stored.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from ..config import PipelineConfig
from ..ids import new_id
from ..pipeline import Lookup, Pipeline
from ..stages import Dedup, Stage

__all__ = [
    "EVENT_SOURCES",
    "EVENT_TYPES",
    "GenericEvent",
    "ReceiptTime",
    "SegmentClient",
    "generate_generic",
    "generic_pipeline",
    "pack_pipeline",
]

EVENT_TYPES = ("user_action", "sensor_data", "system_log")
EVENT_SOURCES = ("web", "mobile", "iot_device", "system")
SEGMENTS = ("new", "casual", "regular", "power", "anonymous")


@dataclass(frozen=True)
class ReceiptTime(Stage):
    """Set ``timestamp`` to the time of receipt on events sent without one."""

    field: str = "timestamp"
    name: str = "receipt_time"

    def build(self) -> Callable[[list[Any]], list[Any]]:
        """The stage for one worker: one clock read per chunk."""
        f = self.field

        def stamp(events: list[Any]) -> list[Any]:
            now = None
            for e in events:
                if getattr(e, f) is None:
                    if now is None:
                        now = dt.datetime.now(dt.UTC)
                    setattr(e, f, now)
            return []

        return stamp


class GenericEvent(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, gc=False):
    """One event of seed 004's model.

    ``gc=False``: an event holds decoded JSON values, which cannot form a reference
    cycle, and 2,048 tracked objects per chunk kept the worker's cyclic GC busy.

    ``segment`` is filled by enrichment (from ``user_id``); a client need not send it.
    """

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=36, description="event id; a UUID is generated when absent")] = msgspec.field(default_factory=new_id)
    type: Annotated[
        Literal["user_action", "sensor_data", "system_log"], msgspec.Meta(description="what kind of event")
    ]
    source: Annotated[
        Literal["web", "mobile", "iot_device", "system"], msgspec.Meta(description="where it came from")
    ]
    # None until the ReceiptTime stage stamps it: one clock read per chunk instead of a
    # default_factory call per event (datetime.now was 9 % of a worker's profile)
    timestamp: Annotated[
        dt.datetime, msgspec.Meta(tz=True, description="RFC 3339 with a time zone; default: time of receipt")
    ] | None = None
    user_id: Annotated[str, msgspec.Meta(max_length=50, description="optional user id")] | None = None
    data: Annotated[dict[str, Any], msgspec.Meta(description="free-form payload (action, value, metadata, ...)")] = msgspec.field(default_factory=dict)
    segment: Annotated[str, msgspec.Meta(description="set by enrichment from user_id")] = ""


class SegmentClient:
    """The built-in simulated user service: a user's segment after ``latency`` seconds.

    Deterministic (crc32 of the user id), so tests can check every enriched value;
    events without a user are ``anonymous``.
    """

    def __init__(self, latency: float = 0.005) -> None:
        self.latency = latency

    async def get_segment(self, user_id: str | None) -> str:
        """The segment of ``user_id``."""
        if self.latency:
            await asyncio.sleep(self.latency)
        return segment_of(user_id)


def segment_of(user_id: str | None) -> str:
    """The simulated service's answer for ``user_id``."""
    if user_id is None:
        return "anonymous"
    return SEGMENTS[zlib.crc32(user_id.encode()) % 4]


def generic_pipeline(
    client: Any = None,
    *,
    enrich_latency: float = 0.005,
    cache_ttl: float = 300.0,
    dedup_ttl: float = 600.0,
    dedup_max: int = 1_000_000,
    dedup_wait: float = 30.0,
    dedup_count_by: str | None = None,
    sinks: tuple[Any, ...] = (),
    deadletter: Any = None,
) -> Pipeline:
    """Seed 004's pipeline: validate, drop repeated ids, enrich ``segment``, store.

    Sharded by ``id`` so that every copy of one id reaches the worker whose dedup
    window holds it. ``client`` has ``get_segment(user_id)`` (default: the simulated
    :class:`SegmentClient` with ``enrich_latency`` seconds per call). ``dedup_ttl`` is
    how long a stored id is remembered (0 disables dedup), ``dedup_max`` how many at
    most per worker (the oldest forgotten first); a repeat of an id that is
    still being stored waits up to ``dedup_wait`` seconds for the original's outcome.
    ``dedup_count_by`` (e.g. ``"type"``) counts the duplicates per value of that field.
    """
    if client is None:
        client = SegmentClient(enrich_latency)
    stages: tuple[Any, ...] = (ReceiptTime(),)
    if dedup_ttl > 0:
        stages = (Dedup(field="id", ttl=dedup_ttl, max_entries=dedup_max, wait=dedup_wait, count_by=dedup_count_by),
                  *stages)
    return Pipeline(
        name="generic",
        event_type=GenericEvent,
        key="id",
        id_field="id",
        client=client,
        lookups=(Lookup(name="segment", key="user_id", target="segment", method="get_segment", ttl=cache_ttl),),
        count_by=("type", "source"),
        stages=stages,
        sinks=tuple(sinks),
        deadletter=deadletter,
    )


def pack_pipeline(cfg: PipelineConfig, sinks: tuple[Any, ...], deadletter: Any) -> Pipeline:
    """``[pipeline] pack = "generic"`` (the daemon's default): :func:`generic_pipeline` from the config."""
    return generic_pipeline(
        cfg.client,
        enrich_latency=cfg.enrich_latency,
        cache_ttl=cfg.cache_ttl,
        dedup_ttl=cfg.dedup_ttl,
        dedup_max=cfg.dedup_max,
        dedup_wait=cfg.dedup_wait,
        dedup_count_by=cfg.dedup_count_by,
        sinks=sinks,
        deadletter=deadletter,
    )


def generate_generic(n: int, *, users: int = 1000, seed: int = 0, with_ids: bool = True) -> list[dict[str, Any]]:
    """``n`` valid events as dicts (the demo's and the tests' generator)."""
    import random

    rnd = random.Random(seed)
    actions = ("login", "purchase", "click", "error")
    out = []
    for i in range(n):
        t = EVENT_TYPES[i % 3]
        ev: dict[str, Any] = {
            "type": t,
            "source": EVENT_SOURCES[rnd.randrange(4)],
            "user_id": f"user_{rnd.randrange(users)}",
            "data": {"action": actions[rnd.randrange(4)], "value": round(rnd.random() * 100, 2)},
        }
        if with_ids:
            ev["id"] = f"{seed:08x}-{i:027d}"[:36]
        out.append(ev)
    return out
