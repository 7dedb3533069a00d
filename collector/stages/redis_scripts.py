"""Lua scripts on Redis for the stages that keep shared state there (pairing, dedup).

::

    ScriptClient(url, timeout=...) ─► client(): one asyncio client per event loop (a worker
        has one; tests may run several loops), made on first use
      ─► run(script, keys, args): EVALSHA of a script loaded once per client
      ─► run_many(script, calls): the script once per (keys, args), pipelined: one round trip
      ─► a script Redis forgot (a restart, SCRIPT FLUSH) is loaded again and run again

A registered redis-py ``Script`` in a pipeline costs a SCRIPT EXISTS round trip per
call; EVALSHA of a sha kept here does not.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import missing

__all__ = ["ScriptClient"]


class ScriptClient:
    """A per-loop asyncio Redis client and the shas of the scripts it loaded.

    ``retries=False``: no retries inside the client, so a down server costs one
    ``timeout`` per call, not a backoff series (a stage with its own policy for that).
    """

    def __init__(self, url: str, *, what: str, timeout: float, connect_timeout: float | None = None,
                 retries: bool = True) -> None:
        try:
            import redis.asyncio  # noqa: F401
        except ImportError:
            raise missing("redis", "redis", what) from None
        self.url = url
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self.retries = retries
        self.redis: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.shas: dict[str, str] = {}

    @property
    def open(self) -> bool:
        """Whether a client was made (and not closed)."""
        return self.redis is not None

    def client(self) -> Any:
        """The asyncio Redis client of the running loop (made on first use)."""
        loop = asyncio.get_running_loop()
        if self.redis is None or self.loop is not loop:
            import redis.asyncio as aioredis

            kw: dict[str, Any] = {}
            if not self.retries:
                from redis.asyncio.retry import Retry
                from redis.backoff import NoBackoff

                kw["retry"] = Retry(NoBackoff(), 0)
            self.redis = aioredis.from_url(self.url, socket_timeout=self.timeout,
                                           socket_connect_timeout=self.connect_timeout,
                                           health_check_interval=30, **kw)
            self.loop = loop
            self.shas = {}
        return self.redis

    async def run(self, script: str, keys: list[Any], args: list[Any]) -> Any:
        """EVALSHA of ``script`` with ``keys`` and ``args``."""
        from redis.exceptions import NoScriptError

        r = self.client()
        sha = self.shas.get(script)
        if sha is not None:
            try:
                return await r.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                pass
        sha = self.shas[script] = await r.script_load(script)
        return await r.evalsha(sha, len(keys), *keys, *args)

    async def run_many(self, script: str, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
        """``script`` once per ``(keys, args)``, pipelined: one round trip (only the calls
        that met a forgotten script run again, after it is loaded)."""
        from redis.exceptions import NoScriptError

        r = self.client()
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            sha = self.shas.get(script)
            if sha is None:
                sha = self.shas[script] = await r.script_load(script)
            pipe = r.pipeline(transaction=False)
            for i in todo:
                keys, args = calls[i]
                pipe.evalsha(sha, len(keys), *keys, *args)
            out = await pipe.execute(raise_on_error=False)
            again = []
            for i, x in zip(todo, out, strict=True):
                if isinstance(x, NoScriptError) and not attempt:
                    again.append(i)
                elif isinstance(x, Exception):
                    raise x
                else:
                    results[i] = x
            if not again:
                break
            self.shas.pop(script, None)
            todo = again
        return results

    async def aclose(self) -> None:
        """Close the client."""
        if self.redis is not None:
            r, self.redis = self.redis, None
            await r.aclose()
