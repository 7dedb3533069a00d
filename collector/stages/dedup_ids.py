"""Where a dedup window keeps the ids its sinks committed: one interface, two stores.

``IdWindow`` (idwindow.c, built at install) keeps them as 128-bit fingerprints in a C
table; :class:`DictIds` keeps them in a dict, for per-type TTLs and keys (whose
expiries are not remembered in order) and when the C extension is not built. Both:
``get(id)`` (its expiry or None), ``isdisjoint(ids)``, ``remember(ids, expiry)``,
``expire(now)``, ``trim(cap)``, ``len()``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from itertools import repeat
from typing import Any

try:  # optional: without it every window is a DictIds
    from .idwindow import IdWindow
except ImportError:  # pragma: no cover - a build without a C compiler
    IdWindow = None  # type: ignore[misc,assignment]

__all__ = ["DictIds", "IdWindow", "id_store"]


class DictIds:
    """The remembered ids in a dict, id → expiry, forgotten oldest group first.

    ``ordered``: expiries are remembered in non-decreasing order (one TTL). With
    per-type TTLs a group may wait behind an older one that lives longer; it is still
    checked on read (``get`` gives its expiry).
    """

    def __init__(self, ordered: bool = True) -> None:
        self.seen: dict[Any, float] = {}
        # the ids in the order they were remembered, in groups sharing one expiry (a
        # whole chunk in the common case): forgetting the oldest pops from the left in
        # O(1), where iterating a dict from its start would first walk over every slot
        # that earlier deletions left empty (a worker holding 1M ids slowed 20x)
        # Groups are tuples, not lists: the cyclic GC untracks a tuple of strings the first
        # time it sees it, where a list stays tracked, and 1M remembered ids in lists made
        # every full collection of the worker walk them all (20 ms pauses under HTTP
        # load, the daemon's p99; bench/dedup_window.py)
        self.order: collections.deque[tuple[float, tuple[Any, ...]]] = collections.deque()
        # True while every remembered id is in exactly one group of ``order``, so that
        # forgetting a group may drop its ids without looking at their expiry. An id
        # remembered again (after it expired, or with per-type TTLs) clears it for good
        self.unique = ordered
        self.get = self.seen.get
        self.isdisjoint = self.seen.keys().isdisjoint

    def __len__(self) -> int:
        return len(self.seen)

    def remember(self, ids: Iterable[Any], expiry: float) -> None:
        """Remember ``ids`` until ``expiry`` (an id remembered already takes the new one)."""
        seen = self.seen
        group = tuple(ids)
        before = len(seen)
        seen.update(dict.fromkeys(group, expiry))
        if len(seen) - before != len(group):  # some were here already: now in two groups
            self.unique = False
        self.order.append((expiry, group))

    def expire(self, now: float) -> None:
        """Forget the groups whose expiry is not after ``now``, oldest first."""
        order = self.order
        while order and order[0][0] <= now:
            self._forget(order.popleft())

    def trim(self, cap: int) -> None:
        """Forget the oldest groups until at most ``cap`` ids remain."""
        order = self.order
        while len(self.seen) > cap and order:
            self._forget(order.popleft())

    def _forget(self, group: tuple[float, tuple[Any, ...]]) -> None:
        exp, ks = group
        seen = self.seen
        if self.unique:
            # no id is in two groups: drop the group's ids in one C-level pass (the
            # per-id check below cost ~25 % of the window once it is full)
            collections.deque(map(seen.pop, ks, repeat(None)), maxlen=0)
            return
        for k in ks:
            if seen.get(k) == exp:  # not re-remembered since (with a later expiry)
                del seen[k]


def id_store(cap: int, *, ordered: bool, plain: bool) -> IdWindow | DictIds:
    """The store for a window of at most ``cap`` ids: the C table when it is built, the
    window has one TTL (``ordered``) and its ids are field values (``plain``, not
    ``(type, value)`` pairs), else a dict. At its 1M cap the dict of str was a quarter
    of a worker's time under HTTP load."""
    if IdWindow is not None and ordered and plain:
        return IdWindow(cap)
    return DictIds(ordered=ordered)
