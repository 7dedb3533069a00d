"""One backoff policy for every retry loop: exponential, capped, jittered.

Try ``n`` (0-based) waits a random time below ``min(cap, base * 2**n)``: uniform in
``[0, ceiling]`` with ``jitter="full"`` (as in the AWS architecture note on backoff:
after a shared outage the retries of many keys, workers and daemons spread over the
whole window), or in ``[ceiling/2, ceiling]`` with ``jitter="equal"`` (sinks: never
hammer a recovering store in lockstep, never retry much sooner than the backoff says).
Enrichment sources use full jitter, sinks and the dead-letter sink equal jitter.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

__all__ = ["Backoff"]

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """``retries`` more tries after the first, waiting :meth:`delay` between them."""

    base: float = 0.05
    cap: float = 10.0
    retries: int = 2  # -1: for ever (run() then never gives up)
    jitter: Literal["full", "equal"] = "full"

    def ceiling(self, attempt: int) -> float:
        """The longest wait after failed try ``attempt`` (0-based)."""
        # the exponent is capped: a loop that retries for ever must not overflow a float
        return min(self.cap, self.base * 2.0 ** min(attempt, 60))

    def delay(self, attempt: int, rand: Callable[[float, float], float] = random.uniform) -> float:
        """A wait drawn from ``[0, ceiling]`` (full jitter) or ``[ceiling/2, ceiling]`` (equal)."""
        top = self.ceiling(attempt)
        return rand(top / 2 if self.jitter == "equal" else 0.0, top)

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
                if 0 <= self.retries <= attempt or not retry_if(e):
                    raise
            await asyncio.sleep(self.delay(attempt))
            attempt += 1
