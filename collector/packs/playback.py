"""The ``playback`` domain pack (seed 000): playback events enriched with region and model.

Each event arrives without the user's region and the device's model; a separate,
slow service answers ``get_region(user_id)`` and ``get_model(device_type)`` with the
value and the fetch duration it measured. The pipeline shards by ``user_id`` (so each
user's region is cached in exactly one worker), caches both lookups per worker,
coalesces concurrent misses, and counts events per device type and per region for
each batch's workload statistics.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import Any

import msgspec

from ..config import PipelineConfig
from ..pipeline import Lookup, Pipeline

__all__ = [
    "InMemoryClient",
    "PlaybackEvent",
    "SimulatedClient",
    "generate_events",
    "pack_pipeline",
    "playback_pipeline",
]


class PlaybackEvent(msgspec.Struct, gc=False):
    """One playback event; ``region`` and ``model`` are filled by enrichment.

    ``gc=False``: events hold only strings and ints, never reference cycles, and a
    million of them would otherwise make every GC pass walk them all.
    """

    id: int
    user_id: str
    video_id: str
    start_at: int
    stop_at: int
    bitrate_kbps: int
    device_type: str
    error_code: str | None = None
    region: str = ""
    model: str = ""


REGIONS = ("eu-west", "eu-central", "us-east", "us-west", "ap-south", "ap-east", "sa-east", "af-south")


def region_of(user_id: str) -> str:
    """The simulated service's answer for a user (deterministic, so tests can check it)."""
    return REGIONS[hashlib.blake2s(user_id.encode(), digest_size=2).digest()[0] % len(REGIONS)]


def model_of(device_type: str) -> str:
    """The simulated service's answer for a device type."""
    return f"{device_type}-model-{hashlib.blake2s(device_type.encode(), digest_size=2).hexdigest()}"


class SimulatedClient:
    """The built-in simulated enrichment service: ``latency`` seconds per call (async).

    ``jitter`` adds up to that fraction of random extra latency; ``failure_rate``
    makes that fraction of calls raise ``ConnectionError``. Picklable, so it reaches
    workers as is.
    """

    def __init__(self, latency: float = 0.0, jitter: float = 0.0, failure_rate: float = 0.0) -> None:
        self.latency = latency
        self.jitter = jitter
        self.failure_rate = failure_rate

    async def _wait(self) -> float:
        d = self.latency * (1 + random.random() * self.jitter) if self.latency else 0.0
        if d:
            await asyncio.sleep(d)
        if self.failure_rate and random.random() < self.failure_rate:
            raise ConnectionError("simulated enrichment service failure")
        return d

    async def get_region(self, user_id: str) -> tuple[str, float]:
        """Region of ``user_id`` and the simulated fetch time."""
        return region_of(user_id), await self._wait()

    async def get_model(self, device_type: str) -> tuple[str, float]:
        """Device model of ``device_type`` and the simulated fetch time."""
        return model_of(device_type), await self._wait()


class InMemoryClient:
    """A blocking client answering from dicts (unknown keys: computed), zero latency."""

    def __init__(self, regions: dict[str, str] | None = None, models: dict[str, str] | None = None) -> None:
        self.regions = regions or {}
        self.models = models or {}

    def get_region(self, user_id: str) -> tuple[str, float]:
        """Region from the dict (or the simulated answer)."""
        r = self.regions.get(user_id)
        return (r if r is not None else region_of(user_id)), 0.0

    def get_model(self, device_type: str) -> tuple[str, float]:
        """Model from the dict (or the simulated answer)."""
        m = self.models.get(device_type)
        return (m if m is not None else model_of(device_type)), 0.0


def playback_pipeline(
    client: Any = None,
    *,
    cache_ttl: float = 300.0,
    cache_size: int = 100_000,
    timeout: float = 10.0,
    retries: int = 2,
    backoff: float = 0.05,
    concurrency: int = 256,
    sinks: tuple[Any, ...] = (),
    deadletter: Any = None,
    shard: str = "key",
) -> Pipeline:
    """The seed-000 pipeline around ``client`` (an object or ``"module:factory"``).

    ``client`` has ``get_region(user_id)`` and ``get_model(device_type)``, each
    ``async def`` or blocking, each returning ``(value, seconds)``. Default: the
    built-in :class:`SimulatedClient` with no latency. ``shard="chunk"`` trades the
    per-user cache affinity (a user may then be fetched once per worker) for a
    supervisor that does not parse NDJSON batches at all.
    """
    if client is None:
        client = SimulatedClient()
    common: dict[str, Any] = dict(
        returns_duration=True,
        ttl=cache_ttl,
        max_entries=cache_size,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        concurrency=concurrency,
    )
    return Pipeline(
        name="playback",
        event_type=PlaybackEvent,
        key="user_id",
        id_field="id",
        client=client,
        lookups=(
            Lookup(name="region", key="user_id", target="region", method="get_region", **common),
            Lookup(name="model", key="device_type", target="model", method="get_model", **common),
        ),
        count_by=("device_type", "region"),
        sinks=tuple(sinks),
        deadletter=deadletter,
        shard=shard,
    )


def pack_pipeline(cfg: PipelineConfig, sinks: tuple[Any, ...], deadletter: Any) -> Pipeline:
    """``[pipeline] pack = "playback"``: :func:`playback_pipeline` on ``client`` (default: the
    :class:`SimulatedClient` with ``enrich_latency`` seconds per call), cached ``cache_ttl``."""
    client = cfg.client if cfg.client is not None else SimulatedClient(cfg.enrich_latency)
    return playback_pipeline(client, cache_ttl=cfg.cache_ttl, sinks=sinks, deadletter=deadletter)


def generate_events(
    n: int, *, users: int = 2000, device_types: int = 20, seed: int = 0, start_id: int = 0
) -> list[PlaybackEvent]:
    """``n`` synthetic playback events over ``users`` users and ``device_types`` types."""
    rnd = random.Random(seed)
    uids = [f"user-{i}" for i in range(users)]
    devs = [f"device-{i}" for i in range(device_types)]
    vids = [f"video-{i}" for i in range(1000)]
    now = int(time.time())
    out = []
    for i in range(n):
        start = now - rnd.randrange(86400)
        out.append(
            PlaybackEvent(
                id=start_id + i,
                user_id=uids[rnd.randrange(users)],
                video_id=vids[rnd.randrange(1000)],
                start_at=start,
                stop_at=start + rnd.randrange(1, 7200),
                bitrate_kbps=rnd.choice((800, 1500, 3000, 6000)),
                device_type=devs[rnd.randrange(device_types)],
                error_code=None if rnd.random() > 0.02 else "E_STALL",
            )
        )
    return out
