"""A table per event type (``table = "cs_{event}"``) in the sqlite sink, and the clickhouse sink.

Everything goes through a real :class:`Collector` (worker processes) into a real SQLite
file and a real ClickHouse server (``clickhouse_url``: skipped when it does not answer,
a failure under ``COLLECTOR_REQUIRE_SERVICES=1``). Each test checks a ledger: the ids
sent per table are exactly the ids stored there, the refused ones are in the
dead-letter file with their reason. Each ClickHouse test uses its own database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from table_helpers import BAD, TYPES, Click, ClickhouseReader, click_pipeline, clicks

from collector import Collector
from collector.sinks import ClickhouseSinkConfig, DeadLetterConfig, SqliteSinkConfig
from collector.sinks.files import read_deadletters
from collector.sinks.tables import IDENT, table_names

pytestmark = pytest.mark.usefixtures("no_leaks")
SUPPORT = Path(__file__).resolve().parents[1] / "support"


def ledger(events: list[Click], prefix: str) -> tuple[dict[str, set[str]], set[str]]:
    """Ids sent per valid table, and the ids whose table name is refused."""
    by_table: dict[str, set[str]] = defaultdict(set)
    refused = set()
    for e in events:
        name = prefix + e.event
        if e.event and IDENT.match(name):
            by_table[name].add(e.id)
        else:
            refused.add(e.id)
    return dict(by_table), refused


def check_deadletters(path: Path, refused: set[str]) -> None:
    recs = [r for f in path.parent.glob(path.name + "*") for r in read_deadletters(str(f))]
    got = {msgspec.json.decode(r.payload, type=Click).id for r in recs}
    assert got == refused, f"dead-lettered {len(got)}, expected {len(refused)}"
    assert all("refused this event" in r.reason or "table" in r.reason for r in recs)
    assert all(r.stage.startswith("sink:") for r in recs)


# ------------------------------------------------------------------ sqlite
def test_sqlite_routes_each_type_to_its_table_and_deadletters_bad_names(tmp_path: Path) -> None:
    db = tmp_path / "cs.db"
    dl = tmp_path / "dl.jsonl"
    cfg = SqliteSinkConfig(path=str(db), table="cs_{event}", retries=2, backoff=0.01)
    events = clicks(30_000, bad_every=101)
    expected, refused = ledger(events, "cs_")
    assert len(expected) == len(TYPES) and len(refused) > 100
    with Collector(click_pipeline((cfg,), DeadLetterConfig(path=str(dl))), workers=2, chunk_size=1000) as c:
        res = c.handle(events).wait(timeout=120)
        again = c.handle(events[:3000]).wait(timeout=60)  # rewritten: stored once (the id is the key)
        st = c.stats()
    assert res.handled_events == len(events) and res.failed_events == 0
    assert again.handled_events == 3000
    assert sum(1 for e in res.errors if e.kind == "deadlettered") == len(refused)
    with contextlib.closing(sqlite3.connect(db)) as con:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert names == set(expected)
        for t, ids in expected.items():
            stored = [r[0] for r in con.execute(f'SELECT id FROM "{t}"')]
            assert len(stored) == len(set(stored)) == len(ids) and set(stored) == ids, t
            # the typed view of each table
            # (a field named `event` is the JSON column's name: read it from the JSON)
            row = con.execute(
                f"""SELECT json_extract(event, '$.event'), "user", n FROM "{t}_fields" WHERE id = ?""", (min(ids),)
            ).fetchone()
            assert row[0] == t.removeprefix("cs_") and row[1].startswith("u") and row[2] == int(min(ids)[1:])
    check_deadletters(dl, refused)
    assert st.deadlettered >= len(refused)


def test_sqlite_migrate_creates_template_tables_by_name(tmp_path: Path) -> None:
    from collector.sinks import build_sink
    from collector.sinks.base import EventCodec

    cfg = SqliteSinkConfig(path=str(tmp_path / "m.db"), table="cs_{event}")
    tables = table_names(cfg.table, TYPES)

    async def run() -> tuple[list[str], list[str]]:
        sink = build_sink(cfg, index=0, codec=EventCodec(Click, "id"), worker=0)
        try:
            return await sink.migrate(tables), await sink.migrate(tables)  # type: ignore[call-arg]
        finally:
            await sink.close()

    first, second = asyncio.run(run())
    assert sorted(s for s in first if s.startswith("create table")) == sorted(f"create table {t}" for t in tables)
    assert second == []


# ------------------------------------------------------------------ clickhouse
@pytest.fixture
def ch(clickhouse_url: str) -> Iterator[tuple[ClickhouseReader, str]]:
    """A reader and a fresh database name (dropped afterwards)."""
    reader = ClickhouseReader(clickhouse_url)
    db = f"ct_{uuid.uuid4().hex[:10]}"
    yield reader, db
    reader.query(f"DROP DATABASE IF EXISTS {db}")


def ch_config(url: str, db: str, **kw: object) -> ClickhouseSinkConfig:
    opts: dict[str, object] = {"retries": 3, "backoff": 0.01, "backoff_max": 0.1, "timeout": 20.0, **kw}
    return msgspec.convert({"kind": "clickhouse", "url": url, "database": db, **opts}, ClickhouseSinkConfig)


def test_clickhouse_routes_each_type_to_its_table_duplicates_collapse(
    ch: tuple[ClickhouseReader, str], clickhouse_url: str, tmp_path: Path
) -> None:
    reader, db = ch
    dl = tmp_path / "dl.jsonl"
    cfg = ch_config(clickhouse_url, db, table="cs_{event}")
    events = clicks(30_000, bad_every=101)
    expected, refused = ledger(events, "cs_")
    with Collector(click_pipeline((cfg,), DeadLetterConfig(path=str(dl))), workers=2, chunk_size=1000) as c:
        res = c.handle(events).wait(timeout=120)
        # the same events again (a redelivery, a replay): more rows, one per id after FINAL
        again = c.handle(events[:6000]).wait(timeout=60)
    assert res.handled_events == len(events) and res.failed_events == 0
    assert again.handled_events == 6000
    assert reader.tables(db) == sorted(expected)
    for t, ids in expected.items():
        stored = [r["id"] for r in reader.rows(f"SELECT id FROM {db}.{t} FINAL")]
        assert len(stored) == len(set(stored)), f"{t}: FINAL leaves duplicates"
        assert set(stored) == ids, f"{t}: lost {len(ids - set(stored))}, stray {len(set(stored) - ids)}"
        (row,) = reader.rows(f"SELECT count() AS n, uniqExact(id) AS u FROM {db}.{t}")
        # the second send added rows for 6000 ids; a background merge may have collapsed them already
        assert int(row["u"]) == len(ids) <= int(row["n"])
        # the event JSON, readable with visitParamExtract* on 18.16
        (one,) = reader.rows(
            f"SELECT visitParamExtractString(event, 'event') AS type, visitParamExtractInt(event, 'n') AS n "
            f"FROM {db}.{t} FINAL WHERE id = '{min(ids)}'"
        )
        assert one["type"] == t.removeprefix("cs_") and int(one["n"]) == int(min(ids)[1:])
    reader.query(f"OPTIMIZE TABLE {db}.cs_click FINAL")
    (row,) = reader.rows(f"SELECT count() AS n FROM {db}.cs_click")
    assert int(row["n"]) == len(expected["cs_click"])  # after a merge: one row per id
    check_deadletters(dl, refused)
    recs = read_deadletters(str(dl))
    assert {(r.stage, r.path) for r in recs} == {("sink:clickhouse[0]", "$.event")}
    assert any("'cs_bad-name' is not a plain SQL identifier" in r.reason for r in recs)
    assert any("field 'event' is missing or empty" in r.reason for r in recs)
    assert len(refused) >= len(BAD)


def test_clickhouse_refused_values_are_isolated_and_deadlettered(
    ch: tuple[ClickhouseReader, str], clickhouse_url: str, tmp_path: Path
) -> None:
    """A table whose ``id`` is UInt64: ClickHouse refuses non-numeric ids (code 27, HTTP 500).

    That is a data error: the chunk is halved until the refused events stand alone,
    they go to the dead-letter file, the rest is stored, and no retry budget is spent.
    """
    reader, db = ch
    reader.query(f"CREATE DATABASE {db}")
    reader.query(
        f"CREATE TABLE {db}.events (id UInt64, event String, inserted_at DateTime DEFAULT now()) "
        "ENGINE = ReplacingMergeTree() ORDER BY id"
    )
    events = [Click(id=str(k) if k % 250 else f"x{k}", event="click", user="u", n=k) for k in range(1, 10_001)]
    refused = {e.id for e in events if e.id.startswith("x")}
    dl = tmp_path / "dl.jsonl"
    cfg = ch_config(clickhouse_url, db, retries=0)
    with Collector(click_pipeline((cfg,), DeadLetterConfig(path=str(dl))), workers=2, chunk_size=1000) as c:
        res = c.handle(events).wait(timeout=120)
    assert res.handled_events == len(events)
    stored = {str(r["id"]) for r in reader.rows(f"SELECT id FROM {db}.events FINAL")}
    assert stored == {e.id for e in events} - refused
    recs = read_deadletters(str(dl))
    assert {msgspec.json.decode(r.payload, type=Click).id for r in recs} == refused
    assert all("refused this event" in r.reason and "Code: 27" in r.reason for r in recs)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_clickhouse_down_is_retried_then_deadlettered(tmp_path: Path) -> None:
    dl = tmp_path / "dl.jsonl"
    cfg = ch_config(f"http://127.0.0.1:{_dead_port()}", "default", retries=2, timeout=5.0)
    events = clicks(3000)
    with Collector(click_pipeline((cfg,), DeadLetterConfig(path=str(dl))), workers=2, chunk_size=500) as c:
        res = c.handle(events).wait(timeout=60)
        st = c.stats()
    assert res.handled_events == len(events)
    recs = read_deadletters(str(dl))
    assert sorted(msgspec.json.decode(r.payload, type=Click).id for r in recs) == sorted(e.id for e in events)
    assert all("gave up: failed 3 times" in r.reason for r in recs), recs[0].reason
    s0 = st.sinks[0]  # then the dead-letter sink
    assert s0.retries >= 2 * (len(events) // 500) and s0.rows == 0
    assert st.deadlettered == len(events)


def test_clickhouse_migrate_creates_tables_idempotently(
    ch: tuple[ClickhouseReader, str], clickhouse_url: str, tmp_path: Path
) -> None:
    from collector.sinks.clickhouse import migrate

    reader, db = ch
    cfg = ch_config(clickhouse_url, db, table="cs_{event}")
    tables = [*table_names(cfg.table, TYPES), "cs_session"]
    first = asyncio.run(migrate(cfg, tables))
    assert first == [f"create database {db}", *(f"create table {db}.{t}" for t in tables)]
    assert asyncio.run(migrate(cfg, tables)) == []
    assert reader.tables(db) == sorted(tables)
    (engine,) = reader.rows(f"SELECT engine FROM system.tables WHERE database = '{db}' AND name = 'cs_click'")
    assert engine["engine"] == "ReplacingMergeTree"

    # `collector migrate` on a pipeline with a fixed clickhouse table
    env = dict(os.environ)
    env["COLLECTOR_TEST_SINK"] = msgspec.json.encode(ch_config(clickhouse_url, db, table="playback")).decode()
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "collector", "migrate", "--pipeline", "sink_helpers:replay_pipeline"]
    out1 = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=SUPPORT)
    assert out1.returncode == 0 and f"create table {db}.playback" in out1.stdout, out1.stdout + out1.stderr
    out2 = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=SUPPORT)
    assert out2.returncode == 0 and "up to date" in out2.stdout, out2.stdout + out2.stderr
