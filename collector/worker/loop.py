"""WorkerLoop: the worker's side of its channel.

::

    channel (socketpair, frames) ──► read Chunk ──► task per CHUNK (never per event)
        ──► PipelineRunner.run_chunk ──► Ack ──► FrameWriter (one write per loop turn)
    Release ──► stages release what they hold (the collector began to drain: Order's buffer)
    Stop or EOF ──► drain: wait for the chunk tasks, close the sinks, flush the acks
    heartbeat task ──► stamps the shared-memory slot; exits if the parent is gone
    publish task ──► every SNAPSHOT_INTERVAL: Snapshot(stage, partial) of each stateful
                     stage whose state changed (aggregates), and once more at the drain
    tick task ──► every runner.tick_interval (stages with expire(): Pair, Aggregate):
                  PipelineRunner.tick: expire, commit the records made; errors logged,
                  never fatal; at the drain it finishes its round, then what the
                  stages still hold is committed before the sinks close

A pipeline that cannot be built is reported once as ``BootFailed`` (with its
traceback) and the loop returns :data:`BOOT_FAILURE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
import traceback
from collections.abc import Sequence

from .. import stats as S
from ..arena import PayloadArena
from ..pipeline import Pipeline
from ..protocol import (
    BootFailed,
    Chunk,
    FrameWriter,
    Ready,
    Release,
    Snapshot,
    Stop,
    encode_frame,
    read_frames,
)
from .runner import PipelineRunner

__all__ = ["BOOT_FAILURE", "WorkerLoop"]

BOOT_FAILURE = 3  # exit code: the pipeline could not be built; do not respawn
SNAPSHOT_INTERVAL = 0.25  # seconds between partials: an aggregate read is at most this behind
log = logging.getLogger("collector.worker")


class WorkerLoop:
    """One worker's channel loop: boot the runner, one task per chunk, heartbeat, drain."""

    def __init__(
        self,
        sock: socket.socket,
        pipeline: Pipeline | str,
        slot: S.Slot,
        index: int,
        parent_pid: int,
        heartbeat_interval: float,
        arenas: Sequence[PayloadArena | None] = (),
    ) -> None:
        self.sock = sock
        self.arenas = arenas
        self.pipeline = pipeline
        self.slot = slot
        self.index = index
        self.parent_pid = parent_pid
        self.heartbeat_interval = heartbeat_interval
        self.tasks: set[asyncio.Task[None]] = set()
        self.published: dict[str, bytes] = {}
        self.stopping = asyncio.Event()

    async def main(self) -> int:
        """Boot, serve the channel until Stop or EOF, drain; the process exit code."""
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_unix_connection(sock=self.sock, limit=1 << 20)
        self.writer = writer
        self.out = FrameWriter(writer.transport)
        try:
            self.runner = PipelineRunner(self.pipeline, self.slot, self.index, self.out.send_now, self.arenas)
            await self.runner.open()
        except Exception as e:  # every boot failure is reported, then we exit
            writer.write(
                encode_frame(BootFailed(os.getpid(), f"{type(e).__name__}: {e}", traceback.format_exc()))
            )
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), 5)
            return BOOT_FAILURE
        hb = loop.create_task(self.heartbeat())
        pub = loop.create_task(self.publish()) if self.runner.stateful else None
        ticker = loop.create_task(self.tick()) if self.runner.expiring or self.runner.emitters else None
        # the pipeline, its clients and the modules live as long as the worker: frozen out
        # of the cyclic GC, a full collection walks only what the chunks made
        gc.collect()
        gc.freeze()
        self.slot.set(S.READY, 1)
        writer.write(encode_frame(Ready(os.getpid())))
        try:
            await self.serve(reader)
        finally:
            hb.cancel()
            if pub is not None:
                pub.cancel()
            if self.tasks:
                # chunks waiting for their held events (Order's buffer): release them now,
                # the tick commits them, so the drain does not wait out max_delay
                self.runner.release_held()
                await asyncio.gather(*self.tasks, return_exceptions=True)
            if ticker is not None:  # let a round in progress finish its commit
                self.stopping.set()
                await asyncio.gather(ticker, return_exceptions=True)
            self.publish_once()  # the drained chunks are in the last partials
            await self.runner.close_sinks()
            with contextlib.suppress(Exception):
                self.out.flush()
                await writer.drain()
                writer.close()
            self.runner.close()
        return 0

    async def heartbeat(self) -> None:
        """Stamp the slot every interval; exit at once when the supervisor is gone."""
        interval = self.heartbeat_interval
        parent = self.parent_pid
        while True:
            self.slot.heartbeat()
            if os.getppid() != parent:
                log.error("supervisor (pid %d) is gone; exiting", parent)
                os._exit(1)
            await asyncio.sleep(interval)

    def publish_once(self) -> None:
        """Send the partials that changed since the last ones sent (same bytes: unchanged)."""
        now = time.time()
        for name, data in self.runner.snapshots():
            if self.published.get(name) is not data:
                self.published[name] = data
                self.out.send(Snapshot(name, data, now))

    async def publish(self) -> None:
        """Publish partial state every SNAPSHOT_INTERVAL; a stage that fails is logged once."""
        failing = False
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL)
            try:
                self.publish_once()
                failing = False
            except Exception:
                if not failing:
                    log.exception("publishing stage partials failed; retrying every %.2f s", SNAPSHOT_INTERVAL)
                failing = True

    async def tick(self) -> None:
        """Call ``runner.tick()`` every tick interval until the drain; failures are logged."""
        interval = self.runner.tick_interval
        failing = False
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)
            if self.stopping.is_set():
                return
            try:
                await self.runner.tick()
                failing = False
            except Exception:  # tick() logs its stages' failures; this is a sink or a bug
                if not failing:
                    log.exception("stage tick failed; retrying every %.2f s", interval)
                failing = True

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Start a task per chunk until Stop, or until the supervisor closes the channel."""
        loop = asyncio.get_running_loop()
        async for msg in read_frames(reader):
            if type(msg) is Chunk:
                t = loop.create_task(self.guarded(msg))
                self.tasks.add(t)
                t.add_done_callback(self.tasks.discard)
            elif type(msg) is Release:  # the collector drains: held events go now
                self.runner.release_held()
            elif type(msg) is Stop:
                return

    async def guarded(self, chunk: Chunk) -> None:
        """Run a chunk; a bug in pipeline code fails the chunk's events, not the worker."""
        try:
            await self.runner.run_chunk(chunk)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reported in the ack, logged with traceback
            log.exception("chunk %d failed in pipeline code", chunk.id)
            self.runner.fail(chunk, e)
            return
        if self.out.pending() > (4 << 20):
            await self.writer.drain()
