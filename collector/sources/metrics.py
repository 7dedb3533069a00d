"""Per-source metrics: written per chunk into the worker's shared-memory slot, read by summing slots.

::

    worker: enrich(chunk) ─► LookupSummary per lookup ─► LookupMeter.record ─► slot words
            (LOOKUP_BASE + i * LOOKUP_WORDS, i = the lookup's position in Pipeline.lookups)
    reader: read_sources(block, lookups) ─► Σ worker slots + the supervisor's (what
            replaced workers counted) ─► {lookup name: SourceMetrics}

The transport is the stats block itself (DESIGN principle 4): one writer per slot,
aligned words, no lock and no message, so reading never waits for a busy worker. A
worker writes per chunk (a few dozen word additions per lookup), never per event.
Counters are added; the breaker state is a gauge each worker sets to its own breaker's
state as of its last chunk, and the reader reports how many workers see each state.
Latencies are bucketed (``LOOKUP_LAT_BOUNDS_MS``); percentiles are a bucket's upper
bound, so they are as fine as the buckets.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .. import stats as S
from ..protocol import LookupSummary
from .fetch import ERROR_KINDS
from .guard import CLOSED, HALF_OPEN, OPEN

__all__ = ["BREAKER_STATES", "LookupMeter", "SourceMetrics", "percentile", "policy_of", "read_sources"]

BREAKER_STATES = (CLOSED, OPEN, HALF_OPEN)  # gauge value = index
_F = {f: i for i, f in enumerate(S.LOOKUP_FIELDS)}
_ERR0 = _F["err_timeout"]
_POLICY0 = _F["kept"]  # kept, dead_lettered, held, recovered, log_suppressed
_NB = len(S.LOOKUP_LAT_BOUNDS_MS)


class SourceMetrics(msgspec.Struct, frozen=True):
    """One lookup's figures, summed over the workers (and the workers they replaced).

    Event counts: ``cache_hits`` (local cache), ``misses`` (needed a fetch; of those
    ``coalesced`` joined a call under way), ``failures`` (field left at its default or
    given a stale value), ``not_found``, ``stale_served``. Key and call counts:
    ``redis_hits`` (keys the shared level answered), ``calls`` (tries, retries
    included), ``keys_fetched`` (÷ calls: ``keys_per_call``), ``short_circuited``
    (calls refused by an open breaker), ``errors`` (failed tries by kind).
    ``success_rate`` = 1 - failures ÷ (cache_hits + misses) (None before any event).
    ``breaker`` is the worst state any worker's breaker is in (open > half_open >
    closed; None for a client-method lookup, which has none), ``breaker_workers``
    how many workers see each state, ``breaker_transitions`` how often breakers
    entered each state (by state name). Latencies are of calls, in milliseconds; ``latency_buckets``
    counts calls per bucket of ``LOOKUP_LAT_BOUNDS_MS`` (upper bounds; the last bucket
    holds what is over the last finite bound).
    """

    name: str
    kind: str
    events: int
    success_rate: float | None
    calls: int
    cache_hits: int
    redis_hits: int
    misses: int
    coalesced: int
    failures: int
    not_found: int
    stale_served: int
    keys_fetched: int
    keys_per_call: float
    short_circuited: int
    errors: dict[str, int]
    breaker: str | None
    breaker_workers: dict[str, int]
    breaker_transitions: dict[str, int]
    latency_ms: dict[str, float]
    latency_buckets: list[int]
    policy: dict[str, str] = {}
    kept: int = 0
    dead_lettered: int = 0
    held: int = 0
    recovered: int = 0
    log_suppressed: int = 0


def percentile(buckets: list[tuple[float, int]], q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` (the last finite bound for
    the overflow bucket; 0 with no samples)."""
    total = sum(n for _, n in buckets)
    if not total:
        return 0.0
    need = q * total
    acc = 0
    finite = [b for b, _ in buckets if b != float("inf")]
    for bound, n in buckets:
        acc += n
        if acc >= need and n:
            return float(bound if bound != float("inf") else finite[-1])
    return float(finite[-1])


