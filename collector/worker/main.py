"""The worker process entry point: what runs before and after the loop.

:func:`worker_main` is a top-level function (spawn imports it by name): it asks to die
with its parent, re-initialises logging, ignores the signals the supervisor owns, pins
the CPU, finds its stats slot and runs :class:`~collector.worker.loop.WorkerLoop` on a
uvloop loop. A worker that cannot build its pipeline exits with :data:`BOOT_FAILURE`,
so the supervisor halts instead of respawning it in a loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import faulthandler
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from .. import stats as S
from ..arena import PayloadArena
from ..pipeline import Pipeline
from .loop import BOOT_FAILURE, WorkerLoop

__all__ = ["BOOT_FAILURE", "WorkerSpec", "worker_main"]

log = logging.getLogger("collector.worker")


@dataclass
class WorkerSpec:
    """Everything a worker needs, handed over once at spawn (configuration, not data)."""

    index: int
    cpu: int | None
    sock: socket.socket
    shm_name: str
    nworkers: int
    pipeline: Pipeline | str
    parent_pid: int
    heartbeat_interval: float
    log_level: int
    # every worker's payload arena by index (name, slots, slot bytes; None: none): a worker
    # reads its chunks from its own and writes the parts it routes into their owners'
    arenas: list[tuple[str, int, int] | None] = field(default_factory=list)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the process that started us dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the heartbeat task checks getppid()
        pass


def worker_main(spec: WorkerSpec) -> None:
    """Process entry point: see the module docstring."""
    _die_with_parent()
    if os.getppid() != spec.parent_pid:  # the parent died before PDEATHSIG was set
        os._exit(0)
    from ..logs import setup_logging

    setup_logging(spec.log_level, worker=spec.index)  # JSON lines under the daemon
    faulthandler.enable()  # SIGABRT from the supervisor (hung worker) dumps every stack
    # SIGINT goes to the whole foreground process group on Ctrl-C; the supervisor
    # decides when workers stop (after draining), so workers ignore it
    # SIGTERM and SIGHUP likewise: systemd's default KillMode sends SIGTERM to every
    # process of the unit, and a worker that died of it could not finish the drain
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if spec.cpu is not None:
        try:
            os.sched_setaffinity(0, {spec.cpu})
        except (OSError, AttributeError) as e:
            log.warning("cannot pin to CPU %s: %s", spec.cpu, e)
    block = S.StatsBlock(spec.nworkers, spec.shm_name, create=False)
    arenas: list[PayloadArena | None] = []
    for where in spec.arenas:
        arenas.append(PayloadArena(where[1], where[2], where[0], create=False) if where is not None else None)
    slot = block.slots[spec.index]
    slot.set(S.PID, os.getpid())
    slot.setf(S.STARTED, time.monotonic())
    slot.heartbeat()
    import uvloop

    code = 0
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            code = runner.run(
                WorkerLoop(spec.sock, spec.pipeline, slot, spec.index, spec.parent_pid, spec.heartbeat_interval,
                           arenas).main()
            )
    finally:
        slot.set(S.READY, 0)
        del slot
        block.close()
        for arena in arenas:
            if arena is not None:
                arena.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
