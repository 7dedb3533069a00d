"""PipelineRunner: one chunk through the pipeline, from bytes to an ``Ack``.

::

    Chunk.payload ──► decode (msgspec, whole chunk; per item only when something is invalid)
        ─► pipeline.stages in order (dedup, filters; a stage may await another chunk)
        ─► enrich (cache inline, distinct misses concurrently; failure policies: keep, hold,
           or dead-letter: out of the chunk, see deadletters.py) ─► count (batch statistics)
        ─► drain emitters (records a stage made) ─► sinks commit: events + records, one commit,
           while invalid and dead-lettered items go to the dead-letter sink ─► settle ─► Ack
    tick() every TICK s (the worker loop; no chunk needed) ─► expire(now) of stages that have it
        ─► drain emitters ─► sinks commit (records only)

Stages that remember what passed them (dedup) have a ``settle(events, ok, failed)``: it
is called with ``ok=True`` once the sinks committed the chunk (``failed``: the events a
sink dead-lettered instead of storing, not remembered), and with ``ok=False`` when the
chunk failed anywhere on the way, so a retried event is not dropped as a duplicate.
A settle may return an awaitable (a shared store's round trip), awaited before the ack.
An event a sink dead-lettered is answered with kind ``deadlettered`` (the sink and its
reason); it counts as handled, not failed: the dead-letter sink holds it.
Input never fails a chunk: every decode error becomes an :class:`ErrorRecord`.

Emitters: a stage runtime with ``drain() -> list`` makes new records (``Pair``'s
paired page views). What the emitters hold after a chunk's stages ran is committed
with the chunk's events in one ``sinkset.commit`` (records after the events), so it
follows the sinks' retry and dead-letter policy like the events; the records are not
positions of the chunk: a sink's dead-letter entry past the events counts in
``dead_records`` and is logged, the ack is unchanged. A runtime with ``expire(now)``
(it may return an awaitable) is called by :meth:`PipelineRunner.tick`, which the
worker loop runs every ``tick_interval`` seconds (the smallest ``tick`` among the
stages, default 1 s) so records are made without traffic; ``tick`` commits what the
emitters then hold on its own, concurrently with the chunks' commits. A runtime with
``aclose()`` is closed at the drain. ``Order``'s hooks (``settle_records``, ``flush``,
drops of kind ``held``, ``take_order``, ``redelivered``): stages/base.py, :mod:`.emitters`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from operator import attrgetter
from typing import Any

import msgspec

from .. import stats as S
from ..arena import PayloadArena
from ..enrich import Enricher, build_enricher
from ..pipeline import Pipeline, resolve_pipeline
from ..protocol import (
    Ack,
    Chunk,
    ChunkSummary,
    ErrorRecord,
    Message,
)
from ..registry import import_string
from ..sources.metrics import LookupMeter
from ..stages.routing import Routes, merge_routes, routes_of
from . import emitters
from .deadletters import take_dead
from .decoding import ChunkDecoder
from .ranges import RangeRouter

__all__ = ["TICK", "PipelineRunner"]

TICK = 1.0  # seconds between idle expiry calls when no stage names its own ``tick``
log = logging.getLogger("collector.worker")


class PipelineRunner:
    """The running form of a pipeline in one worker: decoders, stages, enricher, sinks.

    Built once at boot (the constructor raises when the pipeline cannot be built: the
    worker reports a boot failure); :meth:`run_chunk` then runs each chunk and hands its
    ``Ack`` to ``send``.
    """

    def __init__(self, pipeline: Pipeline | str, slot: S.Slot, worker: int, send: Callable[[Message], None],
                 arenas: Sequence[PayloadArena | None] = ()) -> None:
        self.slot = slot
        # every worker's payload arena, by index: this worker reads its chunks from its
        # own and writes the parts it routes into their owners'
        self.arena = arenas[worker] if arenas else None
        self.worker = worker
        self.send = send
        self.sinkset: Any = None
        self.enricher: Enricher | None = None
        self.counted: dict[int, int] = {}  # chunk id → events it added to INFLIGHT
        self.seen_keys: dict[int, set[Any]] = {}  # op → keys reported (shard="chunk", routed ranges)
        p = resolve_pipeline(pipeline)
        self.pipeline = p
        T = p.event_type
        decoder = ChunkDecoder(T)
        self.decode, self.items = decoder.decode, decoder.items
        self.report_keys = p.shard == "chunk"
        self.keyget = attrgetter(p.key)
        self.router = RangeRouter(p.key, worker, send, decoder, arenas)  # shard="key" NDJSON ranges
        self.enc = msgspec.json.Encoder()
        self.executor = ThreadPoolExecutor(p.blocking_threads, thread_name_prefix="collector-blocking")
        client = p.client
        if isinstance(client, str):
            factory = import_string(client, "client factory")
            client = factory() if callable(factory) else factory
        self.client = client
        self.enricher = (
            build_enricher(p.lookups, client, self.executor, p.event_type, p.id_field) if p.lookups else None
        )
        # per-lookup words of the slot (the first MAX_LOOKUPS lookups, in pipeline order)
        self.meters = {
            rt.spec.name: LookupMeter(slot, i, rt)
            for i, rt in enumerate(self.enricher.lookups if self.enricher is not None else ())
            if i < S.MAX_LOOKUPS
        }
        # the steps in pipeline order; enrichment runs where an Enrich() stage stands, or
        # after every stage when the pipeline names none (the order before Enrich existed)
        self.steps: list[tuple[Any, Any, Any, Any] | None] = []  # (runtime, settle, take_routes, take_order)
        self.stateful: list[tuple[str, Callable[[], bytes]]] = []  # (name, partial of the runtime) to publish
        self.emitters: list[Any] = []  # runtimes with drain(): records for the sinks
        self.expiring: list[Any] = []  # runtimes with expire(now): called by tick()
        self.closing: list[Any] = []  # runtimes with aclose()
        self.dead_records = 0  # emitted records a sink dead-lettered
        ticks = []
        for st in p.stages:
            if getattr(st, "is_enrich", False):
                if None not in self.steps:  # a second Enrich() is ignored: lookups run once
                    self.steps.append(None)
                continue
            run = st.build()
            if callable(getattr(run, "bind", None)):  # a stage reading the pipeline (Order: its key)
                run.bind(p)
            # a Rules runtime with route rules hands over each chunk's routes (id(event) → sinks)
            take = run.take_routes if getattr(run, "routing", False) else None
            # a stage that reorders the chunk (Order) hands over the new order
            reorder = run.take_order if callable(getattr(run, "take_order", None)) else None
            self.steps.append((run, getattr(run, "settle", None), take, reorder))
            # published partials are for the supervisor to merge: a runtime's partial()
            # when it has one (Pair: its counters; its snapshot() is its whole state, for
            # persistence, not worth encoding every interval), else its snapshot()
            if hasattr(st, "merge") and (hasattr(run, "partial") or hasattr(run, "snapshot")):
                self.stateful.append((st.name, getattr(run, "partial", None) or run.snapshot))
            if callable(getattr(run, "drain", None)):
                self.emitters.append(run)
            if callable(getattr(run, "expire", None)):
                self.expiring.append(run)
                ticks.append(getattr(st, "tick", TICK))
            if callable(getattr(run, "aclose", None)):
                self.closing.append(run)
        if None not in self.steps:
            self.steps.append(None)
        self.tick_interval = min(ticks, default=TICK)
        self.counters = [(f, attrgetter(f)) for f in p.count_by]

    def count_lookups(self, summary: ChunkSummary) -> None:
        """Add a chunk's lookup figures to the worker's shared-memory slot."""
        slot = self.slot
        meters = self.meters
        for name, ls in summary.lookups.items():
            slot.add(S.LOOKUP_CALLS, ls.calls)
            slot.add(S.CACHE_HITS, ls.hits)
            slot.add(S.COALESCED, ls.coalesced)
            slot.add(S.LOOKUP_FAILURES, ls.failures)
            m = meters.get(name)
            if m is not None:
                m.record(ls)

    def snapshots(self) -> list[tuple[str, bytes]]:
        """The partial state of every stateful stage (their bytes are reused while idle)."""
        return [(name, partial()) for name, partial in self.stateful]

    async def open(self) -> None:
        """Build and open the sinks (raises: a boot failure)."""
        if self.pipeline.sinks or self.pipeline.deadletter is not None:
            from ..sinks import build_sinkset
            from ..sinks.routing import check_routes

            check_routes(self.pipeline)  # a route to a sink the pipeline lacks: a boot failure
            self.sinkset = build_sinkset(
                list(self.pipeline.sinks),
                deadletter=self.pipeline.deadletter,
                event_type=self.pipeline.event_type,
                id_field=self.pipeline.id_field,
                slot=self.slot,
                worker=self.worker,
            )
            await self.sinkset.open()

    def drain_emitters(self) -> tuple[list[Any], list[tuple[Any, int, int]]]:
        """The records every emitter made since its last drain, with their spans (:mod:`.emitters`)."""
        return emitters.drain(self.emitters)

    def release_held(self) -> None:
        """The drain began: emitters that hold events (Order's buffer) release them all."""
        emitters.release(self.emitters)

    async def tick(self) -> int:
        """Expire what is due in every stage that expires, then commit the records made.

        Runs without a chunk (the worker loop calls it every ``tick_interval``); the
        commit runs concurrently with the chunks' commits. Returns the records
        committed. A failing stage is logged and the others still run.
        """
        for run in self.expiring:
            try:
                clock = getattr(run, "clock", None)
                res = run.expire(clock() if clock is not None else time.time())
                if inspect.isawaitable(res):  # a store across processes (Redis) answers later
                    await res
            except Exception:
                log.exception("stage %r: expiry on tick failed", getattr(getattr(run, "spec", None), "name", run))
        return await self.commit_records()

    async def commit_records(self) -> int:
        """Commit what the emitters hold, on its own (tick, drain); the records committed."""
        records, spans = self.drain_emitters()
        if not records:
            return 0
        if self.sinkset is None:
            emitters.settle(spans, records, True)
            return 0
        try:
            dead = await self.sinkset.commit(records)
        except BaseException:
            emitters.settle(spans, records, False)
            raise
        if dead:
            self.count_dead_records(dead, records, 0)
        emitters.settle(spans, records, True, dead)
        return len(records)

    def count_dead_records(self, dead: list[tuple[int, str, str]], records: list[Any], at: int) -> None:
        """Log the emitted records a sink dead-lettered (``dead`` positions from ``at``).

        The sinkset counted them in ``deadlettered`` when it wrote them to the
        dead-letter sink; they are no chunk's positions, so no ack answers for them.
        """
        positions = {pos for pos, _, _ in dead}
        self.dead_records += len(positions)
        pos, sink, why = dead[0]
        log.error(
            "%d emitted records were dead-lettered by the sinks (first: %r, sink %s: %s)",
            len(positions), records[pos - at], sink, why,
        )

    async def close_sinks(self) -> None:
        """Close the sinks and the sources' pools and sessions; errors are ignored (exiting).

        Records the emitters still hold are committed first; stages with ``aclose()``
        (a Redis client) are closed.
        """
        if self.sinkset is not None and self.emitters:
            self.release_held()
            try:
                await asyncio.wait_for(self.commit_records(), 30)
            except Exception:
                log.exception("committing the stages' last records at the drain failed")
        for run in self.closing:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(run.aclose(), 5)
        if self.sinkset is not None:
            with contextlib.suppress(Exception):
                await self.sinkset.close()
        if self.enricher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.enricher.close(), 5)

    def close(self) -> None:
        """Drop the blocking-call threads and what is queued for them."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    def op_keys(self, op: int) -> set[Any]:
        """Keys already reported for operation ``op`` (the last 64 operations are kept)."""
        seen = self.seen_keys.get(op)
        if seen is None:
            if len(self.seen_keys) >= 64:
                del self.seen_keys[next(iter(self.seen_keys))]
            seen = self.seen_keys[op] = set()
        return seen

    def payload(self, chunk: Chunk) -> bytes | memoryview:
        """The chunk's payload: inline, or its slot of the arena (read before the ack only:
        the supervisor writes the slot again once the ack is in)."""
        if chunk.slot < 0:
            return chunk.payload
        if self.arena is None:  # the spec names an arena whenever slots are used: a bug
            raise RuntimeError(f"chunk {chunk.id} is in arena slot {chunk.slot} but this worker has no arena")
        view = self.arena.view(chunk.slot, chunk.size)
        # an NDJSON range is copied into its array form before the parse; a JSON array is
        # parsed from a copy too: a msgspec.Raw field would point into the slot otherwise,
        # and an event a stage keeps (Order, Pair) would see the next chunk's bytes
        return view if chunk.ndjson else bytes(view)

    def fail(self, chunk: Chunk, e: Exception) -> None:
        """A bug in pipeline code fails the chunk's events (not the worker): ack them as errors."""
        self.slot.add(S.INFLIGHT, -self.counted.pop(chunk.id, 0))
        own = self.router.own_lines.pop(chunk.id, None)
        try:
            # a routed range answers only for the lines it kept: the others' owners ack theirs
            lines: Sequence[int] = own if own is not None else range(len(self.items(self.payload(chunk), chunk.ndjson)))
        except (msgspec.ValidationError, msgspec.DecodeError, RuntimeError):
            lines = ()
        n = len(lines)
        reason = f"pipeline error: {type(e).__name__}: {e}"
        errors = [ErrorRecord(i, "$", reason, "error") for i in lines]
        self.slot.count_processed(n, n, 0.0)  # before the ack, as in process()
        self.send(Ack(chunk.id, 0, n, errors, ChunkSummary(counts={}, lookups={})))

    async def run_chunk(self, chunk: Chunk) -> None:
        """Decode, run and commit one chunk, then send its ack (raises on a pipeline bug)."""
        # stages that remember what passed them (dedup) learn the chunk's fate after the
        # sinks: committed → remembered, failed → released, so a retry is not dropped
        settles: list[tuple[Any, list[Any]]] = []
        try:
            await self.process(chunk, settles)
        finally:
            for settle, passed in settles:  # left only when the chunk failed
                res = settle(passed, False)
                if res is not None:  # a shared store (Redis) releases the claims
                    await res

    async def process(self, chunk: Chunk, settles: list[tuple[Any, list[Any]]]) -> None:
        """Decode, stages, enrichment, counts and sinks for a chunk, then its ack."""
        t0 = time.perf_counter()
        slot = self.slot
        payload = self.payload(chunk)
        mine = self.router.split(chunk, payload) if chunk.route else None
        kept: list[int] | None
        errors: list[ErrorRecord]
        if mine is not None:  # routed without decoding the others' events
            (events, kept), errors = mine, []
        else:
            events, kept, errors = self.decode(payload, chunk.ndjson)
            if chunk.route:
                events, kept = self.router.route(chunk, events, kept, errors)
        n_total = len(events) + len(errors)
        slot.add(S.INFLIGHT, n_total)
        self.counted[chunk.id] = n_total
        failed = len(errors)
        invalid = list(errors)
        summary = ChunkSummary(counts={}, lookups={})
        routed: Routes | None = None  # id(event) → (event, the sinks its route rules name)
        policy_dead: list[Any] = []  # events a step's failure policy dead-lettered
        rejected: list[Any] = []  # DeadLetter records, written with the commit
        for step in self.steps:
            if step is None:
                if self.enricher is not None:
                    gone: list[Any] = []  # (event, stage, path, reason) a failure policy dead-lettered
                    summary.lookups = await self.enricher.enrich(events, gone)
                    self.count_lookups(summary)
                    # an event whose lookup failed keeps the default (failures of two lookups: two events)
                    fails = sum(ls.failures for ls in summary.lookups.values())
                    slot.add(S.ENRICHED, max(len(events) - fails, 0))
                    if gone:
                        events, kept, policy_dead, rejected = take_dead(gone, events, kept, errors, self.enc,
                                                                        self.worker)
                        slot.add(S.DEADLETTERED, len(rejected))
                continue
            stage, settle, take, reorder = step
            # a chunk delivered again after a worker died goes alone: a stage may treat it apart
            dropped = stage(events) if not chunk.attempt else getattr(stage, "redelivered", stage)(events)
            if reorder is not None:
                perm = reorder()
                if perm is not None:  # the stage's new order: events and their chunk positions
                    events = list(map(events.__getitem__, perm))
                    kept = list(map((kept if kept is not None else range(len(perm))).__getitem__, perm))
            if take is not None:  # taken now: another chunk may run the stage at the next await
                got = take()
                if got:
                    routed = got if routed is None else merge_routes(routed, got)
            if settle is not None:
                settles.append((settle, events))
            if type(dropped) is not list:  # a stage waiting for another chunk's outcome
                dropped = await dropped
            if not dropped:
                continue
            drop = {d.pos for d in dropped}
            for d in dropped:
                if d.kind == "held":  # off the chunk: the stage commits it through drain() (Order)
                    continue
                d.pos = kept[d.pos] if kept is not None else d.pos
                errors.append(d)
                if d.kind == "duplicate":
                    slot.add(S.DROPPED_DUP, 1)
                elif d.kind == "retry":  # not stored: the caller must send it again
                    failed += 1
                elif d.kind == "filtered":
                    slot.add(S.FILTERED, 1)
                # filtered, unauthorized: answered with their kind, not stored, not retried
                # and not failures (the stage counts them: rules, auth counters)
            if kept is None:
                kept = list(range(len(events)))
            kept = [p for i, p in enumerate(kept) if i not in drop]
            events = [e for i, e in enumerate(events) if i not in drop]
        if self.report_keys or chunk.route or chunk.part:
            seen = self.op_keys(chunk.op)
            try:
                # past an operation's first chunks every key is usually known already: one
                # pass that stops at the first new key comes before building the chunk's
                # set (in-memory key mode: 10 % of a worker went to this reporting)
                new = () if seen.issuperset(map(self.keyget, events)) else set(map(self.keyget, events)) - seen
            except TypeError:  # unhashable keys are not counted
                new = ()
            if new:
                seen.update(new)
                summary.keys = list(new)
        for name, get in self.counters:
            summary.counts[name] = {
                (k if type(k) is str else str(k)): v for k, v in Counter(map(get, events)).items()
            }
        records, spans = self.drain_emitters() if self.emitters else (None, [])
        dead: list[tuple[int, str, str]] = []
        if self.sinkset is not None:
            if invalid:
                from ..sinks import DeadLetter

                raws = self.items(payload, chunk.ndjson)
                now = time.time()
                rejected += [DeadLetter(bytes(raws[r.pos]).decode("utf-8", "replace"), r.reason, r.path, "validate",
                                        now, self.worker) for r in invalid]
                slot.add(S.DEADLETTERED, len(invalid))
            routes = None
            if routed:
                routes = routes_of(routed, events)
            n_ev = len(events)
            if records:
                if routes is not None:
                    routes += [None] * len(records)  # emitted records go where unrouted events go
                events_out: list[Any] = events + records
            else:
                events_out = events
            # the dead-letter records are written while the sinks commit (one round of the
            # writers, not two); both are done before the ack
            jobs = [self.sinkset.commit(events_out, routes)] if events_out else []
            if rejected:
                jobs.append(self.sinkset.reject(rejected))
            try:
                if len(jobs) > 1:
                    dead = (await asyncio.gather(*jobs))[0]
                elif jobs:
                    got = await jobs[0]
                    dead = got if events_out else []
            except BaseException:
                if records:
                    emitters.settle(spans, records, False)
                raise
            if records:
                # sorted by position: the chunk's events first, then the emitted records
                dead_records = [d for d in dead if d[0] >= n_ev] if dead and dead[-1][0] >= n_ev else []
                if dead_records:
                    self.count_dead_records(dead_records, records, n_ev)
                    dead = dead[: len(dead) - len(dead_records)]
                emitters.settle(spans, records, True, dead_records, n_ev)
        elif records:  # no sinks: nothing to store them in
            emitters.settle(spans, records, True)
        # stored: now (and only now) remembered as seen. Dead-lettered by a sink (store
        # full, down past its retries, refused a row) is not stored: a retry must not be
        # answered ``duplicate`` (the fault suite's full-filesystem case lost data so),
        # and the answer says ``deadlettered``, not ``accepted``
        unstored: list[Any] = policy_dead
        if dead:
            recs: dict[int, ErrorRecord] = {}
            for pos, sink, why in dead:
                rec = recs.get(pos)
                if rec is not None:  # a second sink did not store it either: one record, both reasons
                    rec.reason += f"; sink {sink}: {why}"
                    continue
                unstored.append(events[pos])
                rec = recs[pos] = ErrorRecord(kept[pos] if kept is not None else pos, "$", f"sink {sink}: {why}", "deadlettered")
                errors.append(rec)
        for settle, passed in settles:
            res = settle(passed, True, unstored)
            if res is not None:  # a shared store (Redis) marks the ids stored before the ack
                await res
        settles.clear()
        out = None
        if chunk.want_events:
            # the supervisor places the returned events at the positions without an error
            # record: a sink's dead-lettered events (still in ``events``) are not returned
            skip = {id(e) for e in unstored} if unstored else None
            out = self.enc.encode(events if skip is None else [e for e in events if id(e) not in skip])
        if errors and len(errors) > 1:
            errors.sort(key=attrgetter("pos"))
        latency = time.perf_counter() - t0
        ack = Ack(chunk.id, n_total - failed, failed, errors, summary, out, latency)
        self.router.own_lines.pop(chunk.id, None)
        # counted before the ack leaves (it is written at once): a caller answered
        # after it reads /metrics or stats() and must find its events there
        slot.add(S.INFLIGHT, -n_total)
        del self.counted[chunk.id]
        slot.count_processed(n_total, failed, latency)
        self.send(ack)