class LookupMeter:
    """The writer side for one lookup in one worker (see the module docstring)."""

    __slots__ = ("base", "breaker", "entered", "fetcher", "slot")

    def __init__(self, slot: S.Slot, index: int, runtime: Any) -> None:
        self.slot = slot
        self.base = S.LOOKUP_BASE + index * S.LOOKUP_WORDS
        self.fetcher = getattr(runtime, "fetcher", None)  # a source lookup's (errors by kind)
        self.breaker = getattr(runtime, "breaker", None)
        self.entered = dict(self.breaker.entered) if self.breaker is not None else {}

    def record(self, s: LookupSummary) -> None:
        """Add one chunk's figures (and the calls that finished since) to the slot."""
        v = [0] * S.LOOKUP_WORDS
        v[0], v[1], v[2], v[3], v[4] = s.calls, s.hits, s.shared_hits, s.misses, s.coalesced
        v[5], v[6], v[7], v[8], v[9], v[10] = (s.failures, s.not_found, s.stale, s.keys_fetched,
                                               s.short_circuited, s.breaker_opens)
        br = self.breaker
        if br is not None:
            now = br.entered
            v[11] = now[HALF_OPEN] - self.entered[HALF_OPEN]
            v[12] = now[CLOSED] - self.entered[CLOSED]
            self.entered = dict(now)
        f = self.fetcher
        if f is not None:
            kinds = f.kinds
            v[_ERR0 : _ERR0 + len(kinds)] = kinds
            f.kinds = [0] * len(kinds)
        else:  # a client method's failed calls: no kind to tell
            v[_ERR0 + len(ERROR_KINDS) - 1] = s.errors
        v[_POLICY0 : _POLICY0 + 5] = s.kept, s.dead_lettered, s.held, s.recovered, s.log_suppressed
        lats = s.latencies
        if lats:
            v[_F["latency_sum_us"]] = int(sum(lats) * 1e6)
            bounds = S.LOOKUP_LAT_BOUNDS_MS
            lat0 = S.LOOKUP_LAT
            for x in lats:  # one per call, not per event
                ms = x * 1000.0
                for i, b in enumerate(bounds):
                    if ms <= b:
                        v[lat0 + i] += 1
                        break
        slot = self.slot
        slot.add_many(self.base, v)
        if br is not None:
            slot.set(self.base + S.LOOKUP_STATE, BREAKER_STATES.index(br.state))


def policy_of(lk: Any) -> dict[str, str]:
    """A lookup's failure policy as shown with its metrics: per outcome, and a hold's ``then``."""
    out = {"not_found": lk.policy_for("not_found"), "error": lk.policy_for("error")}
    if "hold" in out.values():
        out["then"] = lk.then
    return out


def read_sources(block: S.StatsBlock, lookups: list[tuple[Any, ...]]) -> dict[str, SourceMetrics]:
    """``{name: SourceMetrics}`` for ``lookups`` ((name, kind[, policy]) in Pipeline.lookups order)."""
    n = min(len(lookups), S.MAX_LOOKUPS)
    if not n:
        return {}
    W = S.LOOKUP_WORDS
    tot = [[0] * W for _ in range(n)]
    states = [[0, 0, 0] for _ in range(n)]
    for w in range(block.workers + 1):
        q = block.raw(w)
        for k in range(n):
            base = S.LOOKUP_BASE + k * W
            t = tot[k]
            for j in range(W):
                t[j] += q[base + j]
            if w < block.workers:
                st = q[base + S.LOOKUP_STATE]
                states[k][st if 0 <= st < 3 else 0] += 1
    out: dict[str, SourceMetrics] = {}
    for k in range(n):
        name, kind = lookups[k][:2]
        policy = lookups[k][2] if len(lookups[k]) > 2 else {}
        t = tot[k]
        c = dict(zip(S.LOOKUP_FIELDS, t, strict=False))
        events = c["hits"] + c["misses"]
        buckets = [(float(b), t[S.LOOKUP_LAT + i]) for i, b in enumerate(S.LOOKUP_LAT_BOUNDS_MS)]
        nlat = sum(x for _, x in buckets)
        has_breaker = kind != "client"
        worst = next((s for s in (OPEN, HALF_OPEN) if states[k][BREAKER_STATES.index(s)]), CLOSED)
        out[name] = SourceMetrics(
            name=name,
            kind=kind,
            events=events,
            success_rate=round(1.0 - c["failures"] / events, 6) if events else None,
            calls=c["calls"],
            cache_hits=c["hits"],
            redis_hits=c["shared_hits"],
            misses=c["misses"],
            coalesced=c["coalesced"],
            failures=c["failures"],
            not_found=c["not_found"],
            stale_served=c["stale"],
            keys_fetched=c["keys_fetched"],
            keys_per_call=round(c["keys_fetched"] / c["calls"], 3) if c["calls"] else 0.0,
            short_circuited=c["short_circuited"],
            errors={e: c[f"err_{e}"] for e in ERROR_KINDS},
            breaker=worst if has_breaker else None,
            breaker_workers=dict(zip(BREAKER_STATES, states[k], strict=True)) if has_breaker else {},
            breaker_transitions={OPEN: c["breaker_opens"], HALF_OPEN: c["breaker_half_opens"],
                                 CLOSED: c["breaker_closes"]},
            latency_ms={
                "count": nlat,
                "mean": round(c["latency_sum_us"] / nlat / 1000.0, 3) if nlat else 0.0,
                "p50": percentile(buckets, 0.50),
                "p90": percentile(buckets, 0.90),
                "p99": percentile(buckets, 0.99),
            },
            latency_buckets=[x for _, x in buckets],
            policy=policy,
            kept=c["kept"],
            dead_lettered=c["dead_lettered"],
            held=c["held"],
            recovered=c["recovered"],
            log_suppressed=c["log_suppressed"],
        )
    return out
