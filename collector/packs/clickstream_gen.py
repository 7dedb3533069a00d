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

__all__ = ["PAGE_TYPES", "generate_sessions"]

PAGE_TYPES = ("movie", "category", "promotion", "main", "search")
ELEMENTS = ("movie", "trailer", "category", "banner", "actor")
QUALITIES = (360, 480, 720, 1080, 2160)
GENRES = ("drama", "comedy", "thriller", "documentary", "animation")
QUERIES = ("space", "detective", "love", "war", "dragons", "heist", "robots")


def generate_sessions(
    n: int,
    *,
    seed: int = 0,
    tokens: Mapping[str, str] | None = None,
    anonymous: float = 0.3,
    unpaired: float = 0.05,
) -> list[dict[str, Any]]:
    """About ``n`` events (exactly ``n``) from interleaved sessions, as clients send them.

    ``tokens`` maps user ids to their tokens (the demo asks the auth service for them);
    a session is anonymous (``token: null``) with probability ``anonymous``, or when no
    token is known. A page view's end is left out with probability ``unpaired``. Events
    have an ``id`` (so tests can keep a ledger); a client that sends none gets one from
    the ingest route.
    """
    rnd = random.Random(seed)
    known = list(tokens.items()) if tokens else []
    out: list[dict[str, Any]] = []
    open_sessions: list[list[dict[str, Any]]] = []
    while len(out) < n:
        if not open_sessions or (len(open_sessions) < 50 and rnd.random() < 0.3):
            open_sessions.append(_session(rnd, known, anonymous, unpaired))
        s = open_sessions[rnd.randrange(len(open_sessions))]
        out.append(s.pop(0))
        if not s:
            open_sessions.remove(s)
    return out[:n]


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
