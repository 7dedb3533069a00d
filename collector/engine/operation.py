"""One ``handle()`` call: its progress while it runs and its result after.

The engine (on the supervisor loop) accounts acknowledged chunks into the operation and
finishes it; callers on any thread or loop read it. Waiting is thread-safe: blocking
callers wait on a condition, asyncio callers on a future woken with
``call_soon_threadsafe`` on their own loop (:func:`wake`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from ..results import BatchAccumulator, ErrorItem, OperationResult

__all__ = ["Operation", "Plan", "Progress", "RangePart", "Waiters"]

_op_ids = itertools.count(1)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Waiters:
    """Futures of asyncio callers on any loop, woken together from any thread."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def add(self) -> asyncio.Future[None]:
        """A future on the running loop, resolved by the next :meth:`wake`."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self.items.append((loop, fut))
        return fut

    def wake(self) -> None:
        """Resolve every future, each on its own loop.

        A future of the loop running this very thread is resolved at once: going
        through ``call_soon_threadsafe`` would cost its waiter one more loop turn (and
        a self-pipe write), and under HTTP load a turn of the supervisor's loop lasts
        milliseconds.
        """
        items, self.items = self.items, []
        if not items:
            return
        here = asyncio._get_running_loop()  # None off a loop thread
        for loop, fut in items:
            if loop is here:
                _set_done(fut)
                continue
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_set_done, fut)


@dataclass(slots=True)
class Plan:
    """How an operation's input was cut: what its chunks need until acknowledged.

    ``base[i]`` is the input index of the i-th routed item; ``shard_of[i]`` its worker
    (None with one worker or no keys). ``routed``, ``slices`` and ``body`` are the
    input still to cut; :meth:`Planner.cut` drops them once chunks hold it.
    """

    base: range | list[int]
    shard_of: list[int] | None
    ndjson: bool  # payloads are NDJSON (else a JSON array)
    encode: Callable[[Any], bytes | None]  # Entry → payload (plan.Planner's encoder)
    routed: list[Any] | None
    slices: list[tuple[int, int]] | None = None  # NDJSON byte ranges (start, end), in input order
    body: bytes | None = None
    route: int = 0  # shard="key" NDJSON ranges: the workers route them over this many
    # (lo, hi, worker) → input indices of that worker's items in segment [lo, hi): worked
    # out once, when a chunk of it first needs its positions (an error, events returned)
    shares: dict[tuple[int, int, int], list[int]] = field(default_factory=dict)

    def empty(self) -> bool:
        """Nothing for the workers (every input was rejected, or there was none)."""
        return not self.routed and not self.slices


class RangePart:
    """What the workers reported of one NDJSON range (an operation's ``parts[k]``).

    ``lines``: the range's count of events (-1 until known); ``errors`` with line
    indices in the range; ``events`` when the operation returns them. A routed range
    (``shard="key"``) also has ``own``, once its router said how it split it: the lines
    the router answers for.
    """

    __slots__ = ("errors", "events", "lines", "own")

    def __init__(self) -> None:
        self.lines = -1
        self.errors: list[Any] = []
        self.events: list[Any] | None = None
        self.own: Sequence[int] | None = None


class Operation:
    """One ``handle()`` call: progress while it runs, an :class:`OperationResult` after.

    ``progress()`` yields integer percentages (sync or ``async for``), ``wait()`` or
    ``await op`` gives the result, ``done()`` says whether it is complete, ``stats()``
    reports figures so far. Thread-safe: the supervisor completes it from its loop.
    """

    def __init__(self, total: int, return_events: bool, distinct_keys: int) -> None:
        self.total = total  # an estimate until resolved when ``parts`` is set
        self.admitted = total  # what admission (max_inflight) counted for it
        self.handled = 0
        self.failed = 0
        self.errors: list[ErrorItem] = []
        self.acc = BatchAccumulator()
        self.events: list[Any] | None = [None] * total if return_events else None
        self.chunks_left = 0
        self.started = time.monotonic()
        self.finished: float | None = None
        self.distinct_keys = distinct_keys
        self.id = next(_op_ids)
        self.sealed = False  # every chunk has been queued: chunks_left == 0 means done
        self.worker_counted = 0  # events the workers' stats slots account for
        self.plan: Plan | None = None  # how the input was cut (set by the Planner)
        self.reported_keys: set[Any] | None = None  # shard="chunk": distinct keys workers saw
        # NDJSON ranges: per range ordinal, the workers' count of lines, errors and
        # events, placed in the input once every range is counted (Ledger.resolve)
        self.parts: list[RangePart] | None = None
        self.loop_thread: int | None = None  # the supervisor loop's thread: wait() there deadlocks
        self._cond = threading.Condition()
        self._result: OperationResult | None = None
        self._exc: BaseException | None = None
        self._waiters = Waiters()

    # -- called by the engine ---------------------------------------------------------
    def account(self, handled: int, failed: int) -> None:
        """Count events the workers finished (engine use)."""
        with self._cond:
            before = self.percent()
            self.handled += handled
            self.failed += failed
            if self.percent() == before:
                return  # waiters wake on a new percentage or the end, not on every ack
            self._cond.notify_all()
        self._waiters.wake()

    def finish(self, exc: BaseException | None = None) -> None:
        """Seal the result, or fail the operation with ``exc`` (engine use; idempotent)."""
        with self._cond:
            if self._result is not None or self._exc is not None:
                return
            self.finished = time.monotonic()
            if exc is not None:
                self._exc = exc
            else:
                self.errors.sort(key=attrgetter("index"))
                keys = len(self.reported_keys) if self.reported_keys is not None else self.distinct_keys
                self._result = OperationResult(
                    handled_events=self.handled,
                    failed_events=self.failed,
                    elapsed=self.finished - self.started,
                    errors=self.errors,
                    batch=self.acc.freeze(self.total, keys),
                    events=self.events,
                )
            self._cond.notify_all()
        self._waiters.wake()

    # -- public -----------------------------------------------------------------------
    def done(self) -> bool:
        """True once the result (or a fatal error) is in."""
        return self._result is not None or self._exc is not None

    def percent(self) -> int:
        """Completion in percent; 100 only once the operation is done."""
        if self.done():
            return 100
        if self.total == 0:
            return 0
        return min(99, (self.handled + self.failed) * 100 // self.total)

    def wait(self, timeout: float | None = None) -> OperationResult:
        """Block until done; the result, or the error that stopped the collector.

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        if self.loop_thread == threading.get_ident() and not self.done():
            raise RuntimeError(
                "Operation.wait() would block the event loop the collector runs on; "
                "use 'await op' in asyncio code"
            )
        with self._cond:
            if not self._cond.wait_for(self.done, timeout):
                raise TimeoutError(f"operation not done after {timeout}s ({self.percent()}%)")
        return self.result()

    def result(self) -> OperationResult:
        """The result of a finished operation (raises if it is not done or failed)."""
        if self._exc is not None:
            raise self._exc
        if self._result is None:
            raise RuntimeError("operation not done yet")
        return self._result

    def __await__(self) -> Generator[Any, None, OperationResult]:
        while not self.done():
            yield from self.changed().__await__()
        return self.result()

    def changed(self) -> asyncio.Future[None]:
        """A future resolved at the next change of progress (or at once when done)."""
        with self._cond:
            fut = self._waiters.add()
            if self.done():
                _set_done(fut)
        return fut

    def progress(self, interval: float = 0.5) -> Progress:
        """Percentages 0..100, non-decreasing, at least one per ``interval`` s, last 100.

        Iterate with ``for`` (blocking) or ``async for`` (asyncio).
        """
        return Progress(self, interval)

    def wait_change(self, seen: int, timeout: float) -> None:
        """Block until the percentage passes ``seen`` or ``timeout`` seconds pass."""
        with self._cond:
            self._cond.wait_for(lambda: self.percent() > seen, timeout)

    def stats(self) -> dict[str, Any]:
        """Figures so far: events handled and failed, elapsed seconds, events per second."""
        end = self.finished or time.monotonic()
        elapsed = end - self.started
        n = self.handled + self.failed
        return {
            "total": self.total,
            "handled_events": self.handled,
            "failed_events": self.failed,
            "percent": self.percent(),
            "elapsed": elapsed,
            "events_per_sec": n / elapsed if elapsed > 0 else 0.0,
            "done": self.done(),
        }


class Progress:
    """Iterator and async iterator over an operation's percentages."""

    def __init__(self, op: Operation, interval: float) -> None:
        self.op = op
        self.interval = interval

    def __iter__(self) -> Iterator[int]:
        op = self.op
        last = -1
        while True:
            pct = op.percent()
            if pct >= last:
                yield pct
                last = pct
            if pct == 100:
                return
            op.wait_change(last, self.interval)

    async def __aiter__(self) -> AsyncIterator[int]:
        op = self.op
        last = -1
        while True:
            pct = op.percent()
            if pct >= last:
                yield pct
                last = pct
            if pct == 100:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(op.changed(), self.interval)
