"""Worker processes: spawn into a slot and its CPU, read their channels, replace the dead.

::

    spawn(slot i) ─► socketpair + Process(worker_main, WorkerSpec) pinned to CPU i
    read(slot i)  ─► Ready → owner.worker_ready(i) │ Ack → owner.worker_acked(i, ack)
                     Snapshot → owner.worker_snapshot(i, snap)
                     Routed → owner.worker_routed(i, msg)
                     BootFailed → kept for the exit verdict
    sentinel(i)   ─► name the death ─► boot failure or crash loop: owner.fatal(exc)
                     else: owner.worker_lost(i, cause) (chunks taken back) ─► respawn i
    watch()       ─► a heartbeat older than heartbeat_timeout: SIGABRT (stacks dumped),
                     SIGKILL 2 s later

Gunicorn's arbiter verbs, without its signals: the pool never touches an operation,
and the :class:`PoolOwner` (the collector) decides what a death means for the work.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from typing import Any, Protocol

from .. import stats as S
from ..arena import PayloadArena
from ..errors import WorkerBootError, WorkerError
from ..pipeline import Pipeline
from ..protocol import (
    Ack,
    BootFailed,
    FrameProtocol,
    FrameWriter,
    Ready,
    Release,
    Routed,
    Snapshot,
    Stop,
)
from ..worker import BOOT_FAILURE, WorkerSpec, worker_main

__all__ = ["PoolOwner", "WorkerPool", "WorkerSlot", "describe_exit"]

log = logging.getLogger("collector")
CHANNEL_BUFFER = 4 << 20  # bytes, each way, per worker channel (see spawn)

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


class PoolOwner(Protocol):
    """What the pool reports to, and asks of, the engine that owns it."""

    def stopping(self) -> bool:
        """Closing or closed: a worker exiting with code 0 now is expected."""
        ...

    def wants_replacement(self) -> bool:
        """Whether a dead worker should be replaced (running, or draining work)."""
        ...

    def worker_ready(self, i: int) -> None:
        """Worker ``i`` can take chunks."""
        ...

    def worker_acked(self, i: int, ack: Ack) -> None:
        """Worker ``i`` acknowledged a chunk."""
        ...

    def worker_lost(self, i: int, cause: str) -> None:
        """Worker ``i`` died of ``cause``; a replacement is spawned right after."""
        ...

    def worker_snapshot(self, i: int, snap: Snapshot) -> None:
        """Worker ``i`` published a stateful stage's partial state."""
        ...

    def worker_routed(self, i: int, msg: Routed) -> None:
        """Worker ``i`` routed an NDJSON range: the other workers' parts."""
        ...

    def fatal(self, exc: BaseException) -> None:
        """A death that respawning cannot fix (boot failure, crash loop)."""
        ...


class WorkerSlot:
    """The supervisor's handle on one worker slot (one CPU, successive processes)."""

    def __init__(self, index: int, cpu: int | None) -> None:
        self.index = index
        self.cpu = cpu
        self.process: Any = None
        self.pid = 0
        self.transport: asyncio.Transport | None = None
        self.out: FrameWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.ready = False
        self.boot_error: BootFailed | None = None
        self.deaths: collections.deque[float] = collections.deque(maxlen=10)
        self.acked = 0  # chunks acknowledged since this incarnation started
        self.killing = 0.0
        self.spawned_at = 0.0
        self.exited = False
        self.judging: asyncio.Task[None] | None = None
        self.arena: PayloadArena | None = None  # chunk payloads for this slot's workers

    def place(self, payload: bytes | memoryview) -> int:
        """Copy a chunk's payload into the slot's arena: the arena slot, or -1 (send inline)."""
        return self.arena.put(payload) if self.arena is not None else -1

    def release(self, k: int) -> None:
        """Arena slot ``k`` is free again."""
        if self.arena is not None:
            self.arena.free(k)

    def reserve(self) -> int:
        """A free arena slot for a part another worker will write, or -1."""
        return self.arena.take() if self.arena is not None else -1

    def read(self, k: int, size: int) -> bytes:
        """A copy of the ``size`` bytes in arena slot ``k``."""
        assert self.arena is not None
        return bytes(self.arena.view(k, size))

    def send(self, msg: Any) -> bool:
        """Queue a frame on the channel (flushed once per loop iteration)."""
        if self.out is None:
            return False
        self.out.send(msg)
        return True

    def flush(self) -> None:
        """Write the frames queued on the channel now (else at the end of the loop turn)."""
        if self.out is not None:
            self.out.flush()

    def alive(self) -> bool:
        """A process that has not exited."""
        return self.process is not None and not self.exited


