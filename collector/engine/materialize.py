"""Partial state of stateful stages, kept per worker and merged on read.

::

    worker i ── Snapshot(stage, partial, taken_at) every snapshot interval ──► Partials
    worker i dies ──► its last partials are retired (kept, merged forever after)
    collector.aggregate(name) ──► stage.merge(retired + live partials) ──► plain values
    collector.integrity() ──────► the same, for the stages with an ``integrity`` kind
    collector.pairs() ──────────► the same, for ``Pair`` stages (their counters)
    collector.aggregate_series() ► each aggregate's current window, bounded, for Prometheus

Reading never sends a message to a worker and never waits for one: a read is at most
one snapshot interval behind the workers (``staleness()`` says how far). A worker that
dies loses from the aggregates only what it counted after its last snapshot and had
already acknowledged (its unacknowledged chunks are redelivered and counted again by
its replacement): at most one snapshot interval of its events.
"""

from __future__ import annotations

import time
from typing import Any

from ..pipeline import Pipeline
from ..protocol import Snapshot
from ..stages.aggregates import Aggregate
from ..stages.exposition import AggregateSeries, aggregate_series

__all__ = ["Materialized", "Partials", "is_stateful"]


def is_stateful(st: Any) -> bool:
    """Whether a stage description merges partials: it has ``merge``, and its
    ``stateful`` (when it has one: ``Dedup`` only with ``count_by``) is true."""
    return hasattr(st, "merge") and bool(getattr(st, "stateful", True))


class Partials:
    """The latest :class:`Snapshot` of each stage from each worker slot, and retired ones."""

    def __init__(self, nworkers: int, retirers: dict[str, Any] | None = None) -> None:
        self.nworkers = nworkers
        self.live: dict[str, list[Snapshot | None]] = {}
        self.retired: dict[str, list[bytes]] = {}
        # stage → its description's ``retired(partial) -> partial``: its gauges (events
        # held, halves pending, sessions tracked) to 0, they died with the worker
        self.retirers: dict[str, Any] = retirers or {}

    def put(self, i: int, snap: Snapshot) -> None:
        """Worker ``i`` published a partial (a newer one replaces the older)."""
        slots = self.live.get(snap.stage)
        if slots is None:
            slots = self.live[snap.stage] = [None] * self.nworkers
        slots[i] = snap

    def retire(self, i: int) -> None:
        """Worker ``i`` died: its last partials stay counted; its replacement starts empty."""
        for stage, slots in self.live.items():
            snap = slots[i]
            if snap is not None:
                fn = self.retirers.get(stage)  # a gauge (events held) died with the worker
                self.retired.setdefault(stage, []).append(fn(snap.data) if fn is not None else snap.data)
                slots[i] = None

    def of(self, stage: str) -> list[bytes]:
        """Every partial of ``stage`` to merge: retired ones, then each live worker's."""
        live = [s.data for s in self.live.get(stage, ()) if s is not None]
        return [*self.retired.get(stage, ()), *live]

    def staleness(self, stage: str) -> float:
        """Seconds since the oldest live partial of ``stage`` was taken (0 with none)."""
        taken = [s.taken_at for s in self.live.get(stage, ()) if s is not None]
        return max(0.0, time.time() - min(taken)) if taken else 0.0

    def stages(self) -> list[str]:
        """Names of the stages that published partials."""
        return sorted(set(self.live) | set(self.retired))


class Materialized:
    """The read side: merge a stage's partials (cached until one changes), render views.

    A stateful stage description in ``Pipeline.stages`` has ``name``, ``merge(partials)``
    and ``read(result, key, **window)``; a view in ``Pipeline.views`` has ``name``,
    ``aggregates()`` and ``render(results)``.
    """

    def __init__(self, pipeline: Pipeline, nworkers: int) -> None:
        self.pipeline = pipeline
        self.partials = Partials(nworkers, {st.name: st.retired for st in pipeline.stages
                                            if is_stateful(st) and callable(getattr(st, "retired", None))})
        self._cache: dict[str, tuple[list[bytes], Any]] = {}

    def stage(self, name: str) -> Any:
        """The stateful stage called ``name`` (KeyError listing the known ones)."""
        for st in self.pipeline.stages:
            if getattr(st, "name", None) == name and is_stateful(st):
                return st
        known = [st.name for st in self.pipeline.stages if is_stateful(st)]
        raise KeyError(f"no aggregate {name!r} in pipeline {self.pipeline.name!r} (known: {known})")

    def merged(self, name: str) -> Any:
        """``name``'s partials merged; reused while no worker published a newer one."""
        st = self.stage(name)
        parts = self.partials.of(name)
        cached = self._cache.get(name)
        # partials are immutable bytes replaced on each publish: the same objects merge the same
        if cached is not None and len(cached[0]) == len(parts) and all(a is b for a, b in zip(cached[0], parts, strict=True)):
            return cached[1]
        result = st.merge(parts)
        self._cache[name] = (parts, result)
        return result

    def aggregate(self, name: str, key: Any = None, **window: Any) -> Any:
        """Plain values of one aggregate."""
        return self.stage(name).read(self.merged(name), key, **window)

    def aggregates(self) -> dict[str, Any]:
        """Plain values of every aggregate, by name."""
        return {st.name: self.aggregate(st.name) for st in self.pipeline.stages if is_stateful(st)}

    def integrity(self) -> dict[str, dict[str, Any]]:
        """The data-integrity stages' plain values: ``{kind: {stage name: value}}``.

        A stage says what it checks with its ``integrity`` attribute: ``"duplicates"``
        (``Dedup`` with ``count_by``: ``{value: count}``) or ``"sequence"`` (``Gaps``:
        its counters). Empty when the pipeline has none.
        """
        out: dict[str, dict[str, Any]] = {}
        for st in self.pipeline.stages:
            kind = getattr(st, "integrity", None)
            if kind and is_stateful(st):
                out.setdefault(kind, {})[st.name] = self.aggregate(st.name)
        return out

    def pairs(self) -> dict[str, dict[str, int]]:
        """Each ``Pair`` stage's counters, merged over the workers (empty: none)."""
        return {st.name: self.aggregate(st.name) for st in self.pipeline.stages
                if getattr(st, "pairing", False) and is_stateful(st)}

    def series(self, now: float | None = None) -> list[AggregateSeries]:
        """What the Prometheus text shows of each ``Aggregate`` stage
        (:func:`~collector.stages.exposition.aggregate_series`; left out: ``prometheus=False``)."""
        t = time.time() if now is None else now
        out = []
        for st in self.pipeline.stages:
            if isinstance(st, Aggregate) and st.prometheus:  # prometheus=False: not even merged
                s = aggregate_series(st, self.merged(st.name), t)
                if s is not None:
                    out.append(s)
        return out

    def view(self, name: str) -> dict[str, Any]:
        """A view rendered from the merged aggregates it reads."""
        for v in self.pipeline.views:
            if v.name == name:
                return dict(v.render({a: self.merged(a) for a in v.aggregates()}))
        raise KeyError(f"no view {name!r} in pipeline {self.pipeline.name!r} (known: {[v.name for v in self.pipeline.views]})")
