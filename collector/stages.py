"""Per-worker stages that run between decode and enrichment: dedup and filters.

A stage sees a chunk's valid events and returns the positions it drops, each with a
reason and a kind; the worker removes them before enrichment and sinks and reports
them in the operation's ``errors``. Stages run inline on the worker loop (no Task per
event). Keyed state (the dedup window) lives in the worker that owns the key, so a
stage that remembers ids should use a pipeline sharded by that id or by a key that
determines it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field
from operator import attrgetter
from typing import Any

from .protocol import ErrorRecord

__all__ = ["Dedup", "Filter", "Stage"]


class Stage:
    """Base class: ``build()`` returns the running form, built once in each worker."""

    name = "stage"

    def build(self) -> Callable[[list[Any]], list[ErrorRecord]]:
        """The function the worker calls with each chunk's events."""
        raise NotImplementedError


@dataclass(frozen=True)
class Dedup(Stage):
    """Drop events whose ``field`` was seen within ``ttl`` seconds (per-type TTLs).

    ``ttl_by_type`` maps a value of ``type_field`` to its own TTL (seed 003: a click
    is a duplicate for 5 s, a purchase for a day). At most ``max_entries`` ids are
    remembered; the oldest are forgotten first.
    """

    field: str = "id"
    ttl: float = 300.0
    max_entries: int = 1_000_000
    type_field: str | None = None
    ttl_by_type: dict[str, float] = dc_field(default_factory=dict)
    name: str = "dedup"

    def build(self) -> Callable[[list[Any]], list[ErrorRecord]]:
        """A dedup window for one worker."""
        seen: dict[Any, float] = {}  # id → expiry
        # the ids in the order they were remembered, in groups sharing one expiry (a
        # whole chunk in the common case): forgetting the oldest pops from the left in
        # O(1), where iterating a dict from its start would first walk over every slot
        # that earlier deletions left empty (a worker holding 1M ids slowed 20x)
        order: collections.deque[tuple[float, list[Any]]] = collections.deque()
        fld, ttl, cap = self.field, self.ttl, self.max_entries
        tfield, by_type = self.type_field, dict(self.ttl_by_type or {})
        get = attrgetter(fld)

        def forget(group: tuple[float, list[Any]]) -> None:
            exp, ks = group
            for k in ks:
                if seen.get(k) == exp:  # not re-remembered since (with a later expiry)
                    del seen[k]

        def dedup(events: list[Any]) -> list[ErrorRecord]:
            now = time.monotonic()
            # expired groups first (per-type TTLs make the order approximate: a group
            # waits behind an older one that lives longer, and is still checked on read)
            while order and order[0][0] <= now:
                forget(order.popleft())
            keys = list(map(get, events))
            if not tfield and seen.keys().isdisjoint(keys) and len(set(keys)) == len(keys):
                # the common case, all new and distinct: remembered in C calls
                exp = now + ttl
                seen.update(dict.fromkeys(keys, exp))
                order.append((exp, keys))
                dropped: list[ErrorRecord] = []
            else:
                dropped = []
                sget = seen.get
                for i, k in enumerate(keys):
                    until = sget(k)
                    if until is not None and until > now:
                        dropped.append(ErrorRecord(i, f"$.{fld}", f"duplicate {fld} {k!r}", "duplicate"))
                        continue
                    exp = now + (by_type.get(getattr(events[i], tfield), ttl) if tfield else ttl)
                    seen[k] = exp
                    order.append((exp, [k]))
            while len(seen) > cap and order:
                forget(order.popleft())
            return dropped

        return dedup


@dataclass(frozen=True)
class Filter(Stage):
    """Keep events for which ``predicate(event)`` is true; drop the rest as ``filtered``.

    ``predicate`` is a picklable callable or a ``"module:function"`` import string.
    """

    predicate: Any = None
    reason: str = "filtered out"
    name: str = "filter"
    options: dict[str, Any] = dc_field(default_factory=dict)

    def build(self) -> Callable[[list[Any]], list[ErrorRecord]]:
        """The filter function for one worker."""
        from .pipeline import import_string

        pred = self.predicate
        if isinstance(pred, str):
            pred = import_string(pred, "filter predicate")
        reason = self.reason

        def run(events: list[Any]) -> list[ErrorRecord]:
            return [ErrorRecord(i, "$", reason, "filtered") for i, e in enumerate(events) if not pred(e)]

        return run
