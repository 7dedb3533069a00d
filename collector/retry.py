"""One backoff policy for every retry loop: exponential, capped, with FULL jitter.

Try ``n`` (0-based) waits a uniform random time in ``[0, min(cap, base * 2**n)]``
("full jitter", as in the AWS architecture note on backoff): after a shared outage the
retries of many keys, workers and daemons spread over the whole window instead of
arriving together at ``base * 2**n``. Enrichment sources use it; sinks can move to it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Backoff"]

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """``retries`` more tries after the first, waiting :meth:`delay` between them."""

    base: float = 0.05
    cap: float = 10.0
    retries: int = 2

    def ceiling(self, attempt: int) -> float:
        """The longest wait after failed try ``attempt`` (0-based)."""
        return min(self.cap, self.base * (2**attempt))

    def delay(self, attempt: int, rand: Callable[[float, float], float] = random.uniform) -> float:
        """A wait drawn uniformly from ``[0, ceiling(attempt)]`` (full jitter)."""
        return rand(0.0, self.ceiling(attempt))

    async def run(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        retry_if: Callable[[Exception], bool] = lambda e: True,
        on_error: Callable[[int, Exception], None] | None = None,
    ) -> T:
        """Await ``fn()`` until it succeeds or the tries run out (the last error is raised).

        ``on_error(attempt, error)`` sees every failed try; ``retry_if(error)`` false
        stops at once. Cancellation is never retried.
        """
        attempt = 0
        while True:
            try:
                return await fn()
            except Exception as e:
                if on_error is not None:
                    on_error(attempt, e)
                if attempt >= self.retries or not retry_if(e):
                    raise
            await asyncio.sleep(self.delay(attempt))
            attempt += 1
