"""The ``redis`` kind: values kept in Redis, read for a whole batch in one round trip.

``command = "get"`` reads ``key_template.format(key=...)`` for every key with one
``MGET`` (values decoded as UTF-8 text, or as JSON with ``json = true``);
``command = "hgetall"`` pipelines one ``HGETALL`` per key and gives each hash as a
dict (an empty hash is "not found"). One connection pool per source per worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from ..errors import missing
from ..sinks.config import redact_dsn
from .base import Failure, Source
from .config import RedisSourceConfig

__all__ = ["RedisSource"]


class RedisSource(Source):
    """``RedisSource(url="redis://127.0.0.1:6379/0", key_template="user:{key}:segment")``."""

    kind = "redis"
    Config = RedisSourceConfig

    def __init__(self, config: Any = None, /, **fields: Any) -> None:
        super().__init__(config, **fields)
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise missing("redis", "redis", "the redis source") from None
        self.aioredis = aioredis
        self.redis: Any = None
        self.round_trips = 0

    @property
    def max_batch(self) -> int:
        return int(self.config.max_keys)

    def _client(self) -> Any:
        if self.redis is None:
            self.redis = self.aioredis.from_url(self.config.url, decode_responses=True)
        return self.redis

    async def get_many(self, keys: Sequence[Any]) -> dict[Any, Any]:
        """One MGET, or one pipeline of HGETALLs, for ``keys``."""
        cfg = self.config
        names = [cfg.key_template.replace("{key}", str(k)) for k in keys]
        r = self._client()
        self.round_trips += 1
        out: dict[Any, Any] = {}
        if cfg.command == "get":
            for k, v in zip(keys, await r.mget(names), strict=True):
                if v is None:
                    continue
                if cfg.json:
                    try:
                        out[k] = msgspec.json.decode(v)
                    except msgspec.DecodeError as e:
                        out[k] = Failure(f"invalid JSON at {cfg.key_template!r}: {e}")
                else:
                    out[k] = v
            return out
        pipe = r.pipeline(transaction=False)
        for n in names:
            pipe.hgetall(n)
        for k, h in zip(keys, await pipe.execute(), strict=True):
            if h:
                out[k] = h
        return out

    async def health(self) -> dict[str, Any]:
        """``ok`` when Redis answers PING."""
        await self._client().ping()
        return {"kind": self.kind, "ok": True, "round_trips": self.round_trips}

    async def close(self) -> None:
        if self.redis is not None:
            r, self.redis = self.redis, None
            await r.aclose()

    def describe(self) -> str:
        return f"redis {redact_dsn(self.config.url)}"
