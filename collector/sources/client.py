"""The ``client`` kind: today's "object with methods" path as a Source.

``Lookup(method="get_region")`` with ``Pipeline(client=obj)`` keeps its own runtime
(:class:`~collector.sources.lookup.LookupRuntime`: one call per distinct key, async
or on the worker's thread pool) and behaves as it always did. :class:`ClientSource`
puts the same kind of method behind the Source contract, so it gets the source
runtime's caches, breaker and counters: ``ClientSource(client="pkg.mod:factory",
method="get_x")`` or ``ClientSource.of(obj, "get_x")`` (``obj`` must be picklable).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError
from .base import Source, gather_keys
from .config import ClientSourceConfig

__all__ = ["ClientSource", "bind_method"]


def bind_method(client: Any, method: str, lookup: str) -> Callable[[Any], Any]:
    """``client.<method>``; the error names the lookup and the missing method."""
    fn = getattr(client, method, None)
    if fn is None or not callable(fn):
        raise ConfigError(
            f"lookup {lookup!r}: the client {type(client).__name__} has no method {method!r}"
        )
    return fn


def is_async(fn: Callable[..., Any]) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class ClientSource(Source):
    """A method of a client object, one call per key, all keys of a batch concurrently."""

    kind = "client"
    Config = ClientSourceConfig

    def __init__(self, config: Any = None, /, **fields: Any) -> None:
        super().__init__(config, **fields)
        self.obj: Any = None
        self.fn: Callable[[Any], Any] | None = None

    @classmethod
    def of(cls, obj: Any, method: str) -> ClientSource:
        """A ClientSource over an object already built."""
        src = cls(client="-", method=method)
        src.obj = obj
        return src

    def __reduce__(self) -> tuple[Any, ...]:
        if self.obj is not None and self.config.client == "-":
            return (_rebuild, (self.obj, self.config.method))
        return super().__reduce__()

    def _bind(self) -> Callable[[Any], Any]:
        if self.fn is None:
            if self.obj is None:
                from ..pipeline import import_string

                o = import_string(self.config.client, "client")
                self.obj = o() if callable(o) and not hasattr(o, self.config.method) else o
            self.fn = bind_method(self.obj, self.config.method, self.config.method)
        return self.fn

    async def get_many(self, keys: Sequence[Any]) -> dict[Any, Any]:
        """Each key's call at once; ``None`` means not found, an error fails that key."""
        fn = self._bind()
        if is_async(fn):
            calls = [fn(k) for k in keys]
        else:
            loop = asyncio.get_running_loop()
            calls = [loop.run_in_executor(None, fn, k) for k in keys]
        return await gather_keys(keys, calls)

    def describe(self) -> str:
        return f"client {self.config.client}.{self.config.method}"


def _rebuild(obj: Any, method: str) -> ClientSource:
    return ClientSource.of(obj, method)
