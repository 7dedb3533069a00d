"""A worker process: one per CPU, pinned to it, running one uvloop loop.

::

    channel (socketpair, frames) ──► read Chunk ──► task per CHUNK (never per event):
        decode (msgspec, whole chunk; per item only when something is invalid)
        ─► stages (dedup, filters) ─► enrich (cache inline, distinct misses concurrently)
        ─► count (batch statistics) ─► sinks commit ─► Ack ──► channel
    heartbeat task ──► stamps the shared-memory slot; exits if the parent is gone

The entry point :func:`worker_main` is a top-level function (spawn imports it by
name): it re-initialises logging, pins the CPU, builds the pipeline, runs the loop.
A worker that cannot build its pipeline sends ``BootFailed`` with its traceback and
exits with :data:`BOOT_FAILURE`, so the supervisor halts instead of respawning it in a
loop. Input never kills a worker: every decode error becomes an error record.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import gc
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import msgspec

from . import stats as S
from .enrich import Enricher, build_enricher
from .pipeline import Pipeline, import_string, resolve_pipeline
from .protocol import (
    Ack,
    BootFailed,
    Chunk,
    ChunkSummary,
    ErrorRecord,
    FrameWriter,
    Ready,
    Stop,
    encode_frame,
    read_frames,
)

__all__ = ["BOOT_FAILURE", "WorkerSpec", "worker_main"]

BOOT_FAILURE = 3  # exit code: the pipeline could not be built; do not respawn
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


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the process that started us dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the heartbeat task checks getppid()
        pass


def _error_path(msg: str) -> tuple[str, str]:
    """Split msgspec's "Expected `int`, got `str` - at `$.start_at`" into path, reason."""
    reason, sep, rest = msg.rpartition(" - at `")
    if sep:
        return rest.rstrip("`"), reason
    return "$", msg


