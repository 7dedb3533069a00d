"""What stands between a lookup and a slow source: single-flight and a circuit breaker.

::

    misses ─► Flights: key already being fetched? join its future (coalesced)
                       : lead it (the future is registered before anything awaits)
          ─► CircuitBreaker.allow()? no ─► fallback at once (stale value or default)
          ─► semaphore (concurrency bound) ─► timeout ─► source ─► success()/failure()

Breaker states: ``closed`` (calls go through) → ``open`` after ``failures`` consecutive
failed calls, or when the failed share of the last ``window`` calls reaches
``error_rate`` → after ``reset_timeout`` seconds ``half_open``: one probe call goes
through, the rest fail fast; the probe's success closes the breaker, its failure opens
it again. The clock is injectable so tests drive it without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CircuitBreaker", "Flights"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Flights:
    """The single-flight table of one lookup in one worker: key → the future of its call."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls: dict[Any, asyncio.Future[Any]] = {}

    def get(self, key: Any) -> asyncio.Future[Any] | None:
        """The call already under way for ``key`` (``TypeError`` if it is unhashable)."""
        return self.calls.get(key)

    def lead(self, key: Any) -> asyncio.Future[Any]:
        """Register a new call for ``key``; its future is what followers await."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.calls[key] = fut
        return fut

    def lead_many(self, keys: list[Any]) -> asyncio.Future[Any]:
        """Register one call for all ``keys``; its result maps each key to its answer."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.join(keys, fut)
        return fut

    def join(self, keys: list[Any], fut: asyncio.Future[Any]) -> None:
        """Register ``keys`` as answered by ``fut`` (a call not yet sent)."""
        calls = self.calls
        for k in keys:
            calls[k] = fut

    def settle_many(self, keys: list[Any], fut: asyncio.Future[Any], answers: Any) -> None:
        """Hand ``answers`` to everyone waiting on ``fut`` and forget its keys."""
        calls = self.calls
        for k in keys:
            if calls.get(k) is fut:
                del calls[k]
        if not fut.done():
            fut.set_result(answers)

    def settle(self, key: Any, value: Any) -> None:
        """Hand ``value`` to everyone waiting on ``key`` and forget the call."""
        fut = self.calls.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def abandon_many(self, keys: list[Any], fut: asyncio.Future[Any]) -> None:
        """Forget the call ``fut`` answering ``keys`` (its leader was cancelled)."""
        calls = self.calls
        for k in keys:
            if calls.get(k) is fut:
                del calls[k]
        if not fut.done():
            fut.cancel()

    def abandon(self, key: Any) -> None:
        """Forget ``key``'s call; followers see it cancelled (counted as a failure)."""
        fut = self.calls.pop(key, None)
        if fut is not None and not fut.done():
            fut.cancel()


class CircuitBreaker:
    """Closed / open / half-open, by consecutive failures or an error rate (see module doc)."""

    def __init__(
        self,
        failures: int = 5,
        reset_timeout: float = 10.0,
        *,
        error_rate: float = 0.0,
        window: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.reset_timeout = reset_timeout
        self.error_rate = error_rate
        self.clock = clock
        self.recent: deque[int] = deque(maxlen=window)  # 1 = failed call
        self.consecutive = 0
        self.opened_at = 0.0
        self._state = CLOSED
        self.probing = False
        self.opens = 0  # transitions to open, for the stats
        self.entered = {CLOSED: 0, OPEN: 0, HALF_OPEN: 0}  # transitions into each state
        self.transitions: list[tuple[str, str]] = []

    @property
    def state(self) -> str:
        """The state now (an open breaker past its reset timeout reads as half-open)."""
        if self._state == OPEN and self.clock() - self.opened_at >= self.reset_timeout:
            return HALF_OPEN
        return self._state

    def _go(self, state: str) -> None:
        self.transitions.append((self._state, state))
        self.entered[state] += 1
        if len(self.transitions) > 64:
            del self.transitions[:32]
        self._state = state
        if state == OPEN:
            self.opens += 1
            self.opened_at = self.clock()
        elif state == CLOSED:
            self.consecutive = 0
            self.recent.clear()
        self.probing = False

    def allow(self) -> bool:
        """May a call go out now? In half-open, only the one probe may."""
        if self._state == CLOSED:
            return True
        if self._state == OPEN:
            if self.clock() - self.opened_at < self.reset_timeout:
                return False
            self._go(HALF_OPEN)
        if self.probing:
            return False
        self.probing = True
        return True

    def success(self) -> None:
        """A call succeeded."""
        self.consecutive = 0
        self.recent.append(0)
        if self._state != CLOSED:
            self._go(CLOSED)

    def failure(self) -> None:
        """A call failed (timeout, connection, server error, malformed answer)."""
        self.consecutive += 1
        self.recent.append(1)
        if self._state == HALF_OPEN or (self._state == CLOSED and self._tripped()):
            self._go(OPEN)

    def _tripped(self) -> bool:
        if self.failures > 0 and self.consecutive >= self.failures:
            return True
        r = self.recent
        return self.error_rate > 0 and len(r) == r.maxlen and sum(r) >= self.error_rate * len(r)
