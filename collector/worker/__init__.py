"""The worker: one process per CPU, pinned to it, running one uvloop loop.

::

    supervisor ──channel i (socketpair, frames)──► worker i
      main.worker_main   pdeathsig, logs, signals ignored, CPU pin, stats slot, uvloop
      loop.WorkerLoop    read Chunk ──► task per CHUNK (never per event) ─────────┐
                         heartbeat task ──► slot i; exits if the parent is gone   │
                         tick task ──► runner.tick(): expire, commit records      │
      runner.PipelineRunner                                                      ▼
          [ranges.RangeRouter: a shard="key" NDJSON range keeps this worker's lines, the
          others go back to the supervisor as Routed parts (keyroute.c reads only the keys)]
          ─► decoding.ChunkDecoder (msgspec)
          ─► pipeline.stages in order (dedup, filters, pair)
          ─► enrich ─► count ─► sinks commit (events + emitted records) ─► stages settle ─► Ack ──► channel i

The supervisor imports only :func:`worker_main` (its spawn target), :class:`WorkerSpec`
and :data:`BOOT_FAILURE`. Input never kills a worker: every decode error becomes an
error record; a bug in pipeline code fails its chunk, not the process.
"""

from .main import BOOT_FAILURE, WorkerSpec, worker_main

__all__ = ["BOOT_FAILURE", "WorkerSpec", "worker_main"]
