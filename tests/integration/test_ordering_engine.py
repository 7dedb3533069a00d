"""``Order`` through a real Collector: shuffled input reaches the SQLite sink in each
user's time order; across chunks without a buffer an older event is counted ``late``
and still stored; with a buffer the chunks are put back in order; a worker SIGKILLed
while it holds events loses nothing (its chunks are redelivered: the ledger holds);
the ``[[stages]]`` TOML table round-trips and a bad one fails ``check-config`` with
its path. Every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import wait_until
from ledger import Ledger
from order_support import Reading, per_user, pipeline, readings, stored

from collector import Collector
from collector.config import load_config
from collector.packs import build_pipeline
from collector.stages.ordering import Order
from collector.stages.rules import Filter

pytestmark = pytest.mark.usefixtures("no_leaks")


def counters(c: Collector) -> dict[str, int]:
    return c.aggregate("order")


def test_shuffled_input_reaches_the_sink_in_each_keys_order(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    batch = readings(users=40, per_user=25, seed=1)
    with Collector(pipeline(db), workers=2, chunk_size=4096) as c:
        res = c.handle(batch).wait(timeout=30)
        assert res.handled_events == 1000 and res.failed_events == 0
        got = wait_until(lambda: counters(c)["ordered"] == 1000 and counters(c), 10, what="published counters")
    assert got["reordered"] > 0 and got["late"] == 0 and got["held"] == 0
    times = per_user(stored(db))
    assert len(times) == 40 and all(ts == sorted(ts) and len(ts) == 25 for ts in times.values())


def test_without_a_buffer_an_older_event_in_a_later_chunk_is_late_and_stored(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    with Collector(pipeline(db), workers=1) as c:
        c.handle([Reading(f"a{t}", "a", t) for t in (12.0, 10.0, 11.0)]).wait(timeout=30)
        res = c.handle([Reading(f"a{t}", "a", t) for t in (9.0, 13.0, 5.0)]).wait(timeout=30)
        assert res.handled_events == 3 and res.failed_events == 0 and not res.errors
        got = wait_until(lambda: counters(c)["ordered"] == 6 and counters(c), 10, what="published counters")
    assert got["late"] == 2 and got["reordered"] == 3  # 10, 11 after 12; 5 after 13 (9, 5: after 12, late)
    assert per_user(stored(db))["a"] == [10.0, 11.0, 12.0, 5.0, 9.0, 13.0]  # every event stored


def test_answers_name_the_original_positions_after_the_chunk_was_reordered(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    p = pipeline(db)
    p = dataclasses.replace(p, stages=(*p.stages, Filter("order_support:not_dropped")))
    items: list[Any] = [{"id": "a3", "user_id": "a", "ts": 3}, {"id": "bad", "user_id": "a"},
                        {"id": "a1", "user_id": "a", "ts": 1}, {"id": "drop-a2", "user_id": "a", "ts": 2}]
    with Collector(p, workers=1) as c:
        res = c.handle(msgspec.json.encode(items)).wait(timeout=30)
    # the filter saw [a1, drop-a2, a3]: its drop at 1 is the batch's item 3
    assert sorted((e.index, e.kind) for e in res.errors) == [(1, "invalid"), (3, "filtered")]
    assert [r["id"] for r in stored(db)] == ["a1", "a3"]


def test_with_a_buffer_chunks_arriving_out_of_order_are_put_back(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    blocks = [readings(users=30, per_user=10, seed=s, t0=t0, step=0.1) for s, t0 in ((2, 2.0), (3, 1.0), (4, 0.0))]
    with Collector(pipeline(db, max_delay=30.0), workers=2, chunk_size=64) as c:
        ops = [c.handle(b) for b in blocks]  # newest block first, each cut into several chunks
        # a newer reading per user moves the event-time watermark past every block (no 30 s wait)
        t = time.monotonic()
        ops.append(c.handle([Reading(f"u{u}-end", f"u{u}", 100.0) for u in range(30)]))
        for op in ops[:3]:
            res = op.wait(timeout=60)
            assert res.failed_events == 0 and not res.errors
        assert time.monotonic() - t < 20.0, "released by the watermark, not max_delay"
        wait_until(lambda: counters(c)["held"] == 30 and counters(c)["ordered"] == 930, 10, what="the end readings held")
    # the drain released the end readings; every user's readings are stored in time order
    times = per_user(stored(db))
    assert len(times) == 30
    for ts in times.values():
        assert ts == sorted(ts) and len(ts) == 31 and ts[-1] == 100.0


def test_a_worker_killed_while_holding_events_loses_none(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    batch = readings(users=50, per_user=20, seed=5, step=0.1)  # within max_delay: all held
    ledger = Ledger()
    ledger.send(e.id for e in batch)
    with Collector(pipeline(db, max_delay=4.0), workers=2, chunk_size=128) as c:
        t = time.monotonic()
        op = c.handle(batch)
        wait_until(lambda: counters(c)["held"] > 0, 5, what="held events")
        assert not stored(db), "nothing is released before max_delay"
        os.kill(c.worker_pids()[0], signal.SIGKILL)
        res = op.wait(timeout=60)
        # redelivered chunks go one at a time and are not held: no max_delay per chunk (5 x 4 s)
        assert time.monotonic() - t < 12.0
        assert c.stats().worker_restarts == 1
        assert res.batch.redelivered_chunks >= 1
        # the dead worker's held events do not stay in the gauge (its partial is retired with 0)
        wait_until(lambda: counters(c)["held"] == 0, 10, what="the held gauge back to 0")
    failed = {err.index for err in res.errors}
    ledger.answer([{"id": e.id, "status": "accepted"} for i, e in enumerate(batch) if i not in failed], [])
    verdict = ledger.check(r["id"] for r in stored(db))
    verdict.assert_clean()
    assert verdict.sent == verdict.acked == verdict.stored == 1000 and not verdict.lost


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collector", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_the_stages_table_round_trips_and_bad_ones_fail_check_config_with_the_path(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    stage = '[[stages]]\nkind = "order"\nby = "timestamp"\nmax_delay = 2.5\nmax_held = 5000\n'
    good.write_text(f'data_dir = "{tmp_path}"\n[[stages]]\nkind = "enrich"\n' + stage)
    (st,) = [s for s in build_pipeline(load_config(str(good))).stages if isinstance(s, Order)]
    assert st == Order(by="timestamp", max_delay=2.5, max_held=5000)
    r = _check_config(good)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
    assert "order order: key id, by timestamp, buffer max_delay 2.5 s, max_held 5000" in r.stdout, r.stdout
    for body, why in (
        ('[[stages]]\nkind = "order"\nmax_delay = 1\n', "`$.stages[0]`: Object missing required field `by`"),
        ('[[stages]]\nkind = "order"\nby = "timestamp"\nmax_delay = -1\n', "`$.stages[0]`: order stage 'order': "
         "max_delay must be >= 0"),
        ('[[stages]]\nkind = "order"\nby = "timestamp"\nmaxdelay = 1\n', "`$.stages[0].maxdelay`: unknown field"),
        (stage, "stage 'order' holds events (max_delay), and the lookups run after every stage unless placed"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(f'data_dir = "{tmp_path}"\n' + body)
        r = _check_config(bad)
        assert r.returncode == 2 and why in r.stderr, r.stderr
