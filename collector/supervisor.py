"""The supervisor: the embedding API (:class:`Collector`), sharding, the ledger, workers.

::

    handle(batch) ── normalise ── keys ── shard (crc32(key) % N, C-level map) ──┐
       │ (caller's thread)                                                        │
       ▼                                                                          ▼
    Operation ◄── progress / result ──  ledger: chunk id → (op, worker, positions, payload)
                                          │ per worker: queue ─► window of W chunks ─► channel i
    worker i ── Ack(chunk id, counts, errors, summary, events?) ──► ledger ─► Operation
    worker i dies ─► sentinel ─► name the death ─► respawn in slot i, CPU i ─► redeliver
    stats() ─► sum of shared-memory slots (no lock, no message)

The supervisor does as little per event as it can: it maps keys to shards and slices
the batch with C-level iterators (``map``, ``itertools.compress``, ``itemgetter``),
encodes each chunk once, and never parses what workers send back unless events were
asked for. Everything else happens in the workers.

The supervisor's own work runs on one asyncio loop: the caller's running loop under
``async with Collector(...)``, or a dedicated uvloop thread under ``with Collector(...)``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import weakref
import zlib
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from operator import attrgetter, eq, methodcaller
from typing import Any

import msgspec

from . import stats as S
from .errors import (
    CollectorClosed,
    CollectorError,
    ConfigError,
    InvalidInput,
    Overloaded,
    WorkerBootError,
    WorkerError,
)
from .pipeline import Pipeline, resolve_pipeline
from .protocol import Ack, BootFailed, Chunk, FrameWriter, Ready, Stop, read_frames
from .results import BatchAccumulator, ErrorItem, OperationResult
from .worker import BOOT_FAILURE, WorkerSpec, worker_main

__all__ = ["Collector", "Operation"]

log = logging.getLogger("collector")

_DEATH_CAUSES = {
    signal.SIGKILL: "perhaps out of memory (the kernel's OOM killer) or killed by an operator",
    signal.SIGSEGV: "segmentation fault in native code (a C extension or ctypes call)",
    signal.SIGABRT: "aborted: a hung worker killed by the supervisor, or a failed C assertion",
    signal.SIGBUS: "bus error: perhaps a truncated memory-mapped file",
    signal.SIGFPE: "floating point exception in native code",
    signal.SIGILL: "illegal instruction in native code",
    signal.SIGTERM: "terminated by another process",
    signal.SIGINT: "interrupted",
}


def describe_exit(code: int | None) -> str:
    """One phrase naming how a worker ended and its likely cause."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            sig = signal.Signals(-code)
        except ValueError:
            return f"killed by signal {-code}"
        return f"killed by {sig.name}: {_DEATH_CAUSES.get(sig, 'no usual cause known')}"
    if code == BOOT_FAILURE:
        return f"exit code {code}: could not build its pipeline"
    if code == 0:
        return "exit code 0"
    return f"exit code {code}: os._exit() or sys.exit() in pipeline code, or a fatal error"


class _ShardMap(dict[Any, int]):
    """key → worker index, computed once per key with a stable hash (crc32).

    ``map(shards.__getitem__, keys)`` runs in C for known keys; only a new key costs
    Python code. Stable across processes and restarts, unlike ``hash()`` of a str.
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __missing__(self, k: Any) -> int:
        v = self[k] = self.of(k)
        return v

    def of(self, k: Any) -> int:
        """The worker of ``k`` without remembering it (keys that never repeat, like ids)."""
        return zlib.crc32(k.encode() if type(k) is str else repr(k).encode()) % self.n


class _KeyOf(msgspec.Struct):
    """Decodes only the shard key of a JSON object; other fields are skipped unparsed."""


def _key_line_decoder(key: str) -> msgspec.json.Decoder[Any]:
    T = msgspec.defstruct("_KeyOf_" + key, [(key, Any, None)], bases=(_KeyOf,))
    return msgspec.json.Decoder(T)


def _key_decoder(key: str) -> msgspec.json.Decoder[Any]:
    T = msgspec.defstruct("_KeyOf_" + key, [(key, Any, None)], bases=(_KeyOf,))
    return msgspec.json.Decoder(list[T])  # type: ignore[valid-type]


class _Entry:
    """A chunk in the ledger: it stays until its worker acknowledges it.

    ``items`` are the chunk's events (until encoded); where they sit in the input is
    worked out only when needed (an error to report, events to return): segment
    ``[lo, hi)`` of the routed inputs, this worker's share of it, from ``offset``.
    """

    __slots__ = ("_positions", "attempt", "hi", "id", "items", "lo", "n", "offset", "op", "payload", "sent_at", "worker")

    def __init__(
        self,
        cid: int,
        op: Operation,
        worker: int,
        items: list[Any] | None,
        lo: int,
        hi: int,
        offset: int,
        n: int | None = None,
        payload: Any = None,
    ) -> None:
        self.id = cid
        self.op = op
        self.worker = worker
        self.items: list[Any] | None = items
        self.n = len(items) if items is not None else (n or 0)
        self.lo = lo
        self.hi = hi
        self.offset = offset
        self._positions: list[int] | None = None
        self.payload: Any = payload  # bytes, or a memoryview of the caller's NDJSON batch
        self.attempt = 0
        self.sent_at = 0.0

    @property
    def positions(self) -> list[int]:
        """Input index of each of the chunk's events."""
        if self._positions is None:
            op = self.op
            seg = op._base[self.lo : self.hi]
            if op._shard_of is not None:
                mask = map(eq, op._shard_of[self.lo : self.hi], itertools.repeat(self.worker))
                seg = list(itertools.compress(seg, mask))
            self._positions = list(seg[self.offset : self.offset + self.n])
        return self._positions

    @positions.setter
    def positions(self, value: list[int]) -> None:
        self._positions = value
        self.n = len(value)


