"""Data-integrity counts through a real Collector (seed 002, requirement 6): duplicates
per type from ``Dedup(count_by=...)`` and sequence gaps from ``Gaps``, counted in two
workers sharded by session and merged on read (``collector.aggregate``/``integrity``).
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import wait_until
from integrity_pack import ClientEvent, pipeline

from collector import Collector

pytestmark = pytest.mark.usefixtures("no_leaks")

SESSIONS = [f"s{i}" for i in range(20)]


def ev(session: str, seq: int, id_: str | None = None) -> ClientEvent:
    """Odd numbers are starts, even ones ends."""
    kind = "page_view_start" if seq % 2 else "page_view_end"
    return ClientEvent(id_ or f"{session}-{seq}", kind, session, seq)


def send(c: Collector, events: list[ClientEvent]) -> Any:
    res = c.handle(events).wait(timeout=60)
    assert res.failed_events == 0
    return res


def test_gaps_late_repeats_and_duplicates_per_type_merged_over_two_workers() -> None:
    with Collector(pipeline(), workers=2) as c:
        n = len(SESSIONS)
        assert c.aggregate("gaps")["gaps"] == 0 and c.aggregate("dedup") == {}  # nothing published yet
        send(c, [ev(s, q) for s in SESSIONS for q in (1, 2, 4, 5)])  # 3 missing in every session
        assert all(w.events > 0 for w in c.stats().workers)  # the sessions are spread over both workers
        g = wait_until(lambda: (a := c.aggregate("gaps"))["sessions"] == n and a, 10, what="both workers' partials")
        assert (g["gaps"], g["skipped"], g["late"], g["repeated"]) == (n, n, 0, 0)
        # the gap was revealed by seq 4, an end
        assert g["by"]["page_view_end"]["gaps"] == n and c.aggregate("gaps", "page_view_start")["gaps"] == 0

        send(c, [ev(s, 3) for s in SESSIONS])  # the missing numbers arrive late
        g = wait_until(lambda: (a := c.aggregate("gaps"))["late"] == n and a, 10, what="the late numbers")
        assert (g["gaps"], g["skipped"], g["repeated"]) == (0, n, 0)
        assert g["by"]["page_view_start"]["late"] == n and g["by"]["page_view_end"]["gaps"] == 0

        send(c, [ev(s, 5, f"{s}-5-again") for s in SESSIONS])  # a new id, an old number: a client repeat
        g = wait_until(lambda: (a := c.aggregate("gaps"))["repeated"] == n and a, 10, what="the repeats")
        assert g["by"]["page_view_start"]["repeated"] == n

        # the same ids again: dropped by Dedup (counted per type there), never seen by Gaps
        res = send(c, [ev("s0", 1), ev("s1", 1), ev("s2", 1), ev("s3", 2), ev("s4", 2)])
        assert [e.kind for e in res.errors] == ["duplicate"] * 5
        d = wait_until(lambda: (a := c.aggregate("dedup")) and sum(a.values()) == 5 and a, 10, what="the duplicate counts")
        assert d == {"page_view_start": 3, "page_view_end": 2}
        assert c.aggregate("dedup", "page_view_end") == 2
        assert c.stats().duplicates_dropped == 5
        figures = c.integrity()
        assert figures["duplicates"] == {"dedup": d}
        assert figures["sequence"]["gaps"]["repeated"] == n  # Dedup kept the copies from Gaps
        assert set(c.aggregates()) == {"dedup", "gaps"}
