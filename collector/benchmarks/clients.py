"""Enrichment clients the scenarios hand to the collector (picklable, importable by workers).

``HttpEnrichClient`` is the client of ``collector bench service URL``; its contract,
which a user's enrichment endpoint has to follow:

* ``GET URL?user_id=<id>`` answers ``200`` with ``{"region": "<region>"}``;
* ``GET URL?device_type=<type>`` answers ``200`` with ``{"model": "<model>"}``;
* either answer may add ``"seconds": <float>``, the service's own fetch time; when
  absent the client reports the round trip it measured;
* any other status is an error (the collector retries it with backoff and, when the
  retries are spent, leaves the field empty and counts the failure).

The aiohttp session is created lazily inside the worker (sessions cannot be pickled
and belong to one event loop), one per worker, with a connection limit equal to the
lookup concurrency so the collector's own limit is what bounds the load.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..errors import missing
from ..playback import model_of, region_of

__all__ = ["FixedLatencyAsync", "FixedLatencyBlocking", "HttpEnrichClient"]


class FixedLatencyAsync:
    """``latency`` seconds per call (``asyncio.sleep``), deterministic answers."""

    def __init__(self, latency: float) -> None:
        self.latency = latency

    async def get_region(self, user_id: str) -> tuple[str, float]:
        """Region after ``latency`` seconds."""
        await asyncio.sleep(self.latency)
        return region_of(user_id), self.latency

    async def get_model(self, device_type: str) -> tuple[str, float]:
        """Model after ``latency`` seconds."""
        await asyncio.sleep(self.latency)
        return model_of(device_type), self.latency


class FixedLatencyBlocking:
    """``latency`` seconds per call (``time.sleep``): a blocking client (seed 000's shape)."""

    def __init__(self, latency: float) -> None:
        self.latency = latency

    def get_region(self, user_id: str) -> tuple[str, float]:
        """Region after ``latency`` seconds, blocking."""
        time.sleep(self.latency)
        return region_of(user_id), self.latency

    def get_model(self, device_type: str) -> tuple[str, float]:
        """Model after ``latency`` seconds, blocking."""
        time.sleep(self.latency)
        return model_of(device_type), self.latency


class HttpEnrichClient:
    """The ``service URL`` client: see the module docstring for the endpoint contract."""

    def __init__(self, url: str, connections: int = 256, timeout: float = 10.0) -> None:
        self.url = url
        self.connections = connections
        self.timeout = timeout
        self._session: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # a session never travels to a worker; each worker opens its own
        return {"url": self.url, "connections": self.connections, "timeout": self.timeout, "_session": None}

    async def _get(self, param: str, value: str, field: str) -> tuple[str, float]:
        if self._session is None:
            try:
                import aiohttp
            except ImportError as e:
                raise missing("aiohttp", "http", "the HTTP enrichment client") from e
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        t0 = time.perf_counter()
        async with self._session.get(self.url, params={param: value}) as resp:
            if resp.status != 200:
                raise ConnectionError(f"{self.url}?{param}={value}: HTTP {resp.status}")
            body = await resp.json(content_type=None)
        return str(body[field]), float(body.get("seconds", time.perf_counter() - t0))

    async def get_region(self, user_id: str) -> tuple[str, float]:
        """``GET URL?user_id=...`` → ``{"region": ...}``."""
        return await self._get("user_id", user_id, "region")

    async def get_model(self, device_type: str) -> tuple[str, float]:
        """``GET URL?device_type=...`` → ``{"model": ...}``."""
        return await self._get("device_type", device_type, "model")
