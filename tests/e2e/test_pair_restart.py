"""Open page views survive a restart of the daemon: ``Pair(store="sqlite")`` declared in
``[[stages]]`` keeps its waiting halves in ``data_dir/pairs-pair.sqlite3``. After a clean
stop (SIGTERM) and after a SIGKILL of the whole process group, the ends sent to the new
daemon pair with the starts sent to the old one, and a replay of a page view paired
before the restart does not pair twice. Two workers; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
from conftest import wait_until
from paths import SUPPORT
from test_daemon import Daemon, start_daemon

CONFIG = '''[pipeline]
pack = "stateful_pack:plays"

[[stages]]
kind = "pair"
start_type = "start"
end_type = "end"
type_field = "type"
key = ["user", "pv"]
time_field = "at"
store = "sqlite"
tick = 0.2
'''
T0 = 1_800_000_000.0


def ev(i: int, kind: str, user: str, at: float) -> dict[str, Any]:
    return {"id": f"{kind}-{user}-{i}", "type": kind, "user": user, "pv": f"v-{user}", "at": at}


def records(d: Daemon) -> list[dict[str, Any]]:
    """The pairing records in the daemon's JSON-lines sink files (every worker's)."""
    out = []
    for f in sorted(d.data.glob("events-*.jsonl")):
        for ln in f.read_bytes().splitlines():
            o = msgspec.json.decode(ln)
            if o.get("type") == "page_view":
                out.append(o)
    return out


def counters(d: Daemon) -> dict[str, int]:
    return d.get("/aggregates")[1]["pair"]


def send(d: Daemon, events: list[dict[str, Any]]) -> None:
    status, body = d.post("/events/batch", {"events": events})
    assert status == 202 and body["accepted"] == len(events), body


def test_waiting_halves_survive_sigterm_and_sigkill_and_replays_do_not_pair_twice(
        tmp_path: Path, no_leaks: None) -> None:
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(SUPPORT), os.environ.get("PYTHONPATH")]))}
    users = [f"u{i}" for i in range(6)]
    d = start_daemon(tmp_path, CONFIG, env=env, workers=2)
    try:
        send(d, [ev(1, "start", u, T0) for u in users] + [ev(1, "end", "w", T0 + 7)])  # w: an end first
        send(d, [ev(1, "end", "u0", T0 + 3)])  # one pairs before any restart
        wait_until(lambda: counters(d).get("stored") == 7 and counters(d)["paired"] == 1, 10,
                   what="the halves stored by both workers")
        assert all(w["events"] > 0 for w in d.get("/metrics")[1]["workers"])  # users on both workers
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]  # SIGTERM: a clean stop
    assert (d.data / "pairs-pair.sqlite3").exists()

    d = start_daemon(tmp_path, CONFIG, env=env, workers=2)
    try:
        send(d, [ev(2, "end", u, T0 + 10 + i) for i, u in enumerate(users[1:4])] + [ev(2, "start", "w", T0 + 1)])
        wait_until(lambda: counters(d)["paired"] == 4, 10, what="pairs with the halves from before the restart")
        send(d, [ev(3, "start", "x", T0 + 50)])  # waits, then the daemon is killed
        wait_until(lambda: counters(d).get("stored") == 1, 10, what="x stored")
    finally:
        os.killpg(d.proc.pid, signal.SIGKILL)
        d.proc.wait(30)

    d = start_daemon(tmp_path, CONFIG, env=env, workers=2)
    try:
        send(d, [ev(4, "end", "x", T0 + 58), ev(4, "end", "u4", T0 + 40)])
        # a replay of page views paired before the restarts: the whole of u0's, and u1's end
        send(d, [ev(5, "start", "u0", T0), ev(5, "end", "u0", T0 + 3), ev(5, "end", "u1", T0 + 10)])
        wait_until(lambda: counters(d)["paired"] == 2 and counters(d)["replayed"] == 3, 10,
                   what="x and u4 paired, u0 and u1 replayed")
        recs = records(d)
        assert Counter(tuple(r["key"]) for r in recs) == {
            (u, f"v-{u}"): 1 for u in ["u0", "u1", "u2", "u3", "u4", "w", "x"]}
        assert all(r["paired"] for r in recs)
        got = {r["key"][0]: r["duration_seconds"] for r in recs}
        assert got == {"u0": 3.0, "u1": 10.0, "u2": 11.0, "u3": 12.0, "u4": 40.0, "w": 6.0, "x": 8.0}
        with sqlite3.connect(d.data / "pairs-pair.sqlite3") as db:  # u5's start, from the first daemon, waits on
            assert list(db.execute("SELECT kind, key FROM halves")) == [("start", '["u5","v-u5"]')]
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
