"""Realistic clickstream sessions for the demo, the benchmarks and the tests (seed 002).

A session is one visitor's visit: page views (a start, some activity, an end; a few
ends never come), clicks on movies and trailers, quality changes while watching,
completed videos and searches with filters. Each event carries ``session_id`` and a
``seq`` counting from 1, so gaps and repeats can be checked downstream.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = ["PAGE_TYPES", "SessionStream", "generate_sessions"]

PAGE_TYPES = ("movie", "category", "promotion", "main", "search")
ELEMENTS = ("movie", "trailer", "category", "banner", "actor")
QUALITIES = (360, 480, 720, 1080, 2160)
GENRES = ("drama", "comedy", "thriller", "documentary", "animation")
QUERIES = ("space", "detective", "love", "war", "dragons", "heist", "robots")


class SessionStream:
    """An endless stream of interleaved sessions: ``take(n)`` gives the next ``n`` events.

    Sessions go on across calls (a page view started in one batch ends in a later one),
    as they do when a client's events arrive over time. At most ``open_sessions`` are
    open at once."""

    def __init__(self, *, seed: int = 0, tokens: Mapping[str, str] | None = None, anonymous: float = 0.3,
                 unpaired: float = 0.05, open_sessions: int = 50) -> None:
        self.rnd = random.Random(seed)
        self.known = list(tokens.items()) if tokens else []
        self.anonymous, self.unpaired, self.max_open = anonymous, unpaired, open_sessions
        self.open: list[list[dict[str, Any]]] = []

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` events."""
        rnd = self.rnd
        out: list[dict[str, Any]] = []
        while len(out) < n:
            if not self.open or (len(self.open) < self.max_open and rnd.random() < 0.3):
                self.open.append(_session(rnd, self.known, self.anonymous, self.unpaired))
            s = self.open[rnd.randrange(len(self.open))]
            out.append(s.pop(0))
            if not s:
                self.open.remove(s)
        return out


def generate_sessions(
    n: int,
    *,
    seed: int = 0,
    tokens: Mapping[str, str] | None = None,
    anonymous: float = 0.3,
    unpaired: float = 0.05,
) -> list[dict[str, Any]]:
    """The first ``n`` events of a :class:`SessionStream`: interleaved sessions as clients
    send them (sessions still open at the cut have sent only their first events).

    ``tokens`` maps user ids to their tokens (the demo asks the auth service for them);
    a session is anonymous (``token: null``) with probability ``anonymous``, or when no
    token is known. A page view's end is left out with probability ``unpaired``. Events
    have an ``id`` (so tests can keep a ledger); a client that sends none gets one from
    the ingest route.
    """
    return SessionStream(seed=seed, tokens=tokens, anonymous=anonymous, unpaired=unpaired).take(n)


def _uuid(rnd: random.Random) -> str:
    return str(uuid.UUID(int=rnd.getrandbits(128), version=4))


def _session(
    rnd: random.Random, known: list[tuple[str, str]], anonymous: float, unpaired: float
) -> list[dict[str, Any]]:
    token = None
    if known and rnd.random() >= anonymous:
        token = known[rnd.randrange(len(known))][1]
    sid = _uuid(rnd)
    events: list[dict[str, Any]] = []

    def add(event: str, data: dict[str, Any]) -> None:
        events.append({"id": _uuid(rnd), "event": event, "token": token, "session_id": sid,
                       "seq": len(events) + 1, "data": data})

    for _ in range(rnd.randint(1, 4)):  # page views of this visit
        page = rnd.choice(PAGE_TYPES)
        pv = _uuid(rnd)
        add("page_view_start", {"page_view_id": pv, "page_type": page})
        for _ in range(rnd.randint(0, 5)):
            r = rnd.random()
            if r < 0.45:
                add("element_click", {"element_type": rnd.choice(ELEMENTS), "page_type": page})
            elif r < 0.65:
                old, new = rnd.sample(QUALITIES, 2)
                add("quality_change", {"video_id": f"v{rnd.randint(1, 500)}", "old_quality": old, "new_quality": new})
            elif r < 0.8:
                add("video_complete", {"video_id": f"v{rnd.randint(1, 500)}", "duration_total": rnd.random() < 0.8})
            else:
                filters = f"genre={rnd.choice(GENRES)};rating>={rnd.randint(5, 9)}"
                add("search_filter", {"search_query": rnd.choice(QUERIES), "filters": filters})
        if rnd.random() >= unpaired:
            add("page_view_end", {"page_view_id": pv, "page_type": page})
    return events
