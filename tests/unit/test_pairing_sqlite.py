"""``Pair(store="sqlite")``: waiting halves in a SQLite file shared by runtimes (workers)
and kept across restarts (a new runtime on the same file); clocks patched."""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_pairing import T0, Clock, ev

from collector.errors import ConfigError
from collector.stages import build_stage
from collector.stages.pairing import Pair
from collector.stages.pairing_sqlite import SqlitePairRuntime


def spair(clock: Clock, path: Path, **kw: Any) -> SqlitePairRuntime:
    spec = Pair(key=("user_id", "data.page_view_id"), carry=("data.page_type",), clock=clock,
                store="sqlite", state_path=str(path), **kw)
    rt = spec.build()
    assert isinstance(rt, SqlitePairRuntime)
    return rt


def rows(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as db:
        return sorted(db.execute("SELECT kind, key FROM halves"))


def test_halves_pair_across_workers_and_the_file_is_cleaned_up(tmp_path: Path) -> None:
    clock, db = Clock(), tmp_path / "s" / "pairs.sqlite3"
    a, b = spair(clock, db), spair(clock, db)
    assert a([ev("start", "u1", "x", T0, "promotion"), ev("end", "u2", "y", T0 + 6)]) == []
    a([ev("start", "u1", "x", T0 + 1)])  # a second start: the first waits on
    assert a.drain() == [] and a.stats()["stored"] == 2 and a.stats()["duplicate_start"] == 1
    assert rows(db) == [("end", '["u2","y"]'), ("start", '["u1","x"]')]
    b([ev("end", "u1", "x", T0 + 10), ev("start", "u2", "y", T0)])
    got = {r.key: r for r in b.drain()}
    assert got[("u1", "x")].duration_seconds == 10.0 and got[("u1", "x")].fields == {"data.page_type": "promotion"}
    assert got[("u2", "y")].duration_seconds == 6.0 and b.stats()["paired"] == 2
    assert rows(db) == []
    a.close()
    b.close()


def test_a_restart_keeps_the_waiting_halves_and_a_replay_does_not_pair_twice(tmp_path: Path) -> None:
    clock, db = Clock(), tmp_path / "pairs.sqlite3"
    before = spair(clock, db)
    before([ev("start", "u1", "a", T0), ev("start", "u2", "b", T0 + 1), ev("end", "u3", "c", T0 + 2)])
    before([ev("end", "u2", "b", T0 + 5)])  # paired before the restart
    assert [r.key for r in before.drain()] == [("u2", "b")]
    del before  # the process is gone: no close, nothing flushed by hand
    clock.t += 60
    after = spair(clock, db)
    after([ev("end", "u1", "a", T0 + 30), ev("start", "u3", "c", T0 - 4)])
    got = {r.key: r for r in after.drain()}
    assert got[("u1", "a")].paired and got[("u1", "a")].duration_seconds == 30.0
    assert got[("u3", "c")].paired and got[("u3", "c")].duration_seconds == 6.0
    # the whole of u2's page view again (a redelivery after the restart), in one chunk and apart
    after([ev("start", "u2", "b", T0 + 1), ev("end", "u2", "b", T0 + 5)])
    after([ev("start", "u2", "b", T0 + 1)])
    after([ev("start", "u1", "a", T0)])
    assert after.drain() == [] and after.stats()["replayed"] == 4 and rows(db) == []
    # past replay_ttl the key is forgotten: a new page view of the same key pairs again
    clock.t += 3601
    after([ev("start", "u2", "b", T0 + 9999), ev("end", "u2", "b", T0 + 10000)])
    assert [r.duration_seconds for r in after.drain()] == [1.0]


def test_expiry_gives_each_unpaired_half_once_whoever_sweeps(tmp_path: Path) -> None:
    clock, db = Clock(), tmp_path / "pairs.sqlite3"
    a, b = spair(clock, db, ttl=100, orphan_ttl=10, sweep_limit=7), spair(clock, db, ttl=100, orphan_ttl=10)
    a([ev("start", f"u{i}", "p", T0) for i in range(40)] + [ev("end", "v", "q", T0 + 1)])
    clock.t += 11
    b.expire(clock.t)
    assert [(r.key, r.reason, r.paired) for r in b.drain()] == [(("v", "q"), "orphan_end", False)]
    clock.t += 90
    a.expire(clock.t)
    b.expire(clock.t)
    recs = a.drain() + b.drain()
    assert Counter(r.reason for r in recs) == {"expired": 40} and len({r.key for r in recs}) == 40
    assert a.stats()["expired"] + b.stats()["expired"] == 40 and rows(db) == []


def _worker(path: str, lo: int, hi: int, q: Any) -> None:
    rt = Pair(key=("user_id", "data.page_view_id"), store="sqlite", state_path=path).build()
    for i in range(lo, hi, 50):
        rt([ev("start" if (j // 3) % 2 == 0 else "end", f"u{j % 200}", f"p{j}", T0 + j) for j in range(i, i + 50)])
    q.put([r.key for r in rt.drain()])


def test_processes_sharing_the_file_pair_each_key_once(tmp_path: Path) -> None:
    """Two processes write the same file at once: every half finds its partner exactly once."""
    path = str(tmp_path / "pairs.sqlite3")
    # keys p0..p599 get a start from one process and an end from the other
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(path, 0, 600, q)), ctx.Process(target=_worker2, args=(path, q))]
    for p in procs:
        p.start()
    keys = q.get(timeout=60) + q.get(timeout=60)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(keys) == 600 and len(set(keys)) == 600 and rows(Path(path)) == []


def _worker2(path: str, q: Any) -> None:
    """The other half of each key of ``_worker``."""
    rt = Pair(key=("user_id", "data.page_view_id"), store="sqlite", state_path=path).build()
    for i in range(0, 600, 50):
        rt([ev("end" if (j // 3) % 2 == 0 else "start", f"u{j % 200}", f"p{j}", T0 + j) for j in range(i, i + 50)])
    q.put([r.key for r in rt.drain()])


def test_the_sqlite_store_needs_a_path_and_is_declared_in_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="store 'sqlite' needs state_path"):
        Pair(store="sqlite")
    st = build_stage({"kind": "pair", "store": "sqlite", "state_path": str(tmp_path / "p.db")})
    assert st == Pair(store="sqlite", state_path=str(tmp_path / "p.db"))
