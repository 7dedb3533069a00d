"""Coalescing many small submissions into few operations.

::

    request A ─ submit([e1])      ┐
    request B ─ submit([e2, e3])  ├─ same loop iteration ─► one ahandle([e1, e2, e3, ...])
    request C ─ submit([e4])      ┘                            │
         ▲                                                     ▼
         └──────────── each caller gets its own slice of the result ◄──┘

An operation costs the supervisor tens of microseconds whatever its size, so an HTTP
server that turned every request into its own operation would spend its CPU on
bookkeeping. :class:`Coalescer` merges what concurrent callers submit within one loop
iteration (up to ``max_batch`` events) into one operation and hands each caller the
part of the result that is its own, with error indexes relative to what it submitted.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec

from ..results import ErrorItem

if TYPE_CHECKING:
    from ..engine import Collector, Operation
    from ..results import OperationResult

__all__ = ["Coalescer", "SliceResult"]


class SliceResult(msgspec.Struct, frozen=True):
    """One caller's share of a coalesced operation."""

    handled_events: int
    failed_events: int
    errors: list[ErrorItem]
    events: list[Any] | None = None


class Coalescer:
    """Merge concurrent ``submit()`` calls on one loop into shared operations.

    ``block=False`` (the default) makes a full collector raise
    :class:`~collector.Overloaded` in every caller of the batch, which an HTTP server
    turns into 429/503 with ``Retry-After``.

    ``max_ops``: operations running at once (0: no bound, one per loop turn). What is
    submitted while that many run goes together in the next, which starts when one
    finishes, or after ``max_wait`` seconds at the latest: an operation that waits long
    (a duplicate waiting for its original, a sink retrying, a held lookup) delays the
    others by that much, not by its own wait.
    """

    def __init__(
        self, collector: Collector, *, max_batch: int = 8192, block: bool = False, max_ops: int = 0,
        max_wait: float = 0.02,
    ) -> None:
        self.collector = collector
        self.max_batch = max_batch
        self.block = block
        self.max_ops = max_ops
        self.max_wait = max_wait
        self._pending: _Batch = []
        self._count = 0
        self._scheduled: asyncio.Handle | None = None  # the next flush: soon, or a max_wait timer
        self._tasks: set[asyncio.Future[None]] = set()  # operations running (tasks or followed)
        # the loop of the first submit: one coalescer serves one loop. Cached because
        # asyncio.get_running_loop() makes a getpid() system call on Python 3.11 (fork
        # detection): 0.25 us per request saved
        self._loop: asyncio.AbstractEventLoop | None = None
        self.operations = 0  # operations started (for the events-per-operation figure)
        # the worker whose ids the next operation's events without an id get (see owner())
        self._owner = 0
        self._owned = 0  # events submitted since the owner was chosen
        self._steer = collector.pipeline.shard == "key" and collector.nworkers > 1

    def owner(self) -> tuple[int, int]:
        """``(worker, workers)``: the worker the next operation's generated ids should
        belong to, and the worker count; ``(0, 1)`` when it does not matter.

        An event sent without an id is a new event: its generated id may be any fresh
        id, so the server picks ids that the shard function puts on one worker, and
        every such event of one operation goes there (to the least loaded worker,
        taking turns). Small operations then make one chunk, not one per worker: the
        chunk's fixed costs (a frame each way, a sink write and its ``fdatasync``, the
        ack) are paid once. A later copy of such an id still reaches its owner, by the
        same shard function. Events that sent their ids go to their owners as before.

        A large operation is not left to one worker: once a chunk's worth
        (``chunk_size``) has been given to one, the next events go to another, so both
        work on it at once.
        """
        if not self._steer:
            return 0, 1
        return self._owner, self.collector.nworkers

    def _turn(self) -> None:
        """Give the next events to the least loaded worker (equal ones take turns)."""
        self._owner = self.collector.least_loaded(after=self._owner)
        self._owned = 0

    def submit(
        self, items: list[Any], keys: list[Any] | None = None, owner: int | list[int] | None = None
    ) -> asyncio.Future[SliceResult]:
        """Submit events; a future that is done when they are (``await co.submit(...)``).

        Items are Structs, dicts, or the raw JSON text of event objects (``bytes`` or
        ``msgspec.Raw``, sent on unparsed). With raw items, ``keys`` may give each
        item's shard key (see ``Collector.ahandle``). One coalescer carries one kind:
        raw items are not mixed with objects, nor keyed with unkeyed submissions.
        ``owner``: every key is a new id made for that worker (the worker of
        :meth:`owner` when the ids were generated), or a list with each key's worker by
        the pipeline's shard function (read in C with the ids a client sent); the engine
        then does not hash them.

        A plain future, not a coroutine: the HTTP server answers from its done
        callback, with no task per request (a task and its two extra loop turns cost
        ~3 % of the supervisor's CPU per single-event request). Overloaded and a
        closed collector arrive as the future's exception.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[SliceResult] = loop.create_future()
        self._pending.append((items, keys, owner, fut))
        self._count += len(items)
        self._owned += len(items)
        if self._steer and self._owned >= self.collector.chunk_size:  # a chunk's worth for this one
            self._turn()
        if self._count >= self.max_batch:
            self._flush()
        elif self._scheduled is None:
            if self.max_ops and len(self._tasks) >= self.max_ops:
                # max_ops operations are running; the next starts when one finishes, with
                # everything submitted meanwhile (the busier the engine, the larger the
                # batches), or when this timer fires first
                self._scheduled = loop.call_later(self.max_wait, self._flush)
            else:
                self._scheduled = loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if not self._pending:
            return
        batch, self._pending, self._count = self._pending, [], 0
        self.operations += 1
        assert self._loop is not None
        payload, keys, owners, bounds = _merge(batch)
        if not self.block and not self.collector.is_big(payload):
            self._start(batch, payload, keys, owners, bounds)
        else:
            t = self._loop.create_task(self._run(batch, payload, keys, owners, bounds))
            self._tasks.add(t)
            t.add_done_callback(self._finished)
        if self._steer:  # the next operation's go where there is least to do, this one counted
            self._turn()

    def _finished(self, t: asyncio.Future[None]) -> None:
        self._tasks.discard(t)
        if self._pending:  # what waited for a free operation goes now (timer or not)
            self._flush()

    def _start(
        self, batch: _Batch, payload: Any, keys: list[Any] | None, owners: list[int] | None,
        bounds: list[tuple[int, int]],
    ) -> None:
        """Start the operation now, in this loop turn, and follow it with callbacks.

        No task: a task would start one loop turn later and resume one turn after the
        operation ends, and under HTTP load a turn lasts milliseconds. Started here, the
        chunks reach the workers while the server goes on parsing this turn's requests.
        """
        try:
            op = self.collector.handle(payload, block=False, keys=keys, owners=owners)
        except Exception as exc:  # Overloaded, closed: every caller of the batch gets it
            _fail(batch, exc)
            return
        assert self._loop is not None
        done: asyncio.Future[None] = self._loop.create_future()  # for max_ops and aclose()
        self._tasks.add(done)
        self._follow(op, batch, bounds, done)

    def _follow(self, op: Operation, batch: _Batch, bounds: list[tuple[int, int]], done: asyncio.Future[None]) -> None:
        if not op.done():
            op.changed().add_done_callback(lambda _: self._follow(op, batch, bounds, done))
            return
        try:
            res = op.result()
        except Exception as exc:
            _fail(batch, exc)
        else:
            _deliver(res, batch, bounds)
        done.set_result(None)
        self._finished(done)

    async def _run(
        self, batch: _Batch, payload: Any, keys: list[Any] | None, owners: list[int] | None,
        bounds: list[tuple[int, int]],
    ) -> None:
        try:
            op = await self.collector.ahandle(payload, block=self.block, keys=keys, owners=owners)
            res = await op
        except Exception as exc:
            _fail(batch, exc)
            return
        _deliver(res, batch, bounds)

    async def aclose(self) -> None:
        """Flush what is pending and wait for the operations in flight."""
        self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


# (items, keys, owner, the caller's future): see Coalescer.submit
_Batch = list[tuple[list[Any], list[Any] | None, int | list[int] | None, "asyncio.Future[SliceResult]"]]


def _merge(batch: _Batch) -> tuple[Any, list[Any] | None, list[int] | None, list[tuple[int, int]]]:
    """The submissions as one payload, their keys, each key's worker (when every
    submission gave its owner), and each caller's index range in it."""
    merged: list[Any] = []
    keys: list[Any] | None = [] if batch and batch[0][1] is not None else None
    owners: list[int] | None = [] if keys is not None else None
    bounds = []
    for items, ks, owner, _ in batch:
        bounds.append((len(merged), len(merged) + len(items)))
        merged.extend(items)
        if keys is not None and ks is not None:
            keys.extend(ks)
            if owners is not None:
                if owner is None:  # a submission with keys of their own: the engine hashes them all
                    owners = None
                elif isinstance(owner, int):
                    owners += [owner] * len(ks)
                else:
                    owners += owner
    payload: Any = merged
    if keys is None and merged and isinstance(merged[0], (bytes, msgspec.Raw)):
        # raw JSON objects without keys: one JSON array, which the supervisor parses
        payload = b"[" + b",".join(merged) + b"]"
    return payload, keys, owners, bounds


def _fail(batch: _Batch, exc: BaseException) -> None:
    for *_, fut in batch:
        if not fut.done():
            fut.set_exception(exc)


def _deliver(res: OperationResult, batch: _Batch, bounds: list[tuple[int, int]]) -> None:
    """Each caller's slice of the result; errors are sorted by index: walked once."""
    errs = res.errors
    k = 0
    for (lo, hi), (*_, fut) in zip(bounds, batch, strict=True):
        mine = []
        while k < len(errs) and errs[k].index < hi:
            err = errs[k]
            mine.append(ErrorItem(err.index - lo, err.path, err.reason, err.kind))
            k += 1
        failed = sum(1 for m in mine if m.kind in ("invalid", "lost", "error", "retry"))
        if not fut.done():
            fut.set_result(SliceResult(hi - lo - failed, failed, mine))
