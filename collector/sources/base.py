"""The Source contract every enrichment source kind implements.

A source answers many keys at once: ``await get_many(keys)`` returns a dict holding
the keys it found. A key it does not have is simply absent (a *not found* outcome,
cached with its own TTL); a key it could not answer maps to a :class:`Failure` (a
counted failure for that key only); an exception means the whole call failed (retried,
and counted by the circuit breaker). ``max_batch`` bounds the keys per call: the runtime
cuts a chunk's distinct misses into calls of at most that many keys.

A source is built from a frozen config Struct and holds nothing else until first used
inside the worker's event loop: pickling one sends only its config (``__reduce__``), so
a ``Lookup(source=HttpSource(...))`` travels to spawned workers like a config does.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any, ClassVar

from ..errors import CollectorError

__all__ = ["Failure", "Source", "SourceError", "gather_keys"]


class SourceError(CollectorError):
    """A source call failed; the message says which source, and why.

    ``kind`` is what the per-source metrics count it as: ``http_status`` (an error
    status), ``invalid`` (invalid JSON, the wrong shape, a body over the limit) or
    ``other``; timeouts and connection errors are told apart by their own types.
    """

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind


class Failure:
    """A per-key failure inside an otherwise good answer (e.g. a currency with no rate)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Failure({self.reason!r})"


async def gather_keys(keys: Sequence[Any], calls: list[Awaitable[Any]], absent: Any = None) -> dict[Any, Any]:
    """Await one call per key at once: a value, ``absent`` (not found) or an error per key.

    Every call failing raises the first error (the whole call failed: retried, seen by
    the breaker); some failing gives those keys a :class:`Failure`.
    """
    got = await asyncio.gather(*calls, return_exceptions=True)
    errors = [v for v in got if isinstance(v, BaseException)]
    for e in errors:
        if not isinstance(e, Exception):
            raise e  # cancellation and the like are not answers
    if errors and len(errors) == len(got):
        raise errors[0]
    out: dict[Any, Any] = {}
    for k, v in zip(keys, got, strict=True):
        if isinstance(v, BaseException):
            out[k] = Failure(f"{type(v).__name__}: {v}")
        elif v is not absent:
            out[k] = v
    return out


class Source(abc.ABC):
    """Base class of the source kinds (see the module docstring).

    ``Source(config)`` or ``Source(**config_fields)``; subclasses set ``Config``.
    """

    kind: ClassVar[str] = ""
    Config: ClassVar[type[Any]]

    def __init__(self, config: Any = None, /, **fields: Any) -> None:
        if config is None:
            config = self.Config(**fields)
        elif fields:
            raise TypeError(f"{type(self).__name__}: pass a config or fields, not both")
        self.config = config

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.config,))

    @property
    def max_batch(self) -> int:
        """Keys per :meth:`get_many` call."""
        return 1000

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[Any]) -> dict[Any, Any]:
        """The values of ``keys`` that exist (see the module docstring)."""

    async def get(self, key: Any, default: Any = None) -> Any:
        """One key's value, ``default`` when absent (a :class:`Failure` raises)."""
        v = (await self.get_many([key])).get(key, default)
        if isinstance(v, Failure):
            raise SourceError(f"{self.describe()}: key {key!r}: {v.reason}")
        return v

    async def health(self) -> dict[str, Any]:
        """A small JSON-able status; the default makes no call."""
        return {"kind": self.kind, "ok": True}

    async def close(self) -> None:  # noqa: B027 - optional hook, empty on purpose
        """Release connections (called once when the worker stops)."""

    def describe(self) -> str:
        """What to name in logs: kind and address, never credentials."""
        return self.kind