def worker_main(spec: WorkerSpec) -> None:
    """Process entry point: see the module docstring."""
    _die_with_parent()
    if os.getppid() != spec.parent_pid:  # the parent died before PDEATHSIG was set
        os._exit(0)
    from .logs import setup_logging

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
    slot = block.slots[spec.index]
    slot.set(S.PID, os.getpid())
    slot.setf(S.STARTED, time.monotonic())
    slot.heartbeat()
    import uvloop

    code = 0
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            code = runner.run(_Worker(spec, slot).main())
    finally:
        slot.set(S.READY, 0)
        del slot
        block.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Worker:
    def __init__(self, spec: WorkerSpec, slot: S.Slot) -> None:
        self.spec = spec
        self.slot = slot
        self.writer: asyncio.StreamWriter | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.sinkset: Any = None
        self.enricher: Enricher | None = None
        self.counted: dict[int, int] = {}
        self.seen_keys: dict[int, set[Any]] = {}  # op → keys reported (shard="chunk")  # chunk id → events it added to INFLIGHT

    def build(self) -> None:
        """Build the pipeline's running form (raises: the caller reports a boot failure)."""
        p = resolve_pipeline(self.spec.pipeline)
        self.pipeline = p
        T = p.event_type
        self.dec = msgspec.json.Decoder(list[T])  # type: ignore[valid-type]
        self.dec_one = msgspec.json.Decoder(T)
        self.report_keys = p.shard == "chunk"
        self.keyget = attrgetter(p.key)
        self.dec_raw = msgspec.json.Decoder(list[msgspec.Raw])
        self.enc = msgspec.json.Encoder()
        self.executor = ThreadPoolExecutor(p.blocking_threads, thread_name_prefix="collector-blocking")
        client = p.client
        if isinstance(client, str):
            factory = import_string(client, "client factory")
            client = factory() if callable(factory) else factory
        self.client = client
        self.enricher = build_enricher(p.lookups, client, self.executor) if p.lookups else None
        self.stages = []
        for st in p.stages:
            run = st.build()
            self.stages.append((run, getattr(run, "settle", None)))
        self.counters = [(f, attrgetter(f)) for f in p.count_by]

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_unix_connection(sock=self.spec.sock, limit=1 << 20)
        self.writer = writer
        try:
            self.build()
            if self.pipeline.sinks or self.pipeline.deadletter is not None:
                from .sinks import build_sinkset

                self.sinkset = build_sinkset(
                    list(self.pipeline.sinks),
                    deadletter=self.pipeline.deadletter,
                    event_type=self.pipeline.event_type,
                    id_field=self.pipeline.id_field,
                    slot=self.slot,
                    worker=self.spec.index,
                )
                await self.sinkset.open()
        except Exception as e:  # every boot failure is reported, then we exit
            writer.write(
                encode_frame(BootFailed(os.getpid(), f"{type(e).__name__}: {e}", traceback.format_exc()))
            )
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), 5)
            return BOOT_FAILURE
        self.out = FrameWriter(writer)
        hb = loop.create_task(self.heartbeat())
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
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            if self.sinkset is not None:
                with contextlib.suppress(Exception):
                    await self.sinkset.close()
            with contextlib.suppress(Exception):
                self.out.flush()
                await writer.drain()
                writer.close()
            self.executor.shutdown(wait=False, cancel_futures=True)
        return 0

    async def heartbeat(self) -> None:
        interval = self.spec.heartbeat_interval
        parent = self.spec.parent_pid
        while True:
            self.slot.heartbeat()
            if os.getppid() != parent:
                log.error("supervisor (pid %d) is gone; exiting", parent)
                os._exit(1)
            await asyncio.sleep(interval)

    async def serve(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        # the loop ends when the supervisor closes the channel (or dies): stop
        async for msg in read_frames(reader):
            if type(msg) is Chunk:
                t = loop.create_task(self.guarded(msg))
                self.tasks.add(t)
                t.add_done_callback(self.tasks.discard)
            elif type(msg) is Stop:
                return

    def op_keys(self, op: int) -> set[Any]:
        """Keys already reported for operation ``op`` (the last 64 operations are kept)."""
        seen = self.seen_keys.get(op)
        if seen is None:
            if len(self.seen_keys) >= 64:
                del self.seen_keys[next(iter(self.seen_keys))]
            seen = self.seen_keys[op] = set()
        return seen

    def items(self, payload: bytes, ndjson: bool) -> list[Any]:
        """The raw JSON text of each item of a chunk."""
        if ndjson:
            return payload.split(b"\n")
        return self.dec_raw.decode(payload)

    def decode(self, payload: bytes, ndjson: bool = False) -> tuple[list[Any], list[int] | None, list[ErrorRecord]]:
        """Events of a chunk; ``kept`` maps event index → chunk position when some failed."""
        try:
            if ndjson:
                # one array parse beats decode_lines; a blank line makes it fail (",,")
                # and the slow path below reports it as an item of its own
                return self.dec.decode(b"[" + payload.replace(b"\n", b",") + b"]"), None, []
            else:
                return self.dec.decode(payload), None, []
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
        # slow path, only for chunks that hold an invalid event: item by item
        errors: list[ErrorRecord] = []
        try:
            raws = self.items(payload, ndjson)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            # the supervisor validated the JSON structure; this is a bug, not input
            raise RuntimeError(f"chunk payload is not a JSON array: {e}") from e
        events = []
        kept: list[int] = []
        dec_one = self.dec_one
        for i, raw in enumerate(raws):
            try:
                events.append(dec_one.decode(raw))
                kept.append(i)
            except msgspec.ValidationError as e:
                path, reason = _error_path(str(e))
                errors.append(ErrorRecord(i, path, reason, "invalid"))
            except msgspec.DecodeError as e:
                errors.append(ErrorRecord(i, "$", f"malformed JSON: {e}", "invalid"))
        return events, kept, errors

    async def guarded(self, chunk: Chunk) -> None:
        """Run a chunk; a bug in pipeline code fails the chunk's events, not the worker."""
        try:
            await self.run_chunk(chunk)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reported in the ack, logged with traceback
            log.exception("chunk %d failed in pipeline code", chunk.id)
            self.slot.add(S.INFLIGHT, -self.counted.pop(chunk.id, 0))
            try:
                n = len(self.items(chunk.payload, chunk.ndjson))
            except (msgspec.ValidationError, msgspec.DecodeError):
                n = 0
            reason = f"pipeline error: {type(e).__name__}: {e}"
            errors = [ErrorRecord(i, "$", reason, "error") for i in range(n)]
            self.out.send(Ack(chunk.id, 0, n, errors, ChunkSummary(counts={}, lookups={})))
            self.slot.count_processed(n, n, 0.0)

    async def run_chunk(self, chunk: Chunk) -> None:
        t0 = time.perf_counter()
        slot = self.slot
        events, kept, errors = self.decode(chunk.payload, chunk.ndjson)
        n_total = len(events) + len(errors)
        slot.add(S.INFLIGHT, n_total)
        self.counted[chunk.id] = n_total
        failed = len(errors)
        invalid = list(errors)
        # stages that remember what passed them (dedup) learn the chunk's fate after the
        # sinks: committed → remembered, failed → released, so a retry is not dropped
        settles: list[tuple[Any, list[Any]]] = []
        try:
            await self.process(chunk, t0, events, kept, errors, failed, invalid, settles)
        finally:
            for settle, passed in settles:  # left only when the chunk failed
                settle(passed, False)

    async def process(
        self,
        chunk: Chunk,
        t0: float,
        events: list[Any],
        kept: list[int] | None,
        errors: list[ErrorRecord],
        failed: int,
        invalid: list[ErrorRecord],
        settles: list[tuple[Any, list[Any]]],
    ) -> None:
        """Stages, enrichment, counts and sinks for a decoded chunk, then its ack."""
        slot = self.slot
        n_total = len(events) + len(errors)
        for stage, settle in self.stages:
            dropped = stage(events)
            if settle is not None:
                settles.append((settle, events))
            if type(dropped) is not list:  # a stage waiting for another chunk's outcome
                dropped = await dropped
            if not dropped:
                continue
            drop = {d.pos for d in dropped}
            for d in dropped:
                d.pos = kept[d.pos] if kept is not None else d.pos
                errors.append(d)
                if d.kind == "duplicate":
                    slot.add(S.DROPPED_DUP, 1)
                elif d.kind == "retry":  # not stored: the caller must send it again
                    failed += 1
            if kept is None:
                kept = list(range(len(events)))
            kept = [p for i, p in enumerate(kept) if i not in drop]
            events = [e for i, e in enumerate(events) if i not in drop]
        summary = ChunkSummary(counts={}, lookups={})
        if self.enricher is not None:
            summary.lookups = await self.enricher.enrich(events)
            for ls in summary.lookups.values():
                slot.add(S.LOOKUP_CALLS, ls.calls)
                slot.add(S.CACHE_HITS, ls.hits)
                slot.add(S.COALESCED, ls.coalesced)
                slot.add(S.LOOKUP_FAILURES, ls.failures)
        if self.report_keys:
            seen = self.op_keys(chunk.op)
            try:
                new = set(map(self.keyget, events)) - seen
            except TypeError:  # unhashable keys are not counted
                new = set()
            seen |= new
            summary.keys = list(new)
        for name, get in self.counters:
            summary.counts[name] = {
                (k if type(k) is str else str(k)): v for k, v in Counter(map(get, events)).items()
            }
        if self.sinkset is not None:
            if invalid:
                from .sinks import DeadLetter

                raws = self.items(chunk.payload, chunk.ndjson)
                await self.sinkset.reject(
                    [
                        DeadLetter(
                            payload=bytes(raws[r.pos]).decode("utf-8", "replace"),
                            reason=r.reason,
                            path=r.path,
                            stage="validate",
                            time=time.time(),
                        )
                        for r in invalid
                    ]
                )
                slot.add(S.DEADLETTERED, len(invalid))
            stored = await self.sinkset.commit(events) if events else True
        else:
            stored = True
        # stored: now (and only now) remembered as seen. Dead-lettered by a sink (store
        # full, down past its retries, refused a row) is not stored: a retry must not be
        # answered ``duplicate`` (the fault suite's full-filesystem case lost data so)
        for settle, passed in settles:
            settle(passed, stored)
        settles.clear()
        out = self.enc.encode(events) if chunk.want_events else None
        if errors and len(errors) > 1:
            errors.sort(key=attrgetter("pos"))
        latency = time.perf_counter() - t0
        ack = Ack(chunk.id, n_total - failed, failed, errors, summary, out, latency)
        self.out.send(ack)
        slot.add(S.INFLIGHT, -n_total)
        del self.counted[chunk.id]
        slot.count_processed(n_total, failed, latency)
        if self.out.pending() > (4 << 20):
            assert self.writer is not None
            await self.writer.drain()
