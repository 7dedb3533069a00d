"""The ``http`` kind: a JSON service behind aiohttp, one key per request or many.

::

    one key:  GET/POST url.format(key=quote(key)) ─► 200 JSON ─► value_path ─► value
                                                  └► 404 (not_found_status) ─► not found
    batch:    GET url?ids=a,b,c | POST url {"ids": [a, b, c]} ─► JSON ─► response_path
              ─► {"a": {...}, "b": {...}} ─► value_path in each ─► values (absent: not found)

One ``aiohttp.ClientSession`` per source per worker, created inside the worker's loop,
with a bounded connection pool (``connections``). Every answer is read with a size
bound (``max_body``; a larger one is a failure, read no further) under the runtime's
deadline (``resilience.timeout`` covers connect, headers and a trickled body). A 5xx,
invalid JSON or an answer of the wrong shape fails the call: counted, retried, and
seen by the circuit breaker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import msgspec

from ..errors import missing
from ..sinks.config import redact_dsn
from .base import Failure, Source, SourceError, gather_keys
from .config import HttpSourceConfig

__all__ = ["HttpSource", "dig", "read_bounded"]

_NOT_FOUND = object()


def aiohttp_module(what: str) -> Any:
    """aiohttp, or the error naming the extra to install."""
    try:
        import aiohttp
    except ImportError:
        raise missing("aiohttp", "http", what) from None
    return aiohttp


def dig(doc: Any, path: str) -> Any:
    """``doc`` at dotted ``path`` (``data.items.0.name``; empty: ``doc``); KeyError if absent."""
    if not path:
        return doc
    for part in path.split("."):
        if isinstance(doc, dict):
            doc = doc[part]
        elif isinstance(doc, list) and part.lstrip("-").isdigit():
            try:
                doc = doc[int(part)]
            except IndexError:
                raise KeyError(part) from None
        else:
            raise KeyError(part)
    return doc


async def read_bounded(resp: Any, limit: int) -> bytes:
    """The body of ``resp``, failing as soon as it passes ``limit`` bytes."""
    n = resp.content_length
    if n is not None and n > limit:
        raise SourceError(f"answer of {n} bytes is over the {limit}-byte limit", "invalid")
    parts: list[bytes] = []
    size = 0
    while True:
        b = await resp.content.read(65536)
        if not b:
            return b"".join(parts)
        size += len(b)
        if size > limit:
            raise SourceError(f"answer is over the {limit}-byte limit", "invalid")
        parts.append(b)


class HttpSource(Source):
    """``HttpSource(url="http://users:8080/users/{key}", value_path="segment")``."""

    kind = "http"
    Config = HttpSourceConfig

    def __init__(self, config: Any = None, /, **fields: Any) -> None:
        super().__init__(config, **fields)
        self.aiohttp = aiohttp_module("the http source")
        self.session: Any = None
        self.requests = 0  # requests sent (for tests and stats)
        self.dec = msgspec.json.Decoder()

    @property
    def max_batch(self) -> int:
        b = self.config.batch
        return b.max_keys if b is not None else 256

    def _session(self) -> Any:
        if self.session is None or self.session.closed:
            ah = self.aiohttp
            self.session = ah.ClientSession(
                connector=ah.TCPConnector(limit=self.config.connections),
                timeout=ah.ClientTimeout(total=None),
                headers=self.config.headers,
            )
        return self.session

    async def request(self, url: str, body: Any = None) -> Any:
        """One request; the decoded JSON answer, or ``_NOT_FOUND``."""
        cfg = self.config
        self.requests += 1
        # its own deadline too (connect, headers, a trickled body), for callers without
        # the runtime around them; under the runtime the call's timeout is the same
        async with asyncio.timeout(cfg.resilience.timeout), self._session().request(cfg.method, url, json=body) as resp:
            if resp.status in cfg.not_found_status:
                return _NOT_FOUND
            if resp.status >= 400:
                raise SourceError(f"HTTP {resp.status} from {redact_dsn(url)}", "http_status")
            raw = await read_bounded(resp, cfg.max_body)
        try:
            return self.dec.decode(raw)
        except msgspec.DecodeError as e:
            raise SourceError(f"invalid JSON from {redact_dsn(url)}: {e}", "invalid") from None

    async def get_many(self, keys: Sequence[Any]) -> dict[Any, Any]:
        """One request per key (concurrently), or batched requests in batch mode."""
        if self.config.batch is not None:
            return await self._batch(keys)
        return await gather_keys(keys, [self._one(k) for k in keys], absent=_NOT_FOUND)

    async def _one(self, key: Any) -> Any:
        cfg = self.config
        url = cfg.url.replace("{key}", quote(str(key), safe=""))
        doc = await self.request(url, None)
        if doc is _NOT_FOUND:
            return doc
        try:
            return dig(doc, cfg.value_path)
        except (KeyError, TypeError):
            raise SourceError(f"answer from {redact_dsn(url)} has no {cfg.value_path!r}", "invalid") from None

    async def _batch(self, keys: Sequence[Any]) -> dict[Any, Any]:
        cfg = self.config
        b = cfg.batch
        assert b is not None
        if b.body_key:
            doc = await self.request(cfg.url, {b.body_key: list(keys)})
        else:
            sep = "&" if "?" in cfg.url else "?"
            joined = b.separator.join(quote(str(k), safe="") for k in keys)
            doc = await self.request(f"{cfg.url}{sep}{b.param}={joined}", None)
        if doc is _NOT_FOUND:
            return {}
        try:
            answers = dig(doc, b.response_path)
        except (KeyError, TypeError):
            raise SourceError(f"batch answer from {cfg.url} has no {b.response_path!r}", "invalid") from None
        if not isinstance(answers, dict):
            raise SourceError(f"batch answer from {cfg.url} is not an object of key → value", "invalid")
        out: dict[Any, Any] = {}
        for k in keys:
            a = answers.get(k if type(k) is str else str(k), _NOT_FOUND)
            if a is _NOT_FOUND or a is None:
                continue
            try:
                out[k] = dig(a, cfg.value_path)
            except (KeyError, TypeError):
                out[k] = Failure(f"answer for {k!r} has no {cfg.value_path!r}")
        return out

    async def health(self) -> dict[str, Any]:
        return {"kind": self.kind, "ok": True, "requests": self.requests}

    async def close(self) -> None:
        if self.session is not None:
            s, self.session = self.session, None
            await s.close()

    def describe(self) -> str:
        return f"http {redact_dsn(self.config.url)}"
