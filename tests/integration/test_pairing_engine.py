"""``Pair`` through a real Collector: its records reach the sinks, expiry runs without
traffic (the worker's tick), and with ``store="redis"`` pairing works across collectors,
across a restart, and each unpaired half is reported exactly once.

The stored rows are read back from the SQLite sink; every wait is bounded.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import wait_until
from pair_support import ev, page_view, pipeline, rows

from collector import Collector

pytestmark = pytest.mark.usefixtures("no_leaks")
T0 = 1_700_000_000.0
EMIT = "pair_support:page_view"


def test_pairs_reach_the_sink_in_both_orders_and_across_chunks(tmp_path: Path) -> None:
    db = str(tmp_path / "pv.db")
    with Collector(pipeline(db, emit=EMIT), workers=2) as c:
        res = c.handle([
            ev("start", "u1", "a", T0), ev("end", "u1", "a", T0 + 30),           # in order
            ev("end", "u2", "b", T0 + 12, "category"), ev("start", "u2", "b", T0),  # end first
            ev("start", "u3", "c", T0),                                          # waits
            ev("start", "u4", "d", T0), ev("start", "u5", "e", T0),
        ]).wait(timeout=30)
        assert res.failed_events == 0 and res.handled_events == 7
        c.handle([ev("end", "u3", "c", T0 + 5)]).wait(timeout=30)  # a later chunk
        c.handle([ev("end", "u4", "d", T0 + 7), ev("end", "u5", "e", T0 + 8)]).wait(timeout=30)
        got = {r["user_id"]: r for r in wait_until(lambda: len(rows(db)) == 5 and rows(db), 10, what="5 page views")}
    assert {u: r["data"]["duration_seconds"] for u, r in got.items()} == {
        "u1": 30.0, "u2": 12.0, "u3": 5.0, "u4": 7.0, "u5": 8.0
    }
    assert all(r["data"]["paired"] is True and r["event"] == "page_view" for r in got.values())
    assert got["u2"]["data"]["page_type"] == "movie" and got["u1"]["timestamp"] == T0  # the start's
    assert len(rows(db, None)) == 5 + 10  # the start and end events are stored too


def test_records_go_out_as_pair_records_without_emit(tmp_path: Path) -> None:
    db = str(tmp_path / "pv.db")
    with Collector(pipeline(db), workers=1) as c:
        c.handle([ev("start", "u1", "a", T0), ev("end", "u1", "a", T0 + 3)]).wait(timeout=30)
        c.handle([ev("start", "u1", "a", T0), ev("end", "u1", "a", T0 + 3)]).wait(timeout=30)  # a replay
        (rec,) = wait_until(lambda: rows(db), 10, what="the record")
    assert rec["type"] == "page_view" and rec["key"] == ["u1", "a"] and rec["paired"] is True
    assert rec["duration_seconds"] == 3.0 and rec["fields"] == {"data.page_type": "movie"}


def test_an_unpaired_start_is_emitted_after_its_ttl_without_further_traffic(tmp_path: Path) -> None:
    db = str(tmp_path / "pv.db")
    with Collector(pipeline(db, emit=EMIT, ttl=0.5, tick=0.2), workers=2) as c:
        t = time.monotonic()
        c.handle([ev("start", "u1", "a", T0, "promotion")]).wait(timeout=30)
        (rec,) = wait_until(lambda: rows(db), 10, what="the expired start, emitted by the idle tick")
        assert time.monotonic() - t >= 0.5
    assert rec["data"] == {"page_type": "promotion", "paired": False}  # duration null: omitted
    assert rec["user_id"] == "u1" and rec["timestamp"] == T0


# -- the Redis store




def redis_pipeline(db: str, url: str, prefix: str, **kw: object):  # type: ignore[no-untyped-def]
    return pipeline(db, emit=EMIT, store="redis", redis_url=url, prefix=prefix, tick=0.2, **kw)


def test_redis_start_in_one_collector_end_in_another_pairs_once(tmp_path: Path, redis_url: str, prefix: str) -> None:
    dbs = [str(tmp_path / "a.db"), str(tmp_path / "b.db")]
    with Collector(redis_pipeline(dbs[0], redis_url, prefix), workers=2) as a, \
            Collector(redis_pipeline(dbs[1], redis_url, prefix), workers=2) as b:
        a.handle([ev("start", f"u{i}", f"p{i}", T0) for i in range(20)]).wait(timeout=30)
        b.handle([ev("end", f"u{i}", f"p{i}", T0 + i) for i in range(20)]).wait(timeout=30)
        b.handle([ev("end", "u0", "p0", T0)]).wait(timeout=30)  # a replay: the guard says replayed
        wait_until(lambda: len(rows(dbs[1])) >= 20, 10, what="20 page views in b")
        time.sleep(0.5)  # a duplicate would have come by now
    assert rows(dbs[0]) == []
    got = rows(dbs[1])
    assert sorted(r["data"]["duration_seconds"] for r in got) == [float(i) for i in range(20)]
    assert all(r["data"]["paired"] for r in got)


def test_redis_pairs_across_a_restart(tmp_path: Path, redis_url: str, prefix: str) -> None:
    db = str(tmp_path / "pv.db")
    with Collector(redis_pipeline(db, redis_url, prefix), workers=2) as c:
        c.handle([ev("start", "u1", "a", T0), ev("end", "u2", "b", T0 + 4)]).wait(timeout=30)
    assert rows(db) == []
    with Collector(redis_pipeline(db, redis_url, prefix), workers=1) as c:  # another worker count too
        c.handle([ev("end", "u1", "a", T0 + 9), ev("start", "u2", "b", T0)]).wait(timeout=30)
        got = {r["user_id"]: r for r in wait_until(lambda: len(rows(db)) == 2 and rows(db), 10, what="2 page views")}
    assert got["u1"]["data"]["duration_seconds"] == 9.0 and got["u2"]["data"]["duration_seconds"] == 4.0


def test_redis_expiry_is_exactly_once_across_collectors(tmp_path: Path, redis_url: str, prefix: str) -> None:
    dbs = [str(tmp_path / "a.db"), str(tmp_path / "b.db")]
    n = 300
    with Collector(redis_pipeline(dbs[0], redis_url, prefix, ttl=1.0, orphan_ttl=1.0), workers=2) as a, \
            Collector(redis_pipeline(dbs[1], redis_url, prefix, ttl=1.0, orphan_ttl=1.0), workers=2) as b:
        a.handle([ev("start", f"u{i}", f"p{i}", T0) for i in range(0, n, 2)]).wait(timeout=30)
        b.handle([ev("start", f"u{i}", f"p{i}", T0) for i in range(1, n, 2)]).wait(timeout=30)
        b.handle([ev("end", "x", "orphan", T0)]).wait(timeout=30)
        # four workers sweep the same deadlines every 0.2 s: each half is taken once
        wait_until(lambda: len(rows(dbs[0])) + len(rows(dbs[1])) >= n + 1, 15, what="every unpaired record")
        time.sleep(1.0)  # five more sweeps each: nothing more may come
    got = rows(dbs[0]) + rows(dbs[1])
    assert len(got) == n + 1
    assert Counter(r["user_id"] for r in got) == Counter([f"u{i}" for i in range(n)] + ["x"])
    assert all(r["data"]["paired"] is False and "duration_seconds" not in r["data"] for r in got)
    assert page_view  # the converter the workers import by name
