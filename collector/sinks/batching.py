"""Group commit: one round batcher for every sink that merges concurrent writes.

::

    submit(A) ─┐                          a round: merge(A, B, C) (up to max_size) ─► run(merged)
    submit(B) ─┼─► pending (FIFO) ───────►   ok ─► A, B, C return
    submit(C) ─┘        ▲                    data error (split) ─► A, B, C each alone
                        │                    other error ─► A, B, C all raise it
    cancelled caller ───┘ withdrawn, if no round took it yet

Up to ``concurrency`` rounds run at once; what arrives meanwhile waits for the next.
A caller that gives up (its attempt timed out behind a stalled store) takes its
item back out of the queue: left there, every retry of the chunk queued another copy,
all of them written once the store woke up (and held in memory until then, even for
chunks already dead-lettered). A round already running is never cancelled by one of
its callers: the others share it.

:class:`GroupCommit` (SQL sinks: lists of rows, async commit) and :class:`GroupWriter`
(line files: bytes through a blocking function on a private thread) are the two
shapes of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
from collections.abc import Awaitable, Callable, Sized
from typing import Any, Generic, TypeVar

__all__ = ["GroupCommit", "GroupWriter", "RoundBatcher", "SinkThread"]

T = TypeVar("T", bound=Sized)


class RoundBatcher(Generic[T]):
    """Runs ``run(merge(items))`` for the items submitted meanwhile; see the module docstring.

    ``run`` stores one merged item (one attempt; raises on failure, and must leave
    nothing of a failed round behind). ``max_size`` bounds a round by ``len`` of its
    items (a single larger item still goes alone; ``None``: no bound). When a merged
    round fails with an error ``split(e)`` accepts, each of its items is retried in a
    round of its own, so only the one holding the refused data fails.
    """

    def __init__(
        self,
        run: Callable[[T], Awaitable[object]],
        merge: Callable[[list[T]], T],
        *,
        max_size: int | None = None,
        concurrency: int = 1,
        split: Callable[[BaseException], bool] | None = None,
    ) -> None:
        self._run = run
        self._merge = merge
        self.max_size = max_size
        self.concurrency = concurrency
        self._split = split
        self._pending: collections.deque[tuple[T, asyncio.Future[None]]] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> bool:
        """A round is running or about to."""
        return bool(self._tasks)

    async def submit(self, item: T) -> None:
        """Return once a round holding ``item`` succeeded (raise its error if it failed)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((item, fut))
        if len(self._tasks) < self.concurrency:
            self._tasks.add(loop.create_task(self._rounds()))
        # shield: a cancelled caller must not cancel a round other callers share
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            # the caller gave up: withdraw its item if no round took it yet (the retry,
            # if any, queues it again)
            for i, (_, f) in enumerate(self._pending):
                if f is fut:
                    del self._pending[i]
                    fut.cancel()
                    break
            raise

    def _take(self) -> list[tuple[T, asyncio.Future[None]]]:
        pending = self._pending
        items = [pending.popleft()]
        if self.max_size is None:
            items.extend(pending)
            pending.clear()
            return items
        n = len(items[0][0])
        while pending and n + len(pending[0][0]) <= self.max_size:
            items.append(pending.popleft())
            n += len(items[-1][0])
        return items

    async def _rounds(self) -> None:
        pending = self._pending
        try:
            while pending:
                items = self._take()
                merged = items[0][0] if len(items) == 1 else self._merge([x for x, _ in items])
                try:
                    try:
                        await self._run(merged)
                    except Exception as e:
                        if len(items) > 1 and self._split is not None and self._split(e):
                            for x, f in items:
                                try:
                                    await self._run(x)
                                except Exception as e1:
                                    _fail(f, e1)
                                else:
                                    _done(f)
                        else:
                            for _, f in items:
                                _fail(f, e)
                    else:
                        for _, f in items:
                            _done(f)
                except BaseException:  # cancelled: the sink is closing
                    for _, f in items:
                        f.cancel()
                    raise
        except asyncio.CancelledError:
            while pending:  # the sink is closing: no round will run these
                pending.popleft()[1].cancel()
            raise
        finally:
            # leave the running set in the same step as the last look at `pending`: as a
            # done callback this ran a loop turn later, and a chunk submitted in between
            # saw the task still counted, started none and waited for the next submit
            # (or its timeout, after which its rows were dead-lettered and stored too)
            self._tasks.discard(asyncio.current_task())

    async def drain(self) -> None:
        """Wait for the rounds in progress (and those they start); never cancels one."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))


def _done(f: asyncio.Future[None]) -> None:
    if not f.done():
        f.set_result(None)


def _fail(f: asyncio.Future[None], e: BaseException) -> None:
    if not f.done():
        f.set_exception(e)
        # a caller whose attempt timed out no longer awaits it: mark it retrieved
        f.add_done_callback(lambda f: f.exception())


def _concat(parts: list[list[Any]]) -> list[Any]:
    return [r for rows in parts for r in rows]


class GroupCommit(RoundBatcher[list[Any]]):
    """Group commit for SQL sinks: chunks submitted while transactions run share the next one.

    ``commit(rows)`` stores a list of rows in one transaction (one attempt; raises on
    failure). ``await submit(rows)`` returns once a transaction holding ``rows``
    committed. Up to ``concurrency`` transactions run at once (a pool's connections);
    chunks that arrive while all of them are busy are merged into the next one, up to
    ``max_rows`` rows. When a merged transaction fails with a data error
    (``is_data_error``), every chunk of it is retried in its own transaction, so only
    the chunk holding the refused row fails (the :class:`SinkSet` then isolates the
    row); any other error fails every chunk of it, and each retries on its own.
    """

    def __init__(
        self,
        commit: Callable[[list[Any]], Awaitable[object]],
        is_data_error: Callable[[BaseException], bool],
        max_rows: int,
        concurrency: int = 1,
    ) -> None:
        super().__init__(commit, _concat, max_size=max_rows, concurrency=concurrency, split=is_data_error)


class GroupWriter(RoundBatcher[bytes]):
    """Merges concurrent writes into one blocking call run on a private thread.

    ``await write(data)`` returns once ``data`` went through ``fn`` (with whatever else
    was queued meanwhile); if ``fn`` raises, every caller of that round gets the error
    and ``fn`` must have left nothing of that round behind.
    """

    def __init__(self, fn: Callable[[bytes], object], name: str, executor: SinkThread | None = None) -> None:
        super().__init__(self._call, b"".join)
        self._fn = fn
        self._own = executor is None
        self.executor = executor or SinkThread(f"collector-sink-{name}")

    async def _call(self, blob: bytes) -> None:
        await self.executor.run(self._fn, blob)

    async def write(self, data: bytes) -> None:
        """Write ``data`` (whole lines) through the blocking function."""
        await self.submit(data)

    def shutdown(self) -> None:
        """Stop the thread (after :meth:`drain`), if this writer owns it."""
        if self._own:
            self.executor.shutdown(wait=True)


class SinkThread:
    """One thread running a sink's blocking calls in the order given (the line files'
    writes and syncs; SQLite's, whose connection belongs to one thread).

    :meth:`run` is the hot path (every ``fdatasync`` of the JSONL sink): a
    ``SimpleQueue`` put, and the result set on the caller's loop by one
    ``call_soon_threadsafe``. ``loop.run_in_executor`` on a ``ThreadPoolExecutor(1)``
    also takes the pool's shutdown locks and idle semaphore and chains a
    ``concurrent.futures.Future`` into the loop's, Python code that holds the GIL
    while the loop wants it (``bench/sink_handoff.py``: 78-85 against 71-74 µs of CPU
    per write + ``fdatasync``, 43-46 against 34 µs per bare round trip). The thread
    starts on first use; it is a daemon, so a process that exits without closing its
    sinks is not held up by it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _ensure_started(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: cannot run calls after shutdown")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``fn(*args)`` on the thread, after what was queued before; a future of the
        running loop for its result. Cancelling it does not stop a call already queued."""
        if self._thread is None or self._closed:
            self._ensure_started()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.put((fn, args, loop, fut))
        return fut

    def shutdown(self, wait: bool = True) -> None:
        """Run what is queued, then stop the thread (joined when ``wait``)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            if wait:
                thread.join()

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            fn, args, loop, fut = item
            del item
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as e:
                error = e
            # RuntimeError: the loop closed meanwhile, and nobody awaits the call
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, fut, result, error)
            del fut, result, error


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