class _Worker:
    """The supervisor's handle on one worker slot."""

    def __init__(self, index: int, cpu: int | None) -> None:
        self.index = index
        self.cpu = cpu
        self.process: Any = None
        self.pid = 0
        self.writer: asyncio.StreamWriter | None = None
        self.out: FrameWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.ready = False
        self.inflight: dict[int, _Entry] = {}
        self.queue: collections.deque[_Entry] = collections.deque()
        self.boot_error: BootFailed | None = None
        self.deaths: collections.deque[float] = collections.deque(maxlen=10)
        self.acked = 0  # chunks acknowledged since this incarnation started
        self.killing = 0.0
        self.spawned_at = 0.0
        self.exited = False
        self.judging: asyncio.Task[None] | None = None


class Operation:
    """One ``handle()`` call: progress while it runs, an :class:`OperationResult` after.

    ``progress()`` yields integer percentages (sync or ``async for``), ``wait()`` or
    ``await op`` gives the result, ``done()`` says whether it is complete, ``stats()``
    reports figures so far. Thread-safe: the supervisor completes it from its loop.
    """

    def __init__(self, total: int, return_events: bool, distinct_keys: int) -> None:
        self.total = total
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
        self._base: range | list[int] = range(total)
        self._shard_of: list[int] | None = None
        self._ndjson = False  # payloads are NDJSON (else a JSON array)
        self._keys: set[Any] | None = None  # shard="chunk": distinct keys reported by workers
        self._encode: Callable[[_Entry], bytes | None] = _no_encoder
        self._cond = threading.Condition()
        self._result: OperationResult | None = None
        self._exc: BaseException | None = None
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._loop_thread: int | None = None

    # -- called by the supervisor ---------------------------------------------------
    def _account(self, handled: int, failed: int) -> None:
        with self._cond:
            self.handled += handled
            self.failed += failed
            self._cond.notify_all()
        self._wake()

    def _finish(self, exc: BaseException | None = None) -> None:
        with self._cond:
            if self._result is not None or self._exc is not None:
                return
            self.finished = time.monotonic()
            if exc is not None:
                self._exc = exc
            else:
                self.errors.sort(key=attrgetter("index"))
                self._result = OperationResult(
                    handled_events=self.handled,
                    failed_events=self.failed,
                    elapsed=self.finished - self.started,
                    errors=self.errors,
                    batch=self.acc.freeze(
                        self.total, len(self._keys) if self._keys is not None else self.distinct_keys
                    ),
                    events=self.events,
                )
            self._cond.notify_all()
        self._wake()

    def _wake(self) -> None:
        waiters, self._async_waiters = self._async_waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_set_done, fut)

    # -- public ---------------------------------------------------------------------
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
        if self._loop_thread == threading.get_ident() and not self.done():
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
            yield from self._changed().__await__()
        return self.result()

    def _changed(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self.done():
                fut.set_result(None)
            else:
                self._async_waiters.append((loop, fut))
        return fut

    def progress(self, interval: float = 0.5) -> _Progress:
        """Percentages 0..100, non-decreasing, at least one per ``interval`` s, last 100.

        Iterate with ``for`` (blocking) or ``async for`` (asyncio).
        """
        return _Progress(self, interval)

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


def _no_encoder(e: _Entry) -> bytes | None:
    raise RuntimeError("operation has no encoder")


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Progress:
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
            with op._cond:
                seen = last
                op._cond.wait_for(lambda: op.percent() > seen, self.interval)  # noqa: B023

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
                await asyncio.wait_for(op._changed(), self.interval)


class Collector:
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
        self._pipeline_arg: Pipeline | str = pipeline if isinstance(pipeline, str) else self.pipeline
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cpus = list(affinity) if cpus is None else list(cpus)
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
        self._ctx = mp.get_context(start_method)
        T = self.pipeline.event_type
        self._event_type = T
        self._key = self.pipeline.key
        self._keyget = attrgetter(self._key)
        self._enc = msgspec.json.Encoder()
        self._dec_events = msgspec.json.Decoder(list[T])  # type: ignore[valid-type]
        self._dec_raw = msgspec.json.Decoder(list[msgspec.Raw])
        self._dec_keys = _key_decoder(self._key)
        self._shards = _ShardMap(n)
        self._ids = itertools.count(1)
        self._chunked = self.pipeline.shard == "chunk"
        self._dec_keys_line = _key_line_decoder(self._key)
        self._shared: collections.deque[_Entry] = collections.deque()  # shard="chunk": any worker
        self._workers = [
            _Worker(i, self.cpus[i % len(self.cpus)] if self.cpus else None) for i in range(n)
        ]
        self._block: S.StatsBlock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._loop_thread_id: int | None = None
        self._own_loop = False
        self._state = "new"  # new → running → closing → closed
        self._fatal: BaseException | None = None
        self._admit = threading.Condition()
        self._inflight = 0  # events admitted and not done
        self._ops: set[Operation] = set()
        self._admit_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._monitor: asyncio.Task[None] | None = None
        self._stopped = threading.Event()

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
        import uvloop

        loop = uvloop.new_event_loop()
        self._loop = loop
        self._own_loop = True
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._loop_thread_id = threading.get_ident()
            started.set()
            try:
                loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="collector-supervisor", daemon=True)
        self._thread.start()
        started.wait()
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
        self._block = S.StatsBlock(self.nworkers)
        self._state = "running"
        try:
            for w in self._workers:
                self._spawn(w)
            deadline = time.monotonic() + self.boot_timeout
            while not all(w.ready for w in self._workers):
                if self._fatal is not None:
                    raise self._fatal
                if time.monotonic() > deadline:
                    raise WorkerBootError(
                        f"workers not ready after {self.boot_timeout}s: "
                        f"{[w.index for w in self._workers if not w.ready]}"
                    )
                await asyncio.sleep(0.01)
        except BaseException:
            await self._shutdown(drain=False)
            raise
        self._monitor = asyncio.get_running_loop().create_task(self._watch())
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
        if self._state == "running" or self._state == "halted":
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
        if self._thread is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None
        self._state = "closed"

    async def _shutdown(self, drain: bool, timeout: float | None = None) -> None:
        if self._state == "closed":
            return
        timeout = self.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if self._state == "running":
            self._state = "closing"
        self._wake_admitters()
        if drain:
            while self._ops and time.monotonic() < deadline and self._fatal is None:
                await asyncio.sleep(0.01)
        for op in list(self._ops):
            op._finish(self._fatal or CollectorClosed("the collector closed before this operation finished"))
        self._ops.clear()
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        for w in self._workers:
            w.ready = False
            if w.writer is not None and not w.exited:
                with contextlib.suppress(Exception):
                    assert w.out is not None
                    w.out.send(Stop())
        while any(w.process is not None and w.process.is_alive() for w in self._workers):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        for w in self._workers:
            self._reap(w, kill=True)
        self._state = "closed"
        if self._block is not None:
            self._block.close()
            self._block = None
        self._stopped.set()

    def _reap(self, w: _Worker, kill: bool = False) -> None:
        p = w.process
        if p is not None:
            with contextlib.suppress(Exception):
                assert self._loop is not None
                self._loop.remove_reader(p.sentinel)
            if kill and p.is_alive():
                log.warning("worker %d (pid %d) did not stop in time: killing it", w.index, p.pid)
                p.kill()
            p.join(5)
            with contextlib.suppress(Exception):
                p.close()
            w.process = None
        if w.reader_task is not None:
            w.reader_task.cancel()
            w.reader_task = None
        if w.writer is not None:
            with contextlib.suppress(Exception):
                w.writer.close()
            w.writer = None
            w.out = None

    # ------------------------------------------------------------------ workers
    def _spawn(self, w: _Worker) -> None:
        assert self._block is not None and self._loop is not None
        mine, theirs = socket.socketpair()
        slot = self._block.slots[w.index]
        self._block.supervisor.absorb(slot)  # what the previous worker counted stays counted
        slot.reset()
        spec = WorkerSpec(
            index=w.index,
            cpu=w.cpu,
            sock=theirs,
            shm_name=self._block.name,
            nworkers=self.nworkers,
            pipeline=self._pipeline_arg,
            parent_pid=os.getpid(),
            heartbeat_interval=self.heartbeat_interval,
            log_level=logging.getLogger("collector").getEffectiveLevel(),
        )
        p = self._ctx.Process(  # type: ignore[attr-defined]
            target=worker_main, args=(spec,), name=f"collector-worker-{w.index}", daemon=True)
        p.start()
        theirs.close()
        w.process = p
        w.pid = p.pid or 0
        w.ready = False
        w.exited = False
        w.boot_error = None
        w.acked = 0
        w.killing = 0.0
        w.spawned_at = time.monotonic()
        self._loop.add_reader(p.sentinel, self._on_sentinel, w)
        w.reader_task = self._loop.create_task(self._read(w, mine))

    async def _read(self, w: _Worker, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        w.writer = writer
        w.out = FrameWriter(writer)
        # when the worker is gone the loop ends; its sentinel tells how it died
        async for msg in read_frames(reader):
            if type(msg) is Ack:
                self._on_ack(w, msg)
            elif type(msg) is Ready:
                w.ready = True
                self._pump(w)
            elif type(msg) is BootFailed:
                w.boot_error = msg

    def _on_sentinel(self, w: _Worker) -> None:
        assert self._loop is not None
        p = w.process
        if p is None:
            return
        self._loop.remove_reader(p.sentinel)
        t = w.reader_task
        if not w.ready and t is not None and not t.done():
            # a worker that failed at boot wrote its traceback just before exiting: the
            # sentinel can fire before that frame is read, so let the reader reach EOF
            # (bounded) and then judge the exit with the worker's own message in hand
            async def judge() -> None:
                await asyncio.wait({t}, timeout=2)
                self._on_exit(w)

            w.judging = self._loop.create_task(judge())  # held so it is not collected
            return
        self._on_exit(w)

    def _on_exit(self, w: _Worker) -> None:
        p = w.process
        if p is None:
            return
        p.join(1)
        code = p.exitcode
        w.exited = True
        if self._state in ("closing", "closed") and code == 0:
            return
        was_ready, w.ready = w.ready, False
        cause = describe_exit(code)
        w.deaths.append(time.monotonic())
        if w.boot_error is not None or code == BOOT_FAILURE or (not was_ready and code and code > 0):
            be = w.boot_error
            hint = ""
            if be is None and code == 1:
                hint = (
                    " (with the spawn start method the main module is imported again in "
                    "each worker: guard the code that starts the collector with "
                    "`if __name__ == '__main__':`; the worker's stderr has its traceback)"
                )
            msg = (
                f"worker {w.index} (pid {w.pid}) failed at boot: "
                f"{be.message if be else cause}{hint}; the collector stops instead of "
                "respawning it"
            )
            log.error(msg)
            self._halt(WorkerBootError(msg, w.index, be.traceback if be else None))
            return
        log.error(
            "worker %d (pid %d, cpu %s) died: %s", w.index, w.pid, w.cpu, cause,
            extra={"fields": {"event": "worker_died", "worker": w.index, "pid": w.pid, "cause": cause}},
        )
        # while closing, a replacement still finishes the drain
        if self._state not in ("running", "closing") or (self._state == "closing" and not self._ops):
            return
        recent = [t for t in w.deaths if t > time.monotonic() - 30]
        if len(recent) >= 5 and w.acked == 0:
            self._halt(WorkerError(f"worker {w.index} keeps dying ({len(recent)} times in 30 s, last: {cause})", w.index))
            return
        self._reap(w)
        # its unacknowledged chunks go first to the replacement, in their order
        lost = sorted(w.inflight.values(), key=attrgetter("id"))
        w.inflight.clear()
        sup = self._block.supervisor if self._block else None
        for e in reversed(lost):
            e.attempt += 1
            if e.attempt >= self.max_attempts:
                self._fail_entry(e, f"chunk killed its worker {e.attempt} times (last: {cause})")
                continue
            if sup is not None:
                sup.add(S.REDELIVERED, 1)
            e.op.acc.redelivered += 1
            w.queue.appendleft(e)
        if sup is not None:
            sup.add(S.RESTARTS, 1)
        self._spawn(w)

    def _halt(self, exc: BaseException) -> None:
        """A fatal error: fail every operation, refuse new work, stop the workers."""
        if self._fatal is None:
            self._fatal = exc
        self._state = "halted"
        for op in list(self._ops):
            op._finish(exc)
        self._ops.clear()
        self._wake_admitters()
        for w in self._workers:
            if w.process is not None and w.process.is_alive():
                with contextlib.suppress(Exception):
                    w.process.kill()

    async def _watch(self) -> None:
        """Heartbeats: a worker silent past the timeout gets SIGABRT, then SIGKILL."""
        assert self._block is not None
        while self._state == "running":
            now = time.monotonic()
            for w in self._workers:
                if not w.ready or w.process is None or self._block is None:
                    continue
                age = now - self._block.slots[w.index].getf(S.HEARTBEAT)
                if w.killing:
                    if now - w.killing > 2.0 and w.process.is_alive():
                        w.process.kill()
                elif age > self.heartbeat_timeout:
                    log.error(
                        "worker %d (pid %d) silent for %.1fs (heartbeat timeout %.1fs): killing it",
                        w.index, w.pid, age, self.heartbeat_timeout,
                    )
                    w.killing = now
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGABRT)
            await asyncio.sleep(min(0.25, self.heartbeat_timeout / 4))

    # ------------------------------------------------------------------ chunks
    def _pump(self, w: _Worker, limit: int = 1 << 30) -> None:
        """Send queued chunks while the worker's window has room."""
        out = w.out
        if not w.ready or out is None:
            return
        q = w.queue
        shared = self._shared
        inflight = w.inflight
        while len(inflight) < self.window and limit > 0:
            limit -= 1
            if q:
                e = q.popleft()
            elif shared:
                e = shared.popleft()
                e.worker = w.index
            else:
                break
            if e.op.done():  # its operation was failed meanwhile
                continue
            if e.payload is None:
                e.payload = e.op._encode(e)
                e.items = None
                if e.payload is None:  # nothing left to send: every item failed to encode
                    self._complete_entry(e)
                    continue
            e.sent_at = time.monotonic()
            inflight[e.id] = e
            out.send(Chunk(e.id, e.payload, e.op.events is not None, e.attempt, e.op._ndjson, e.op.id))

    def _on_ack(self, w: _Worker, ack: Ack) -> None:
        e = w.inflight.pop(ack.id, None)
        if e is None:
            return
        w.acked += 1
        op = e.op
        if ack.errors:
            pos = e.positions
            op.errors.extend(ErrorItem(pos[r.pos], r.path, r.reason, r.kind) for r in ack.errors)
        op.acc.add(ack.summary)
        if op._keys is not None and ack.summary.keys:
            op._keys.update(ack.summary.keys)
        if ack.events is not None and op.events is not None:
            evs = self._dec_events.decode(ack.events)
            pos = e.positions
            if ack.errors:
                bad = {r.pos for r in ack.errors}
                kept = [p for i, p in enumerate(pos) if i not in bad]
            else:
                kept = pos
            out = op.events
            for p, ev in zip(kept, evs, strict=False):
                out[p] = ev
        op._account(ack.handled, ack.failed)
        op.worker_counted += ack.handled + ack.failed
        self._complete_entry(e)
        self._pump(w)

    def _fail_entry(self, e: _Entry, reason: str) -> None:
        e.op.errors.extend(ErrorItem(p, "$", reason, "lost") for p in e.positions)
        e.op._account(0, len(e.positions))
        self._complete_entry(e)

    def _complete_entry(self, e: _Entry) -> None:
        e.payload = None
        op = e.op
        op.chunks_left -= 1
        if op.chunks_left == 0 and op.sealed:
            self._op_done(op)

    def _count_unrouted(self, op: Operation) -> None:
        """Account in the supervisor's slot the events no worker counted (rejected
        before routing, unencodable, lost), so received == handled + in flight."""
        missing = op.total - op.worker_counted
        if missing > 0 and self._block is not None:
            sup = self._block.supervisor
            sup.add(S.EVENTS, missing)
            sup.add(S.FAILED, missing)

    def _op_done(self, op: Operation, exc: BaseException | None = None) -> None:
        """Complete ``op`` (or fail it with ``exc``) and release its in-flight room."""
        op._finish(exc)
        self._count_unrouted(op)
        self._ops.discard(op)
        with self._admit:
            self._inflight -= op.total
            self._admit.notify_all()
        self._wake_admitters()

    def _wake_admitters(self) -> None:
        with self._admit:
            waiters, self._admit_waiters = self._admit_waiters, []
            self._admit.notify_all()
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_set_done, fut)

    # ------------------------------------------------------------------ handle
    def handle(
        self,
        batch: Any,
        *,
        return_events: bool = False,
        block: bool = True,
        timeout: float | None = None,
    ) -> Operation:
        """Accept a batch and return its :class:`Operation` at once.

        ``batch`` is a list of the pipeline's event Structs, a list of dicts, or bytes
        holding a JSON array or NDJSON. Blocks while ``max_inflight`` events are in
        flight (``block=False``: raises :class:`~collector.Overloaded`; ``timeout``:
        raises it after that many seconds).
        """
        t0 = time.monotonic()
        op = self._prepare(batch, return_events)
        op.started = t0  # elapsed counts from handle(), parsing included
        self._admit_sync(op.total, block, timeout)
        self._feed(op)
        return op

    async def ahandle(
        self, batch: Any, *, return_events: bool = False, block: bool = True, keys: list[Any] | None = None
    ) -> Operation:
        """``handle()`` for asyncio code: awaits for capacity, never blocks the loop.

        ``keys``: when ``batch`` is a list of raw JSON objects (``bytes`` or
        ``msgspec.Raw``) whose shard keys the caller already read (the HTTP server reads
        each event's id), their keys in order; the supervisor then parses nothing.
        """
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        big = (isinstance(batch, (bytes, bytearray, memoryview)) and len(batch) > 1 << 20) or (
            isinstance(batch, list) and len(batch) > 50_000
        )
        # big inputs are sliced on a thread so the loop keeps serving meanwhile
        if big:
            op = await loop.run_in_executor(None, self._prepare, batch, return_events, keys)
        else:
            op = self._prepare(batch, return_events, keys)
        op.started = t0
        n = op.total
        while True:
            if self._try_admit(n):
                break
            if not block:
                raise self._overloaded(n)
            fut: asyncio.Future[None] = loop.create_future()
            with self._admit:
                if self._try_admit_locked(n):
                    break
                self._admit_waiters.append((loop, fut))
            await fut
        if big:
            await loop.run_in_executor(None, self._feed, op)
        else:
            self._feed(op)
        return op

    def _overloaded(self, n: int) -> Overloaded:
        return Overloaded(
            f"{self._inflight} events in flight, max_inflight={self.max_inflight}: "
            f"cannot take {n} more now",
            retry_after=1.0,
        )

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise CollectorClosed(f"the collector stopped after a fatal error: {self._fatal}") from self._fatal
        if self._state != "running":
            raise CollectorClosed(f"the collector is {self._state}; it takes no more batches")

    def _try_admit_locked(self, n: int) -> bool:
        self._check_open()
        if self._inflight == 0 or self._inflight + n <= self.max_inflight:
            self._inflight += n
            return True
        return False

    def _try_admit(self, n: int) -> bool:
        with self._admit:
            return self._try_admit_locked(n)

    def _admit_sync(self, n: int, block: bool, timeout: float | None) -> None:
        with self._admit:
            if self._try_admit_locked(n):
                return
            if not block:
                raise self._overloaded(n)
            if threading.get_ident() == self._loop_thread_id:
                raise self._overloaded(n)  # waiting here would deadlock the loop
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._try_admit_locked(n):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise self._overloaded(n)
                self._admit.wait(left)

    SEGMENT = 65_536  # events cut per step: workers start on the first while the rest is cut

    def _feed(self, op: Operation) -> None:
        """Cut an admitted operation into chunks, a segment at a time, and queue them."""
        assert self._block is not None and self._loop is not None
        op._loop_thread = self._loop_thread_id
        self._block.supervisor.add(S.RECEIVED, op.total)
        on_loop = threading.get_ident() == self._loop_thread_id
        loop = self._loop

        def submit(op: Operation, per_worker: list[list[_Entry]] | None, shared: list[_Entry] | None = None) -> None:
            if on_loop:
                self._enqueue(op, per_worker, shared)
            else:
                loop.call_soon_threadsafe(self._enqueue, op, per_worker, shared)

        routed: list[Any] = op._routed  # type: ignore[attr-defined]
        slices = getattr(op, "_slices", None)
        ids = self._ids
        if slices:  # NDJSON cut at newlines: the payloads are views of the caller's bytes
            view = memoryview(op._body)  # type: ignore[attr-defined]
            entries = [_Entry(next(ids), op, -1, None, base, base + n, 0, n, view[s:e]) for s, e, base, n in slices]
            del op._slices, op._body  # type: ignore[attr-defined]
            submit(op, None, entries)
            submit(op, None)
            del op._routed  # type: ignore[attr-defined]
            return
        if not routed:  # nothing for the workers: done at once, in the caller's thread
            del op._routed  # type: ignore[attr-defined]
            op.sealed = True
            self._op_done(op)
            return
        shard_of = op._shard_of
        n, cs, seg = self.nworkers, self.chunk_size, self.SEGMENT
        if self._chunked:  # no key affinity: whichever worker has room takes the next chunk
            for lo in range(0, len(routed), seg):
                hi = min(lo + seg, len(routed))
                submit(op, None, [_Entry(next(ids), op, -1, routed[i : min(i + cs, hi)], i, min(i + cs, hi), 0) for i in range(lo, hi, cs)])
            submit(op, None)
            del op._routed  # type: ignore[attr-defined]
            return
        for lo in range(0, len(routed), seg):
            hi = min(lo + seg, len(routed))
            part = routed[lo:hi]
            per_worker: list[list[_Entry]] = []
            for wi in range(n):
                if shard_of is None:
                    mine = part
                else:
                    mine = list(itertools.compress(part, map(eq, shard_of[lo:hi], itertools.repeat(wi))))
                per_worker.append(
                    [_Entry(next(ids), op, wi, mine[i : i + cs], lo, hi, i) for i in range(0, len(mine), cs)]
                )
            submit(op, per_worker)
        submit(op, None)  # seal: from now on, no chunk left means done
        del op._routed  # type: ignore[attr-defined]

    def _enqueue(
        self, op: Operation, per_worker: list[list[_Entry]] | None, shared: list[_Entry] | None = None
    ) -> None:
        if op.done():
            return
        if self._state != "running":
            self._op_done(op, self._fatal or CollectorClosed("the collector closed before this operation started"))
            return
        if shared:
            self._ops.add(op)
            op.chunks_left += len(shared)
            self._shared.extend(shared)
            # deal one chunk at a time round the workers, or the first takes a whole window
            dealt = True
            while self._shared and dealt:
                dealt = False
                for w in self._workers:
                    if self._shared and w.ready and len(w.inflight) < self.window:
                        self._pump(w, limit=1)
                        dealt = True
            return
        if per_worker is None:
            op.sealed = True
            if op.chunks_left == 0:
                self._op_done(op)
            return
        self._ops.add(op)
        for w, entries in zip(self._workers, per_worker, strict=True):
            if entries:
                op.chunks_left += len(entries)
                w.queue.extend(entries)
                self._pump(w)

    # ------------------------------------------------------------------ preparing input
    def _prepare(self, batch: Any, return_events: bool, keys: list[Any] | None = None) -> Operation:
        """Normalise the input, find each event's key and worker (no encoding yet)."""
        self._check_open()
        errors: list[ErrorItem] = []
        if self._chunked:
            return self._prepare_chunked(batch, return_events)
        keys_given = keys is not None
        if keys is not None:
            if not isinstance(batch, list) or len(keys) != len(batch):
                raise InvalidInput("keys= needs a list of raw JSON objects and one key per item")
            items, kind = batch, "raw"
        elif isinstance(batch, (bytes, bytearray, memoryview)):
            items, keys, kind = self._from_bytes(bytes(batch), errors)
        elif isinstance(batch, (list, tuple)):
            items, keys, kind = self._from_list(batch, errors)
        else:
            raise InvalidInput(
                f"handle() takes a list of {self._event_type.__name__} or dicts, or bytes "
                f"(JSON array or NDJSON); got {type(batch).__name__}"
            )
        total = len(items)
        n = self.nworkers
        if len(self._shards) > 200_000:  # bounded (~40 MB): forget keys, they are recomputed
            self._shards.clear()
        if errors:  # inputs rejected here are not routed
            base: range | list[int] = [i for i, k in enumerate(keys) if k is not _NO_KEY]
            routed = [items[i] for i in base]
            keys = [keys[i] for i in base]
        else:
            base, routed = range(total), items
        # keys handed in by the caller are event ids here (they never repeat): hash them
        # without growing the map of known keys
        shard = self._shards.of if kind == "raw" and keys_given else self._shards.__getitem__
        try:
            shard_of = list(map(shard, keys)) if n > 1 else None
            distinct = len(set(keys))
        except TypeError:  # an unhashable key (a JSON list or object): use its repr
            keys = [repr(k) if isinstance(k, (list, dict)) else k for k in keys]
            shard_of = list(map(shard, keys)) if n > 1 else None
            distinct = len(set(keys))
        op = Operation(total, return_events, distinct)
        op.errors.extend(errors)
        op.failed = len(errors)
        op._base = base
        op._shard_of = shard_of
        op._routed = routed  # type: ignore[attr-defined]
        op._ndjson = kind == "lines"
        op._encode = self._encoder_for(op, kind)
        return op

    def _prepare_chunked(self, batch: Any, return_events: bool) -> Operation:
        """``shard="chunk"``: no keys, no routing; NDJSON is cut at newlines unparsed."""
        if isinstance(batch, (bytes, bytearray, memoryview)):
            body = bytes(batch)
            stripped = body.strip()
            if not stripped:
                items: list[Any] = []
                kind = "raw"
            elif stripped[:1] == b"[":
                try:
                    items = self._dec_raw.decode(body)
                except (msgspec.ValidationError, msgspec.DecodeError) as e:
                    raise InvalidInput(
                        f"the batch is not a valid JSON array: {e}; send NDJSON (one event "
                        "per line) to have malformed lines reported one by one"
                    ) from e
                kind = "raw"
            else:
                body = body.strip(b"\r\n")
                if b"\n\n" not in body and b"\n\r\n" not in body:
                    return self._ndjson_slices(body, return_events)
                items = [ln for ln in body.split(b"\n") if ln.strip()]
                kind = "lines"
        elif isinstance(batch, (list, tuple)):
            items = batch if isinstance(batch, list) else list(batch)
            kind = "objects"
        else:
            raise InvalidInput(
                f"handle() takes a list of {self._event_type.__name__} or dicts, or bytes "
                f"(JSON array or NDJSON); got {type(batch).__name__}"
            )
        op = Operation(len(items), return_events, 0)
        op._keys = set()
        op._routed = items  # type: ignore[attr-defined]
        op._ndjson = kind == "lines"
        op._encode = self._encoder_for(op, kind)
        return op

    def _ndjson_slices(self, body: bytes, return_events: bool) -> Operation:
        """Cut clean NDJSON into chunks of about ``chunk_size`` lines with C-level scans.

        Only newlines are looked at: lines are counted with ``bytes.count`` and the cut
        points found with ``bytes.find`` from an estimate of the line length, so the
        supervisor's cost is per chunk, not per event. Workers parse and validate.
        """
        total = body.count(b"\n") + 1
        probe = body[: 1 << 16]
        avg = max(1, len(probe) // (probe.count(b"\n") + 1))
        step = max(1, avg * self.chunk_size)
        slices = []
        start, base, size = 0, 0, len(body)
        while start < size:
            cut = body.find(b"\n", min(start + step, size))
            end = size if cut < 0 else cut
            n = body.count(b"\n", start, end) + 1
            slices.append((start, end, base, n))
            base += n
            start = end + 1
        op = Operation(total, return_events, 0)
        op._keys = set()
        op._routed = [None] if slices else []  # type: ignore[attr-defined]
        op._slices = slices  # type: ignore[attr-defined]
        op._body = body  # type: ignore[attr-defined]
        op._ndjson = True
        return op

    def _encoder_for(self, op: Operation, kind: str) -> Callable[[_Entry], bytes | None]:
        enc = self._enc.encode

        def encode(e: _Entry) -> bytes | None:
            items = e.items
            assert items is not None
            if kind == "raw":
                return b"[" + b",".join(items) + b"]"
            if kind == "lines":
                return b"\n".join(items)
            try:
                return enc(items)
            except (TypeError, ValueError, msgspec.EncodeError, OverflowError):
                pass
            # one item is not JSON-encodable: encode one by one, fail just that one
            ok_pos, parts = [], []
            for p, item in zip(e.positions, items, strict=True):
                try:
                    parts.append(enc(item))
                    ok_pos.append(p)
                except (TypeError, ValueError, msgspec.EncodeError, OverflowError) as ex:
                    op.errors.append(ErrorItem(p, "$", f"cannot encode as JSON: {ex}", "invalid"))
            if len(ok_pos) != e.n:
                op._account(0, e.n - len(ok_pos))
            e.positions = ok_pos
            if not ok_pos:
                return None
            return b"[" + b",".join(parts) + b"]"

        return encode

    def _from_list(self, batch: list[Any] | tuple[Any, ...], errors: list[ErrorItem]) -> tuple[list[Any], list[Any], str]:
        items = batch if isinstance(batch, list) else list(batch)
        # fast paths: all Structs, or all dicts; the workers validate types anyway
        with contextlib.suppress(AttributeError, TypeError):
            return items, list(map(self._keyget, items)), "objects"
        key = self._key
        with contextlib.suppress(AttributeError, TypeError):
            return items, list(map(methodcaller("get", key), items)), "objects"
        keys: list[Any] = []
        for i, it in enumerate(items):
            t = type(it)
            if t is dict:
                keys.append(it.get(key))
            elif isinstance(it, msgspec.Struct):
                keys.append(getattr(it, key, None))
            else:
                errors.append(
                    ErrorItem(i, "$", f"Expected `object`, got `{t.__name__}`", "invalid")
                )
                keys.append(_NO_KEY)
        return items, keys, "objects"

    def _from_bytes(self, body: bytes, errors: list[ErrorItem]) -> tuple[list[Any], list[Any], str]:
        stripped = body.lstrip()
        if not stripped:
            return [], [], "raw"
        if stripped[:1] == b"[":
            try:
                raws = self._dec_raw.decode(body)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                raise InvalidInput(
                    f"the batch is not a valid JSON array: {e}; send NDJSON (one event "
                    "per line) to have malformed lines reported one by one"
                ) from e
            array = body
        else:
            lines = body.split(b"\n")
            if b"" in lines or not lines[-1].strip():
                lines = [ln for ln in lines if ln.strip()]
            # one key-only pass (other fields are skipped, not built); the lines go on as
            # they are. Measured on 1M events: turning the whole batch into one array
            # first is slower here, its 170 MB copies cost more than the parse saves.
            key = self._key
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                found = self._dec_keys_line.decode_lines(b"\n".join(lines))
                if len(found) == len(lines):
                    return lines, [getattr(k, key) for k in found], "lines"
            raws = self._ndjson_slow(lines, errors)
            return raws, self._keys_of(raws, b"", errors), "lines"
        keys = self._keys_of(raws, array, errors)
        return raws, keys, "raw"

    def _ndjson_slow(self, lines: list[bytes], errors: list[ErrorItem]) -> list[Any]:
        dec = msgspec.json.Decoder(msgspec.Raw)
        raws: list[Any] = []
        for i, ln in enumerate(lines):
            try:
                raws.append(dec.decode(ln))
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                errors.append(ErrorItem(i, "$", f"malformed JSON: {e}", "invalid"))
                raws.append(None)
        return raws

    def _keys_of(self, raws: list[Any], array: bytes, errors: list[ErrorItem]) -> list[Any]:
        key = self._key
        if array and not errors:
            try:
                return [getattr(k, key) for k in self._dec_keys.decode(array)]
            except (msgspec.ValidationError, msgspec.DecodeError):
                pass
        one = msgspec.json.Decoder(Any)
        keys: list[Any] = []
        for i, raw in enumerate(raws):
            if raw is None:
                keys.append(_NO_KEY)
                continue
            v = one.decode(raw)
            if type(v) is dict:
                keys.append(v.get(key))
            else:
                errors.append(ErrorItem(i, "$", f"Expected `object`, got `{_json_type(v)}`", "invalid"))
                keys.append(_NO_KEY)
        return keys

    # ------------------------------------------------------------------ introspection
    def stats(self) -> S.Stats:
        """Collector statistics from shared memory: no lock, no message, microseconds."""
        if self._block is None:
            raise CollectorClosed("the collector is not running")
        return self._block.read(self.workers_alive())

    def workers_alive(self) -> list[bool]:
        """Whether each worker slot has a live, ready worker."""
        return [w.ready and w.process is not None and not w.exited for w in self._workers]

    def heartbeats_fresh(self, max_age: float | None = None) -> bool:
        """True while every worker is ready and stamped its heartbeat recently."""
        if self._block is None:
            return False
        limit = self.heartbeat_timeout if max_age is None else max_age
        now = time.monotonic()
        return all(
            w.ready and now - self._block.slots[w.index].getf(S.HEARTBEAT) < limit
            for w in self._workers
        )

    def worker_pids(self) -> list[int]:
        """The pid of each worker slot (0 while a slot has no process)."""
        return [w.pid if w.process is not None else 0 for w in self._workers]

    @property
    def inflight_events(self) -> int:
        """Events accepted and not yet done."""
        return self._inflight

    @property
    def running(self) -> bool:
        """True between start and close, unless a fatal error halted the collector."""
        return self._state == "running"


_NO_KEY: Any = object()
_op_ids = itertools.count(1)

# collectors with their own supervisor thread that are still open; closed at exit so a
# forgotten close() still stops the workers and unlinks the shared memory
_RUNNING: weakref.WeakSet[Collector] = weakref.WeakSet()


@atexit.register
def _close_forgotten() -> None:
    for c in list(_RUNNING):
        with contextlib.suppress(Exception):
            c.close(timeout=5.0)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "array"}.get(type(v), type(v).__name__)
