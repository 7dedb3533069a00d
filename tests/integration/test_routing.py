"""Routing rules in a real Collector: each event in exactly the sinks its rules name.

A ledger per sink: every sent event is expected in the set of sinks its ``route``
rules name (the union when several match), or in the ``default`` sinks when none
does; the test reads every sink back and compares. A sink that fails for one route
(SQLite held under ``BEGIN EXCLUSIVE`` past its retry budget) dead-letters only the
events routed to it, answered ``deadlettered`` at their own positions, while the
other routes' events are stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from collector import Collector
from collector.errors import ConfigError
from collector.playback import InMemoryClient, PlaybackEvent, generate_events, playback_pipeline
from collector.sinks import DeadLetterConfig, JsonlSinkConfig, SqliteSinkConfig
from collector.stages.rules import decode_rules

pytestmark = pytest.mark.usefixtures("no_leaks")

RULES = {"name": "routing", "rules": [
    {"name": "tv", "when": {"path": "device_type", "regex": "^device-1"}, "action": "route", "sinks": ["tv", "audit"]},
    {"name": "low", "when": {"path": "bitrate_kbps", "lt": 1000}, "action": "route", "sinks": ["audit"]},
]}


def _expected(e: PlaybackEvent) -> set[str]:
    want: set[str] = set()
    if e.device_type.startswith("device-1"):
        want |= {"tv", "audit"}
    if e.bitrate_kbps < 1000:
        want.add("audit")
    return want or {"main"}


def _jsonl_ids(d: Path, stem: str) -> list[int]:
    return [json.loads(ln)["id"] for f in sorted(d.glob(f"{stem}-*.jsonl")) for ln in f.read_text().splitlines()]


def _sqlite_ids(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [int(r[0]) for r in db.execute("SELECT id FROM events")]


def _pipeline(tmp: Path, **tv: Any) -> Any:
    sinks = (
        JsonlSinkConfig(name="main", path=str(tmp / "main-{worker}.jsonl")),
        SqliteSinkConfig(name="tv", path=str(tmp / "tv.db"), default=False, **tv),
        JsonlSinkConfig(name="audit", path=str(tmp / "audit-{worker}.jsonl"), default=False),
    )
    p = playback_pipeline(InMemoryClient(), sinks=sinks, deadletter=DeadLetterConfig(path=str(tmp / "dl.jsonl")))
    return dataclasses.replace(p, stages=(*p.stages, decode_rules(RULES)))


def test_each_event_is_in_exactly_the_sinks_its_rules_name(tmp_path: Path) -> None:
    events = generate_events(6_000, users=300, seed=3)
    ledger = {ev.id: _expected(ev) for ev in events}
    assert {frozenset(v) for v in ledger.values()} >= {frozenset({"main"}), frozenset({"tv", "audit"}),
                                                        frozenset({"audit"})}
    with Collector(_pipeline(tmp_path), workers=2, chunk_size=500) as c:
        res = c.handle(events).wait(timeout=60)
        assert res.failed_events == 0 and res.handled_events == len(events) and not res.errors
        n_tv = sum(1 for s in ledger.values() if "tv" in s)
        wait_until(lambda: c.aggregate("routing", "tv")["routed"] == n_tv, 10, what="the route counters")
    stored = {"main": _jsonl_ids(tmp_path, "main"), "audit": _jsonl_ids(tmp_path, "audit"),
              "tv": _sqlite_ids(tmp_path / "tv.db")}
    for sink, ids in stored.items():
        want = sorted(i for i, s in ledger.items() if sink in s)
        assert sorted(ids) == want, f"sink {sink}: {len(ids)} stored, {len(want)} expected"
    assert not (tmp_path / "dl.jsonl").exists() or not (tmp_path / "dl.jsonl").read_text()


def test_a_sink_failing_for_one_route_loses_nothing_of_the_others(tmp_path: Path) -> None:
    events = generate_events(3_000, users=300, seed=5)
    ledger = {ev.id: _expected(ev) for ev in events}
    with Collector(_pipeline(tmp_path, busy_timeout=0.05, retries=1, backoff=0.01, timeout=2.0),
                   workers=2, chunk_size=400) as c:
        c.handle(events[:10]).wait(timeout=30)  # the sinks open their stores (tv.db exists now)
        db = sqlite3.connect(tmp_path / "tv.db", timeout=10, isolation_level=None)
        try:
            db.execute("BEGIN EXCLUSIVE")  # held past the tv sink's retry budget
            res = c.handle(events[10:]).wait(timeout=60)
        finally:
            db.execute("ROLLBACK")
            db.close()
    rest = events[10:]
    # the events routed to tv (and only those) are dead-lettered, at their own positions
    dead = sorted(x.index for x in res.errors)
    assert dead == [i for i, ev in enumerate(rest) if "tv" in ledger[ev.id]]
    assert all(x.kind == "deadlettered" and "sink tv: gave up" in x.reason for x in res.errors)
    assert res.failed_events == 0 and res.handled_events == len(rest)
    # every other route is stored in full: main and audit have every event routed to them
    for sink in ("main", "audit"):
        want = sorted(i for i, s in ledger.items() if sink in s)
        assert sorted(_jsonl_ids(tmp_path, sink)) == want, sink
    in_dl = {json.loads(json.loads(ln)["payload"])["id"] for ln in (tmp_path / "dl.jsonl").read_text().splitlines()}
    assert in_dl == {rest[i].id for i in dead}
    assert set(_sqlite_ids(tmp_path / "tv.db")) == {ev.id for ev in events[:10] if "tv" in ledger[ev.id]}


def test_a_route_to_an_unknown_sink_fails_the_boot(tmp_path: Path) -> None:
    p = _pipeline(tmp_path)
    bad = decode_rules({"name": "bad", "rules": [{"name": "x", "action": "route", "sinks": ["nope"]}]})
    from collector.sinks.routing import check_routes

    with pytest.raises(ConfigError, match=r"^stage 'bad': rules\[0\]\.sinks\[0\]: unknown sink 'nope'"):
        check_routes(dataclasses.replace(p, stages=(*p.stages, bad)))
