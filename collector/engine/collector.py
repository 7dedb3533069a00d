"""The embedding API: :class:`Collector`, the facade that wires the engine's parts.

::

    handle(batch) ─► Planner.prepare ─► Admission (max_inflight) ─► Planner.cut ─► Ledger
                                                                              │ pump
    Operation ◄── account / finish ◄── Ledger.on_ack ◄── WorkerPool.read ◄── channel i
    worker i dies ─► WorkerPool ─► worker_lost(i) ─► Ledger.take_back/requeue ─► respawn
    stats() ─► sum of shared-memory slots (no lock, no message)

The supervisor's own work runs on one asyncio loop: the caller's running loop under
``async with Collector(...)``, or a dedicated uvloop thread under ``with Collector(...)``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import multiprocessing as mp
import os
import threading
import time
import weakref
from typing import Any

from .. import stats as S
from ..arena import MAX_SLOTS
from ..errors import CollectorClosed, CollectorError, ConfigError, WorkerBootError
from ..pipeline import Pipeline, resolve_pipeline
from ..protocol import Ack, Routed, Snapshot
from .admission import Admission
from .ledger import Ledger, events_decoder
from .loop import LoopThread
from .materialize import Materialized
from .operation import Operation
from .plan import Entry, Planner
from .pool import WorkerPool
from .reads import Reads

__all__ = ["Collector"]


class Collector(Reads):
    """Shard batches over CPU-pinned worker processes, enrich, count, deliver.

    ``pipeline`` is a :class:`~collector.Pipeline` or a ``"module:attr"`` import string.
    ``workers`` defaults to one per CPU in the caller's affinity mask; ``cpus`` pins
    worker *i* to ``cpus[i % len(cpus)]`` (``cpus=[]`` disables pinning).
    ``max_inflight`` bounds events accepted and not yet done: ``handle()`` blocks,
    ``ahandle()`` awaits, and either raises :class:`~collector.Overloaded` with
    ``block=False``. A batch larger than ``max_inflight`` is admitted alone, when
    nothing else is in flight. ``chunk_size`` events travel per message; each worker
    has at most ``window`` chunks in flight. A worker whose heartbeat is older than
    ``heartbeat_timeout`` seconds is killed and replaced.

    Use it as a context manager (``with`` or ``async with``) or call ``start()`` /
    ``close()`` (``astart()`` / ``aclose()``).
    """

    def __init__(
        self,
        pipeline: Pipeline | str,
        *,
        workers: int | None = None,
        cpus: list[int] | None = None,
        max_inflight: int = 1_000_000,
        chunk_size: int = 2048,
        window: int = 16,
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 10.0,
        boot_timeout: float = 60.0,
        shutdown_timeout: float = 30.0,
        max_attempts: int = 3,
        start_method: str = "spawn",
    ) -> None:
        self.pipeline = resolve_pipeline(pipeline)
        pipeline_arg: Pipeline | str = pipeline if isinstance(pipeline, str) else self.pipeline
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cpus = list(affinity) if cpus is None else list(cpus)
        outside = sorted(set(self.cpus) - set(affinity)) if affinity else []
        if outside:
            raise ConfigError(
                f"cpus {outside} are not among the CPUs this process may run on ({affinity}): "
                "pin workers to those, or pass cpus=[] to leave placement to the kernel"
            )
        n = workers if workers is not None else max(1, len(self.cpus) or (os.cpu_count() or 1))
        if n < 1:
            raise ConfigError(f"workers must be >= 1 (got {n})")
        if chunk_size < 1 or window < 1 or max_inflight < 1:
            raise ConfigError("chunk_size, window and max_inflight must be >= 1")
        if start_method not in ("spawn", "forkserver"):
            raise ConfigError(
                f"start_method must be 'spawn' or 'forkserver' (got {start_method!r}); "
                "fork is unsafe with the supervisor's threads"
            )
        self.nworkers = n
        self.max_inflight = max_inflight
        self.chunk_size = chunk_size
        self.window = window
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.boot_timeout = boot_timeout
        self.shutdown_timeout = shutdown_timeout
        self.max_attempts = max_attempts
        self.planner = Planner(self.pipeline, n, chunk_size)
        self.admission = Admission(max_inflight, self._check_open)
        self.pool = WorkerPool(
            self,
            [self.cpus[i % len(self.cpus)] if self.cpus else None for i in range(n)],
            mp.get_context(start_method),
            pipeline_arg,
            heartbeat_interval,
            heartbeat_timeout,
            # the ledger keeps at most ``window`` chunks in flight per worker; in key mode
            # each other worker's ranges also reserve a slot here for their part to this
            # one (which then waits in it until this worker has room). A larger window
            # than the arena's cap, or a full arena, sends the rest inline
            arena_slots=min(window * (1 if self.planner.chunked else n), MAX_SLOTS),
        )
        self.ledger = Ledger(
            self.pool.slots, window, max_attempts, self.admission, events_decoder(self.pipeline.event_type),
            self.planner,
        )
        self.materialized = Materialized(self.pipeline, n)
        self._block: S.StatsBlock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: LoopThread | None = None  # the supervisor's own loop thread (sync use)
        self._loop_thread_id: int | None = None
        self._own_loop = False
        self._state = "new"  # new → running → closing → closed (or halted)
        self.fatal_error: BaseException | None = None
        self._monitor: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Collector:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: Any) -> None:
        # on Ctrl-C the caller wants out: drain briefly instead of for shutdown_timeout
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.close(timeout=2.0 if interrupted else None)

    async def __aenter__(self) -> Collector:
        await self.astart()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start workers with the supervisor on its own uvloop thread; blocks until ready."""
        if self._state != "new":
            raise CollectorError(f"collector already {self._state}")
        self._runner = LoopThread("collector-supervisor")
        loop = self._loop = self._runner.start()
        self._loop_thread_id = self._runner.ident
        self._own_loop = True
        fut = asyncio.run_coroutine_threadsafe(self._start(), loop)
        try:
            fut.result()
        except BaseException:
            self._stop_thread()
            raise

    async def astart(self) -> None:
        """Start workers with the supervisor on the running loop; awaits until ready."""
        if self._state != "new":
            raise CollectorError(f"collector already {self._state}")
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        await self._start()

    async def _start(self) -> None:
        assert self._loop is not None
        self._block = S.StatsBlock(self.nworkers)
        self.ledger.counters = self._block.supervisor
        self._state = "running"
        try:
            self.pool.start(self._block, self._loop)
            deadline = time.monotonic() + self.boot_timeout
            while not self.pool.all_ready():
                if self.fatal_error is not None:
                    raise self.fatal_error
                if time.monotonic() > deadline:
                    raise WorkerBootError(
                        f"workers not ready after {self.boot_timeout}s: "
                        f"{[w.index for w in self.pool.slots if not w.ready]}"
                    )
                await asyncio.sleep(0.01)
        except BaseException:
            await self._shutdown(drain=False)
            raise
        self._monitor = self._loop.create_task(self.pool.watch(lambda: self._state == "running"))
        if self._own_loop:
            _RUNNING.add(self)

    def close(self, timeout: float | None = None) -> None:
        """Drain in-flight work (up to ``timeout``), stop workers, unlink shared memory."""
        if self._state in ("new", "closed") or self._loop is None:
            self._state = "closed"
            return
        if not self._own_loop:
            raise RuntimeError("this collector runs on an asyncio loop: use 'await aclose()'")
        if threading.get_ident() == self._loop_thread_id:
            raise RuntimeError("close() called from the supervisor loop")
        if self._state in ("running", "halted"):
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(True, timeout), self._loop)
            fut.result()
        self._stop_thread()

    async def aclose(self, timeout: float | None = None) -> None:
        """``close()`` for collectors started with ``async with`` / ``astart()``."""
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        if self._own_loop:
            await asyncio.get_running_loop().run_in_executor(None, self.close, timeout)
            return
        await self._shutdown(True, timeout)

    def _stop_thread(self) -> None:
        _RUNNING.discard(self)
        if self._runner is not None:
            self._runner.stop()
            self._runner = None
        self._state = "closed"

    async def _shutdown(self, drain: bool, timeout: float | None = None) -> None:
        if self._state == "closed":
            return
        timeout = self.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if self._state == "running":
            self._state = "closing"
        self.admission.wake()
        if drain:
            self.pool.release_held()  # held events (Order's buffer) go now, not after their delay
            while self.ledger.ops and time.monotonic() < deadline and self.fatal_error is None:
                await asyncio.sleep(0.01)
        self.ledger.fail_all(self.fatal_error or CollectorClosed("the collector closed before this operation finished"))
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        await self.pool.stop(deadline)
        self._state = "closed"
        if self._block is not None:
            self._block.close()
            self._block = None

    def _halt(self, exc: BaseException) -> None:
        """A fatal error: fail every operation, refuse new work, stop the workers."""
        if self.fatal_error is None:
            self.fatal_error = exc
        self._state = "halted"
        self.ledger.fail_all(exc)
        self.admission.wake()
        self.pool.kill_all()

    # ------------------------------------------------------------------ the pool's owner
    def stopping(self) -> bool:
        """Closing or closed (the worker pool's question: is a clean exit expected)."""
        return self._state in ("closing", "closed")

    def wants_replacement(self) -> bool:
        """Replace a dead worker while running, and while closing with work to drain."""
        return self._state == "running" or (self._state == "closing" and bool(self.ledger.ops))

    def least_loaded(self, after: int = -1) -> int:
        """The worker with the fewest chunks queued and in flight; of equals, the first
        after ``after`` (so that equal workers take turns)."""
        n = self.nworkers
        ledger = self.ledger
        return min(((after + 1 + k) % n for k in range(n)), key=ledger.load)

    def worker_ready(self, i: int) -> None:
        """Worker ``i`` said Ready: send it what waits for it."""
        self.ledger.pump(i)

    def worker_acked(self, i: int, ack: Ack) -> None:
        """Worker ``i`` acknowledged a chunk."""
        self.ledger.on_ack(i, ack)

    def worker_routed(self, i: int, msg: Routed) -> None:
        """Worker ``i`` routed an NDJSON range: queue the other workers' parts."""
        self.ledger.on_routed(i, msg)

    def worker_lost(self, i: int, cause: str) -> None:
        """Worker ``i`` died: its unacknowledged chunks go first to the replacement."""
        self.ledger.requeue(i, self.ledger.take_back(i), cause)
        self.materialized.partials.retire(i)

    def worker_snapshot(self, i: int, snap: Snapshot) -> None:
        """Worker ``i`` published a stateful stage's partial state."""
        self.materialized.partials.put(i, snap)

    def fatal(self, exc: BaseException) -> None:
        """The pool met a death that respawning cannot fix."""
        self._halt(exc)

    # ------------------------------------------------------------------ handle
    def handle(
        self,
        batch: Any,
        *,
        return_events: bool = False,
        block: bool = True,
        timeout: float | None = None,
        keys: list[Any] | None = None,
        owners: list[int] | None = None,
    ) -> Operation:
        """Accept a batch and return its :class:`Operation` at once.

        ``batch`` is a list of the pipeline's event Structs, a list of dicts, or bytes
        holding a JSON array or NDJSON. Input that is not valid (a malformed JSON
        array, an item that is not an object) is reported in the operation's
        ``errors``, never raised. Blocks while ``max_inflight`` events are in flight
        (``block=False``: raises :class:`~collector.Overloaded`; ``timeout``: raises it
        after that many seconds). ``keys``, ``owners``: as for :meth:`ahandle`.

        Called on the collector's own loop (an asyncio server that started it with
        ``astart()``), with ``block=False``, it never waits: the chunks are on their way
        to the workers when it returns, with no loop turn in between.
        """
        t0 = time.monotonic()
        self._check_open()
        op = self.planner.prepare(batch, return_events, keys, owners)
        op.started = t0  # elapsed counts from handle(), parsing included
        on_loop = threading.get_ident() == self._loop_thread_id
        self.admission.admit_sync(op.total, block, timeout, on_loop)
        self._feed(op)
        return op

    async def ahandle(
        self,
        batch: Any,
        *,
        return_events: bool = False,
        block: bool = True,
        keys: list[Any] | None = None,
        owners: list[int] | None = None,
    ) -> Operation:
        """``handle()`` for asyncio code: awaits for capacity, never blocks the loop.

        ``keys``: when ``batch`` is a list of raw JSON objects (``bytes`` or
        ``msgspec.Raw``) whose shard keys the caller already read (the HTTP server reads
        each event's id), their keys in order; the supervisor then parses nothing.
        ``owners``: with ``keys``, each key's worker (``0 .. nworkers - 1``), when the
        caller knows it: new ids drawn so that the shard function gives them to that
        worker (the HTTP server's, see ``Coalescer.owner``), or keys the caller hashed with
        the shard function itself (the server does, in C, for the ids clients send). They
        are not hashed again, and the result's ``distinct_keys`` takes them as distinct
        (one per event); a wrong owner puts a key's state on the wrong worker.
        """
        t0 = time.monotonic()
        self._check_open()
        loop = asyncio.get_running_loop()
        big = self.is_big(batch)
        # big inputs are sliced on a thread so the loop keeps serving meanwhile
        if big:
            op = await loop.run_in_executor(None, self.planner.prepare, batch, return_events, keys, owners)
        else:
            op = self.planner.prepare(batch, return_events, keys, owners)
        op.started = t0
        await self.admission.admit(op.total, block)
        if big:
            await loop.run_in_executor(None, self._feed, op)
        else:
            self._feed(op)
        return op

    @staticmethod
    def is_big(batch: Any) -> bool:
        """Whether :meth:`ahandle` prepares ``batch`` on a thread (over 1 MiB of bytes, or
        50,000 items) instead of on the loop."""
        if isinstance(batch, (bytes, bytearray, memoryview)):
            return len(batch) > 1 << 20
        return isinstance(batch, list) and len(batch) > 50_000

    def _check_open(self) -> None:
        if self.fatal_error is not None:
            raise CollectorClosed(f"the collector stopped after a fatal error: {self.fatal_error}") from self.fatal_error
        if self._state != "running":
            raise CollectorClosed(f"the collector is {self._state}; it takes no more batches")

    def _feed(self, op: Operation) -> None:
        """Cut an admitted operation into chunks, a segment at a time, and queue them."""
        assert self._block is not None and self._loop is not None and op.plan is not None
        op.loop_thread = self._loop_thread_id
        self._block.supervisor.add(S.RECEIVED, op.total)
        if op.plan.empty():  # nothing for the workers: done at once, in the caller's thread
            op.sealed = True
            self.ledger.op_done(op)
            return
        on_loop = threading.get_ident() == self._loop_thread_id
        for per_worker, shared in self.planner.cut(op):
            if on_loop:
                self._enqueue(op, per_worker, shared)
            else:
                self._loop.call_soon_threadsafe(self._enqueue, op, per_worker, shared)
        if on_loop:
            # written now, not at the end of this loop turn: an HTTP server parses many
            # requests per turn, and the workers should start on the first operation
            # while it parses the rest (one writelines per worker per operation)
            self.pool.flush()

    def _enqueue(self, op: Operation, per_worker: list[list[Entry]] | None, shared: list[Entry] | None) -> None:
        if op.done():
            return
        if self._state != "running":
            self.ledger.op_done(op, self.fatal_error or CollectorClosed("the collector closed before this operation started"))
            return
        self.ledger.enqueue(op, per_worker, shared)

# collectors with their own supervisor thread that are still open; closed at exit so a
# forgotten close() still stops the workers and unlinks the shared memory
_RUNNING: weakref.WeakSet[Collector] = weakref.WeakSet()


@atexit.register
def _close_forgotten() -> None:
    for c in list(_RUNNING):
        with contextlib.suppress(Exception):
            c.close(timeout=5.0)
