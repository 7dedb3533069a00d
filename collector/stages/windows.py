"""Window definitions for stateful stages, and the time each event is counted at.

Every window kind is cut into *panes* of one width, and a worker keeps state per pane
only; windows are put together from panes when a merged result is read ("no pane, no
gain"). So a worker's partial is small and the same for every kind::

    Global()              one pane for ever                        width 0
    Tumbling(60)          [0,60) [60,120) ...                      pane = window
    Hopping(60, hop=10)   [0,60) [10,70) [20,80) ...               pane = gcd(60, 10) = 10
    Sliding(60, step=1)   the last 60 s, as of the read            pane = step = 1

Time is the event's own (``time_field``: epoch seconds, or an ISO 8601 string, naive
meaning UTC) or, with no ``time_field``, processing time: the stage's clock, read
once per chunk. The watermark is the latest time seen. A pane stops taking events
``lateness`` seconds after the last window holding it has ended (later events are
counted as ``late`` and skipped), and is forgotten ``retention`` seconds after that.
The watermark moves once per chunk, so events of one chunk are never late to each
other. A sliding window keeps no closed panes: its reads never look further back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..errors import ConfigError

__all__ = [
    "Global",
    "Hopping",
    "Sliding",
    "Tumbling",
    "Window",
    "WindowShape",
    "parse_time",
    "times_of",
    "window_from_config",
]


@dataclass(frozen=True, kw_only=True)
class Window:
    """What all window kinds share: the time field, allowed lateness and retention.

    ``time_field=None`` means processing time. ``retention`` is how long a closed pane
    is kept for reads (seconds of the same time); ``lateness`` how long after its end a
    window still takes events.
    """

    time_field: str | None = None
    lateness: float = 0.0
    retention: float = 3600.0

    def shape(self) -> WindowShape:
        """The pane layout of this window (what partials carry)."""
        raise NotImplementedError

    def __post_init__(self) -> None:
        if self.lateness < 0 or self.retention < 0:
            raise ConfigError(f"{self!r}: lateness and retention must be >= 0")


@dataclass(frozen=True, kw_only=True)
class Global(Window):
    """Since start: one window that never closes."""

    def shape(self) -> WindowShape:
        """One pane of width 0."""
        return WindowShape("global", 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Tumbling(Window):
    """Back-to-back windows of ``size`` seconds, aligned to the epoch."""

    size: float = 60.0

    def shape(self) -> WindowShape:
        """Panes of the window's own size."""
        _positive(self, size=self.size)
        return WindowShape("tumbling", self.size, self.size, self.size)


@dataclass(frozen=True)
class Hopping(Window):
    """Windows of ``size`` seconds starting every ``hop`` seconds (they overlap)."""

    size: float = 60.0
    hop: float = 10.0

    def shape(self) -> WindowShape:
        """Panes of gcd(size, hop), on a millisecond grid."""
        _positive(self, size=self.size, hop=self.hop)
        width = math.gcd(round(self.size * 1000), round(self.hop * 1000)) / 1000
        return WindowShape("hopping", width, self.size, self.hop)


@dataclass(frozen=True)
class Sliding(Window):
    """The last ``size`` seconds as of the read, in panes of ``step`` seconds."""

    size: float = 60.0
    step: float = 1.0

    def shape(self) -> WindowShape:
        """Panes of ``step``."""
        _positive(self, size=self.size, step=self.step)
        return WindowShape("sliding", self.step, self.size, self.step)


def window_from_config(cfg: Any) -> Window:
    """The window a ``collector.stages.config`` window table describes (tagged on ``kind``)."""
    kind = type(cfg).__struct_config__.tag
    cls = {"global": Global, "tumbling": Tumbling, "hopping": Hopping, "sliding": Sliding}[kind]
    return cls(**{f: getattr(cfg, f) for f in cfg.__struct_fields__})


def _positive(w: Window, **values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ConfigError(f"{type(w).__name__}: {name} must be > 0 (got {v!r})")


@dataclass(frozen=True)
class WindowShape:
    """Pane ``width`` (0: one global pane), window ``size`` and ``hop`` (= size when tumbling)."""

    kind: str
    width: float
    size: float
    hop: float

    def pane(self, t: float) -> int:
        """The index of the pane holding time ``t``."""
        return int(t // self.width) if self.width else 0

    def closes(self, pane: int) -> float:
        """When the last window holding ``pane`` ends (``inf`` for the global pane)."""
        if not self.width:
            return math.inf
        start = pane * self.width
        if self.kind == "sliding":
            return start + self.width + self.size
        return (start // self.hop) * self.hop + self.size

    def windows(
        self, panes: Sequence[int], start: float | None = None, end: float | None = None, now: float = 0.0
    ) -> list[tuple[float, float, list[int]]]:
        """``(start, end, panes)`` of each window made of the given ``panes``.

        Tumbling and hopping: every window that holds one of ``panes`` and lies within
        ``[start, end]``. Sliding: the one window of ``size`` ending at ``end`` (or
        ``now``). Global: one window, ``(-inf, inf)``.
        """
        if not self.width:
            return [(-math.inf, math.inf, list(panes))]
        w = self.width
        if self.kind == "sliding":
            until = now if end is None else end
            lo = until - self.size
            return [(lo, until, [p for p in panes if p * w >= lo - 1e-9 and p * w < until])]
        per = round(self.size / w)
        starts: set[int] = set()  # window starts in units of hop
        hop = self.hop
        for p in panes:  # windows [s*hop, s*hop + size) that hold [p*w, p*w + w)
            first = math.ceil((p * w + w - self.size) / hop - 1e-9)
            last = math.floor(p * w / hop + 1e-9)
            starts.update(range(first, last + 1))
        have = set(panes)
        out = []
        for s in sorted(starts):
            ws = s * hop
            we = ws + self.size
            if (start is not None and ws < start) or (end is not None and we > end):
                continue
            first_pane = round(ws / w)
            out.append((ws, we, [q for q in range(first_pane, first_pane + per) if q in have]))
        return out


# ------------------------------------------------------------------------------ time
_ISO_CACHE: dict[str, float] = {}


def parse_time(v: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO 8601 string; ``None`` if neither.

    Strings are parsed once each (a bounded cache: events of one second share one).
    """
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        t = _ISO_CACHE.get(v)
        if t is None:
            try:
                dt = datetime.fromisoformat(v)
            except ValueError:
                return None
            t = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
            if len(_ISO_CACHE) >= 65536:
                _ISO_CACHE.clear()
            _ISO_CACHE[v] = t
        return t
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).timestamp()
    return None


def times_of(events: Sequence[Any], get: Callable[[Any], Any]) -> list[float | None]:
    """The event time of each event (``None`` where missing or unreadable)."""
    raw = list(map(get, events))
    if all(type(x) is float or type(x) is int for x in raw):
        return [float(x) for x in raw]
    return list(map(parse_time, raw))
