"""The ``max_inflight`` bound: admit a batch, or block, await, or raise ``Overloaded``.

::

    handle(batch)  ── admit_sync(n) ── room? take it : wait on the condition (or raise)
    ahandle(batch) ── admit(n) ─────── room? take it : await a future (or raise)
    operation done ── release(n) ───── wake both kinds of waiter

A batch larger than the bound is admitted alone, when nothing else is in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..errors import Overloaded
from .operation import Waiters

__all__ = ["Admission"]


class Admission:
    """Counts events admitted and not done; thread-safe, for sync and async callers.

    ``check_open`` raises when the engine takes no more work (closed, halted): it is
    called under the lock before every admission, so a waiter woken by a shutdown
    gets that error instead of room.
    """

    def __init__(self, max_inflight: int, check_open: Callable[[], None]) -> None:
        self.max_inflight = max_inflight
        self.check_open = check_open
        self.inflight = 0  # events admitted and not done
        self._cond = threading.Condition()
        self._waiters = Waiters()

    def overloaded(self, n: int) -> Overloaded:
        """The error for a batch of ``n`` that does not fit now."""
        return Overloaded(
            f"{self.inflight} events in flight, max_inflight={self.max_inflight}: cannot take {n} more now",
            retry_after=1.0,
        )

    def _try_locked(self, n: int) -> bool:
        self.check_open()
        if self.inflight == 0 or self.inflight + n <= self.max_inflight:
            self.inflight += n
            return True
        return False

    def try_admit(self, n: int) -> bool:
        """Take room for ``n`` events if there is some."""
        with self._cond:
            return self._try_locked(n)

    def admit_sync(self, n: int, block: bool, timeout: float | None, on_loop: bool) -> None:
        """Take room for ``n`` events, blocking up to ``timeout`` when ``block``.

        ``on_loop``: the caller is the engine's own loop thread, where waiting would
        deadlock (the loop that releases room would be blocked): raise instead.
        """
        with self._cond:
            if self._try_locked(n):
                return
            if not block or on_loop:
                raise self.overloaded(n)
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._try_locked(n):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise self.overloaded(n)
                self._cond.wait(left)

    async def admit(self, n: int, block: bool) -> None:
        """Take room for ``n`` events, awaiting it (never blocking the loop)."""
        while True:
            if self.try_admit(n):
                return
            if not block:
                raise self.overloaded(n)
            with self._cond:
                if self._try_locked(n):
                    return
                fut = self._waiters.add()
            await fut

    def release(self, n: int) -> None:
        """``n`` events are done: give their room back and wake the waiters."""
        with self._cond:
            self.inflight -= n
        self.wake()

    def wake(self) -> None:
        """Wake every waiter (room freed, or the engine closing: they re-check)."""
        with self._cond:
            self._cond.notify_all()
            self._waiters.wake()