class WorkerPool:
    """Spawns, watches and replaces the worker processes of one collector."""

    def __init__(
        self,
        owner: PoolOwner,
        cpus: list[int | None],
        ctx: Any,
        pipeline: Pipeline | str,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        arena_slots: int = 0,
    ) -> None:
        self.owner = owner
        self.arena_slots = arena_slots  # per worker: its window (0: payloads go inline)
        self.slots = [WorkerSlot(i, cpu) for i, cpu in enumerate(cpus)]
        self.ctx = ctx
        self.pipeline = pipeline
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.block: S.StatsBlock | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, block: S.StatsBlock, loop: asyncio.AbstractEventLoop) -> None:
        """Spawn every worker (ready later: see ``all_ready``)."""
        self.block = block
        self.loop = loop
        for w in self.slots:  # all first: each worker maps the others' (routed parts)
            w.arena = self.make_arena()
        for w in self.slots:
            self.spawn(w)

    def make_arena(self) -> PayloadArena | None:
        """A payload arena for one slot, or None (no shared memory here: inline payloads)."""
        if not self.arena_slots:
            return None
        try:
            return PayloadArena(self.arena_slots)
        except (OSError, ValueError) as e:  # no /dev/shm, or it is full (a container's 64 MB)
            log.warning("chunk payloads go through the channel sockets: no shared-memory arena (%s)", e)
            self.arena_slots = 0  # one warning, not one per slot
            return None

    def flush(self) -> None:
        """Write every channel's queued frames now."""
        for w in self.slots:
            w.flush()

    def all_ready(self) -> bool:
        """Every slot has a worker that said Ready."""
        return all(w.ready for w in self.slots)

    def spawn(self, w: WorkerSlot) -> None:
        """Start a worker process in slot ``w`` (its counters carried into the supervisor's)."""
        assert self.block is not None and self.loop is not None
        mine, theirs = socket.socketpair()
        for sock in (mine, theirs):
            # Linux's default (208 KiB) is less than one NDJSON range of 2048 lines or a
            # routed part: each went in several writes and reads, a wakeup each, and the
            # supervisor relayed parts in pieces (key mode 1.01M → 1.18M events/s, medians
            # of 9; docs/performance.md). The kernel caps it at net.core.wmem_max.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHANNEL_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CHANNEL_BUFFER)
        slot = self.block.slots[w.index]
        self.block.supervisor.absorb(slot)  # what the previous worker counted stays counted
        slot.reset()
        spec = WorkerSpec(
            index=w.index,
            cpu=w.cpu,
            sock=theirs,
            shm_name=self.block.name,
            arenas=[(o.arena.name, o.arena.slots, o.arena.slot_bytes) if o.arena is not None else None
                    for o in self.slots],
            nworkers=len(self.slots),
            pipeline=self.pipeline,
            parent_pid=os.getpid(),
            heartbeat_interval=self.heartbeat_interval,
            log_level=logging.getLogger("collector").getEffectiveLevel(),
        )
        p = self.ctx.Process(target=worker_main, args=(spec,), name=f"collector-worker-{w.index}", daemon=True)
        try:
            p.start()  # raises when the pipeline cannot be pickled for the spawn
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        w.process = p
        w.pid = p.pid or 0
        w.ready = False
        w.exited = False
        w.boot_error = None
        w.acked = 0
        w.killing = 0.0
        w.spawned_at = time.monotonic()
        self.loop.add_reader(p.sentinel, self.on_sentinel, w)
        w.reader_task = self.loop.create_task(self.read(w, mine))

    async def read(self, w: WorkerSlot, sock: socket.socket) -> None:
        """Read a worker's frames until its channel closes (they are handled as they
        arrive, in :meth:`on_message`; this waits for the end)."""
        assert self.loop is not None
        _, proto = await self.loop.create_unix_connection(
            lambda: FrameProtocol(functools.partial(self.on_message, w), functools.partial(self.connected, w)),
            sock=sock)
        # when the worker is gone the channel closes; its sentinel tells how it died
        await proto.closed

    def connected(self, w: WorkerSlot, transport: asyncio.Transport) -> None:
        """The channel to slot ``w`` is open: its writer exists before any frame is read
        (a Ready frame pumps chunks to the worker)."""
        w.transport = transport
        w.out = FrameWriter(transport)

    def on_message(self, w: WorkerSlot, msg: Any) -> None:
        """A frame from the worker in slot ``w``."""
        owner = self.owner
        if type(msg) is Ack:
            w.acked += 1
            owner.worker_acked(w.index, msg)
        elif type(msg) is Ready:
            w.ready = True
            owner.worker_ready(w.index)
        elif type(msg) is Routed:
            owner.worker_routed(w.index, msg)
        elif type(msg) is Snapshot:
            owner.worker_snapshot(w.index, msg)
        elif type(msg) is BootFailed:
            w.boot_error = msg

    def on_sentinel(self, w: WorkerSlot) -> None:
        """The process of slot ``w`` ended."""
        assert self.loop is not None
        p = w.process
        if p is None:
            return
        self.loop.remove_reader(p.sentinel)
        t = w.reader_task
        if not w.ready and t is not None and not t.done():
            # a worker that failed at boot wrote its traceback just before exiting: the
            # sentinel can fire before that frame is read, so let the reader reach EOF
            # (bounded) and then judge the exit with the worker's own message in hand
            async def judge() -> None:
                await asyncio.wait({t}, timeout=2)
                self.on_exit(w)

            w.judging = self.loop.create_task(judge())  # held so it is not collected
            return
        self.on_exit(w)

    def on_exit(self, w: WorkerSlot) -> None:
        """Judge a death: fatal (boot failure, crash loop), or replace the worker."""
        p = w.process
        if p is None:
            return
        p.join(1)
        code = p.exitcode
        w.exited = True
        owner = self.owner
        if owner.stopping() and code == 0:
            return
        was_ready, w.ready = w.ready, False
        cause = describe_exit(code)
        w.deaths.append(time.monotonic())
        if w.boot_error is not None or code == BOOT_FAILURE or (not was_ready and code and code > 0):
            owner.fatal(self._boot_error(w, cause, code))
            return
        log.error(
            "worker %d (pid %d, cpu %s) died: %s", w.index, w.pid, w.cpu, cause,
            extra={"fields": {"event": "worker_died", "worker": w.index, "pid": w.pid, "cause": cause}},
        )
        if not owner.wants_replacement():
            return
        recent = [t for t in w.deaths if t > time.monotonic() - 30]
        if len(recent) >= 5 and w.acked == 0:
            owner.fatal(WorkerError(f"worker {w.index} keeps dying ({len(recent)} times in 30 s, last: {cause})", w.index))
            return
        self.reap(w)
        owner.worker_lost(w.index, cause)
        if self.block is not None:
            self.block.supervisor.add(S.RESTARTS, 1)
        self.spawn(w)

    def _boot_error(self, w: WorkerSlot, cause: str, code: int | None) -> WorkerBootError:
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
            f"{be.message if be else cause}{hint}; the collector stops instead of respawning it"
        )
        log.error(msg)
        return WorkerBootError(msg, w.index, be.traceback if be else None)

    def reap(self, w: WorkerSlot, kill: bool = False) -> None:
        """Join slot ``w``'s process (killing it first if asked) and close its channel."""
        p = w.process
        if p is not None:
            with contextlib.suppress(Exception):
                assert self.loop is not None
                self.loop.remove_reader(p.sentinel)
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
        if w.transport is not None:
            with contextlib.suppress(Exception):
                w.transport.close()
            w.transport = None
            w.out = None

    def kill_all(self) -> None:
        """SIGKILL every live worker (after a fatal error)."""
        for w in self.slots:
            if w.process is not None and w.process.is_alive():
                with contextlib.suppress(Exception):
                    w.process.kill()

    def release_held(self) -> None:
        """Ask every worker to release what its stages hold (the drain began)."""
        for w in self.slots:
            if w.transport is not None and not w.exited:
                with contextlib.suppress(Exception):
                    w.send(Release())

    async def stop(self, deadline: float) -> None:
        """Ask every worker to stop, wait until ``deadline``, then kill and reap them."""
        for w in self.slots:
            w.ready = False
            if w.transport is not None and not w.exited:
                with contextlib.suppress(Exception):
                    w.send(Stop())
        while any(w.process is not None and w.process.is_alive() for w in self.slots):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        for w in self.slots:
            self.reap(w, kill=True)
            if w.arena is not None:  # no process maps it any more
                w.arena.close()
                w.arena = None

    async def watch(self, running: Any) -> None:
        """Heartbeats: a worker silent past the timeout gets SIGABRT, then SIGKILL.

        ``running()`` says whether to go on watching.
        """
        while running():
            now = time.monotonic()
            for w in self.slots:
                if not w.ready or w.process is None or self.block is None:
                    continue
                age = now - self.block.slots[w.index].getf(S.HEARTBEAT)
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

    # -- introspection ----------------------------------------------------------------
    def workers_alive(self) -> list[bool]:
        """Whether each worker slot has a live, ready worker."""
        return [w.ready and w.alive() for w in self.slots]

    def heartbeats_fresh(self, limit: float) -> bool:
        """True while every worker is ready and stamped its heartbeat within ``limit`` s."""
        if self.block is None:
            return False
        now = time.monotonic()
        return all(w.ready and now - self.block.slots[w.index].getf(S.HEARTBEAT) < limit for w in self.slots)

    def worker_pids(self) -> list[int]:
        """The pid of each worker slot (0 while a slot has no process)."""
        return [w.pid if w.process is not None else 0 for w in self.slots]
