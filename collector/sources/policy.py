"""Failure policies of enrichment steps: keep, dead-letter or hold an event whose lookup failed.

::

    fill (cached not-found / failed keys) ┐
    resolve (answers of this chunk's calls) ┴─► gone: key → Gone(outcome, reason, events)
        ─► the step's policy for the outcome (on_missing / on_error, else on_failure)
             keep        ─► the field keeps its default; counted (kept); with ``log``, one
                            line per event (step, source, key, reason), rate-limited
             dead_letter ─► (event, stage, path, reason) for the runner: dropped from the
                            chunk, written to the dead-letter sink, answered ``deadlettered``
             hold        ─► the chunk waits: the keys are asked again (past the local cache,
                            joining calls under way) after backoff waits, until ``hold_for``
                            seconds or ``hold_retries`` tries; answered ─► filled (recovered),
                            not found where that is not held ─► its own policy, else ─► ``then``

A hold keeps the events in their chunk, and the chunk is acknowledged only after they are
resolved and committed: a worker that dies mid-hold has its chunk redelivered like any
other (at-least-once, nothing held outside the ledger). Only the chunk waits, at most
``hold_for`` seconds; the worker runs other chunks meanwhile (one task per chunk), so a
hold costs one window place per held chunk, never the pipeline. No task per event: one
hold per step per chunk, and a re-ask is one batched call per group of keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..pipeline import Lookup
from ..protocol import LookupSummary
from ..retry import Backoff
from ..sinks.sinkset import GAVE_UP, REFUSED
from .cache import ERROR, FOUND, NOT_FOUND
from .fetch import STALE

__all__ = ["HOLD_BACKOFF_CAP", "Dead", "Gone", "LogLimiter", "Refetcher", "StepPolicy", "answers_within"]

log = logging.getLogger("collector.sources")

HOLD_BACKOFF_CAP = 2.0  # longest wait between two re-asks of a hold, seconds
Dead = tuple[Any, str, str, str]  # (event, stage, field path, reason) for the dead-letter sink


class Gone:
    """The events of one key whose lookup failed in one chunk.

    ``counted`` names the LookupSummary figure the events were counted in
    (``failures``, ``not_found``, or "" for a cached not-found answer, which the fill
    pass does not count), so a hold that recovers them takes them out again.
    """

    __slots__ = ("counted", "events", "outcome", "reason")

    def __init__(self, outcome: int, reason: str, events: list[Any], counted: str) -> None:
        self.outcome = outcome
        self.reason = reason
        self.events = events
        self.counted = counted


class Refetcher(Protocol):
    """What a hold needs of a lookup runtime: ask the source again for some keys."""

    async def refetch(self, keys: list[Any], timeout: float, summ: LookupSummary) -> dict[Any, tuple[int, Any]]:
        """key → (outcome, value or reason), within ``timeout`` seconds."""


async def answers_within(
    futs: dict[Any, asyncio.Future[Any]], timeout: float, read: Callable[[Any, asyncio.Future[Any]], tuple[int, Any]]
) -> dict[Any, tuple[int, Any]]:
    """A hold's re-asks: wait at most ``timeout`` for the futures of the keys (a call still
    running goes on and fills the cache); key → ``read(key, future)`` for the answered,
    ``(ERROR, "no answer within hold_for")`` for the rest."""
    done, _ = await asyncio.wait(set(futs.values()), timeout=timeout)
    return {k: read(k, f) if f in done else (ERROR, "no answer within hold_for") for k, f in futs.items()}


class LogLimiter:
    """A token bucket: at most ``rate`` lines a second, bursts of up to ``rate``.

    Refilled once per chunk (:meth:`refill`), not per line; what it refuses is counted in
    ``suppressed`` until the next line that goes out says how many were left out.
    """

    __slots__ = ("at", "clock", "rate", "suppressed", "tokens")

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.tokens = max(rate, 1.0)
        self.clock = clock
        self.at = clock()
        self.suppressed = 0

    def refill(self) -> None:
        """Add the tokens earned since the last refill."""
        now = self.clock()
        self.tokens = min(max(self.rate, 1.0), self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self) -> bool:
        """Whether one more line may go out now (else it is counted as suppressed)."""
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.suppressed += 1
        return False


class StepPolicy:
    """One enrichment step's failure policy inside one worker (see the module docstring).

    ``source`` is what log lines and reasons call the source: its ``name`` and kind, or
    its description (addresses with credentials redacted, never a DSN's password).
    """

    def __init__(self, spec: Lookup, source: str) -> None:
        self.spec = spec
        self.source = source
        self.actions = {NOT_FOUND: spec.policy_for("not_found"), ERROR: spec.policy_for("error")}
        self.backoff = Backoff(spec.hold_backoff, cap=max(spec.hold_backoff, HOLD_BACKOFF_CAP),
                               retries=spec.hold_retries, jitter="equal")
        self.limiter = LogLimiter(spec.log_rate) if spec.log else None
        self.event_id: Callable[[Any], Any] | None = None  # set by the Enricher from Pipeline.id_field
        self.stage = f"enrich:{spec.name}"
        self.path = f"$.{spec.key}"

    def describe(self, k: Any, g: Gone) -> str:
        """What went wrong for key ``k``, in words."""
        if g.outcome == NOT_FOUND:
            return f"key {k!r} not found in source {self.source}"
        # the reason was redacted where it was made (fetch.error_reason)
        return f"source {self.source} failed for key {k!r}: {g.reason}"

    def triage(self, gone: dict[Any, Gone], summ: LookupSummary, dead: list[Dead]) -> dict[Any, Gone] | None:
        """Keep or dead-letter the failed keys now; the ones to hold (None: none)."""
        held: dict[Any, Gone] | None = None
        if self.limiter is not None:
            self.limiter.refill()
        actions = self.actions
        for k, g in gone.items():
            act = actions[g.outcome]
            if act == "hold":
                if held is None:
                    held = {}
                held[k] = g
            else:
                self.settle(act, k, g, summ, dead)
        return held

    def settle(self, action: str, k: Any, g: Gone, summ: LookupSummary, dead: list[Dead]) -> None:
        """``keep`` or ``dead_letter`` the events of ``g``."""
        n = len(g.events)
        if action == "dead_letter":
            summ.dead_lettered += n
            # REFUSED: the same event would fail again (the key is not there); GAVE_UP: the
            # source failed, sent again later it may be enriched (the sinks' reason style)
            why = f"enrich {self.spec.name}: {REFUSED if g.outcome == NOT_FOUND else GAVE_UP}: {self.describe(k, g)}"
            stage, path = self.stage, self.path
            dead.extend((e, stage, path, why) for e in g.events)
            return
        summ.kept += n
        if self.limiter is not None:
            self.log_kept(k, g, summ)

    def log_kept(self, k: Any, g: Gone, summ: LookupSummary) -> None:
        """One structured line per event kept at its default, within the rate limit."""
        lim = self.limiter
        assert lim is not None
        spec = self.spec
        what = self.describe(k, g)
        level = logging.INFO if g.outcome == NOT_FOUND else logging.WARNING
        reason = "not_found" if g.outcome == NOT_FOUND else g.reason
        ident = self.event_id
        for e in g.events:
            if not lim.take():
                summ.log_suppressed += 1
                continue
            fields: dict[str, Any] = {"step": spec.name, "source": self.source, "key": k, "reason": reason,
                                      "policy": "keep"}
            eid = ident(e) if ident is not None else None
            if eid is not None:
                fields["event_id"] = eid
            more = ""
            if lim.suppressed:
                fields["suppressed"] = lim.suppressed
                more = f" ({lim.suppressed} similar lines suppressed before this one)"
                lim.suppressed = 0
            log.log(level, "lookup %s: %s; field %s keeps its default (event %s)%s",
                    spec.name, what, spec.target, eid, more, extra={"fields": fields})

    async def hold(self, rt: Refetcher, held: dict[Any, Gone], summ: LookupSummary, dead: list[Dead],
                   skip: set[int]) -> None:
        """Ask again for the held keys until answered, ``hold_for`` or ``hold_retries``; then ``then``.

        ``skip``: ids of events another step already dead-lettered (not held for this one).
        """
        if skip:
            for k in list(held):
                g = held[k]
                g.events = [e for e in g.events if id(e) not in skip]
                if not g.events:
                    del held[k]
        spec = self.spec
        summ.held += sum(len(g.events) for g in held.values())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.hold_for
        target, actions = spec.target, self.actions
        for attempt in range(spec.hold_retries):
            if not held:
                break
            await asyncio.sleep(min(self.backoff.delay(attempt), max(0.0, deadline - loop.time())))
            left = deadline - loop.time()
            if left <= 0:
                break
            answers = await rt.refetch(list(held), left, summ)
            for k, (outcome, v) in answers.items():
                g = held[k]
                n = len(g.events)
                if outcome in (FOUND, STALE):
                    for e in g.events:
                        setattr(e, target, v)
                    summ.recovered += n
                    if g.counted:
                        setattr(summ, g.counted, getattr(summ, g.counted) - n)
                    del held[k]
                    continue
                g.reason = v if isinstance(v, str) else g.reason
                if outcome != g.outcome:  # an error became a not-found (or back): its own policy
                    g.outcome = outcome
                    act = actions[outcome]
                    if act != "hold":
                        self.settle(act, k, g, summ, dead)
                        del held[k]
        if held:
            if self.limiter is not None:
                self.limiter.refill()
            for k, g in held.items():
                self.settle(spec.then, k, g, summ, dead)
