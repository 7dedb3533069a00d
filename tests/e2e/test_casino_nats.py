"""The casino pack's real setup (seed 001), as a user runs it: ``collector migrate --pack
casino`` into PostgreSQL, ``collector serve --pack casino --source nats://...`` consuming a
JetStream stream, events published with ``collector publish``, final events on the
daemon's stdout; and ``collector demo casino`` as a subprocess.

Each test uses a schema and a stream of its own (random names), dropped and deleted after.
The ledger is the set of ids published against the ids on stdout: every id once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import _need, wait_until
from ledger import Ledger
from test_casino import eur

from collector.casino import CasinoEvent, describe, generate_casino
from collector.packs.casino import SEED_PLAYERS

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collector", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


async def sql(dsn: str, query: str) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    """A schema name no other test uses; dropped after the test (the test creates it)."""
    name = "casino_" + uuid.uuid4().hex[:10]
    yield name
    asyncio.run(sql(pg_dsn, f"DROP SCHEMA IF EXISTS {name} CASCADE"))


@pytest.fixture
def nurl() -> str:
    return _need(os.environ.get("COLLECTOR_NATS_URL") or "nats://127.0.0.1:4222", 4222, "NATS")


def test_migrate_creates_and_seeds_players_once(pg_dsn: str, schema: str) -> None:
    r = cli("migrate", "--pack", "casino", "--dsn", pg_dsn, "--schema", schema)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"created schema {schema}; created table {schema}.players; seeded players 10, 11, 12, 13, 14" in r.stdout
    rows = asyncio.run(sql(pg_dsn, f"SELECT id, email, now() - last_signed_in_at AS ago FROM {schema}.players ORDER BY id"))
    assert [(x["id"], x["email"]) for x in rows] == [(i, e) for i, (e, _) in SEED_PLAYERS.items()]
    for x in rows:  # 1 h, 3 h, 2 days, 5 h, 1 day before the migration ran
        assert abs((x["ago"] - SEED_PLAYERS[x["id"]][1]).total_seconds()) < 60, x

    asyncio.run(sql(pg_dsn, f"UPDATE {schema}.players SET email = 'kept@example.com' WHERE id = 10"))
    r = cli("migrate", "--pack", "casino", "--dsn-env", "CASINO_PG", "--schema", schema)  # unset: refused
    assert r.returncode == 2 and "is not set" in r.stderr
    env_run = subprocess.run([sys.executable, "-m", "collector", "migrate", "--pack", "casino", "--dsn-env",
                              "CASINO_PG", "--schema", schema], capture_output=True, text=True, timeout=60,
                             cwd=ROOT, env={**os.environ, "CASINO_PG": pg_dsn})
    assert env_run.returncode == 0 and env_run.stdout.strip() == f"pack casino (schema {schema}): up to date"
    again = asyncio.run(sql(pg_dsn, f"SELECT id, email FROM {schema}.players ORDER BY id"))
    assert len(again) == 5 and again[0]["email"] == "kept@example.com"  # a second run changes nothing


def test_published_events_reach_stdout_once_enriched_from_postgresql(
    tmp_path: Path, pg_dsn: str, schema: str, nurl: str, no_leaks: None
) -> None:
    pytest.importorskip("nats")
    from test_nats import Names, consumer_state, jetstream

    r = cli("migrate", "--pack", "casino", "--dsn", pg_dsn, "--schema", schema)
    assert r.returncode == 0, r.stdout + r.stderr
    signed_in = {x["id"]: x["t"] for x in asyncio.run(sql(pg_dsn, f"SELECT id, last_signed_in_at AS t FROM {schema}.players"))}
    names = Names()
    cfg = tmp_path / "casino.toml"
    cfg.write_text(f'[pipeline]\npack = "casino"\n[pipeline.options]\nplayers_dsn = "{pg_dsn}"\n'
                   f'players_schema = "{schema}"\n[[sinks]]\nkind = "stdout"\n')
    n, generated = 3000, 500
    sent = generate_casino(n, seed=int.from_bytes(os.urandom(3), "big"), start_id=time.time_ns() // 1000)
    by_id = {e["id"]: e for e in sent}
    events_file = tmp_path / "events.ndjson"
    events_file.write_text("".join(json.dumps(e) + "\n" for e in sent))
    port_file, out_path, err_path = tmp_path / "port", tmp_path / "stdout.jsonl", tmp_path / "stderr.log"

    async def main() -> None:
        async with jetstream(nurl, names) as js:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "collector", "serve", "--config", str(cfg), "--pack", "casino",
                     "--source", nurl, "--stream", names.stream, "--subject", f"{names.prefix}.>",
                     "--durable", names.durable, "--port", "0", "--port-file", str(port_file),
                     "--data-dir", str(tmp_path / "data"), "--workers", "2"],
                    stdout=out, stderr=err, start_new_session=True, cwd=ROOT)
            try:
                wait_until(lambda: "ingress_started" in err_path.read_text() or proc.poll() is not None, 60,
                           what="the ingress to start")
                assert proc.poll() is None, err_path.read_text()[-3000:]
                port = int(port_file.read_text())
                subject = f"{names.prefix}.{{type}}"
                for args in (("--file", str(events_file)), ("casino", "--count", str(generated))):
                    p = await asyncio.to_thread(cli, "publish", *args, "--to", nurl, "--subject", subject,
                                                "--stream", names.stream, "--quiet")
                    assert p.returncode == 0, p.stderr

                def view() -> dict[str, Any]:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/materialized", timeout=10) as resp:
                        return dict(json.loads(resp.read()))

                wait_until(lambda: view()["events_total"] == n + generated, 90, 0.2,
                           what=f"/materialized to count {n + generated} events")
                time.sleep(0.5)
                assert view()["events_total"] == n + generated  # and no more
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(60) == 0, err_path.read_text()[-3000:]
                st = await consumer_state(js, names)
                assert st.num_ack_pending == 0 and st.num_pending == 0, st
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)

    asyncio.run(main())

    lines = [json.loads(ln) for ln in out_path.read_text().splitlines() if ln.strip()]
    led = Ledger()
    led.send(str(i) for i in by_id)
    led.acked.update(str(i) for i in by_id)  # every PubAck came: the stream holds them
    mine = [ln for ln in lines if ln["id"] in by_id]
    verdict = led.check(str(ln["id"]) for ln in mine)
    verdict.assert_clean()
    assert verdict.stored == n and verdict.duplicated == 0, verdict
    others = [ln["id"] for ln in lines if ln["id"] not in by_id]  # `publish casino --count`'s events
    assert len(others) == len(set(others)) == generated

    for ln in lines:
        ev = msgspec.convert(ln, CasinoEvent)  # the line decodes back to an event
        assert ln["description"] == describe(ev) and ln["description"].startswith(f"Player #{ln['player_id']}")
        if ln["type"] in ("bet", "deposit"):
            assert ln.get("amount_eur", 0) == eur(ln["amount"], ln["currency"]), ln
        if ln["player_id"] in SEED_PLAYERS:
            email = SEED_PLAYERS[ln["player_id"]][0]
            assert ln["player"]["email"] == email and f"({email})" in ln["description"]
            assert ln["player"]["id"] == ln["player_id"]
            assert datetime.fromisoformat(ln["player"]["last_signed_in_at"]) == signed_in[ln["player_id"]]
        else:
            assert "player" not in ln  # not in the table: left at its zero value
    for e in mine:
        assert all(e[k] == v for k, v in by_id[e["id"]].items()), e  # the sent fields kept as sent
    missing = [json.loads(x) for x in err_path.read_text().splitlines() if "not found" in x]
    assert missing and all(any(f"key {i} " in m["msg"] for i in range(15, 20)) for m in missing)


@pytest.mark.parametrize("real", [False, True], ids=["embedded", "nats-and-postgresql"])
def test_demo_casino_runs_as_a_user_runs_it(tmp_path: Path, real: bool, request: pytest.FixtureRequest,
                                            no_leaks: None) -> None:
    args = ["demo", "casino", "--duration", "2", "--workers", "2", "--data-dir", str(tmp_path / "d")]
    if real:
        pg_dsn, schema, nurl = (request.getfixturevalue(f) for f in ("pg_dsn", "schema", "nurl"))
        args += ["--nats", nurl, "--pg", pg_dsn, "--pg-schema", schema, "--rate", "1000"]
    r = cli(*args, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the daemon stopped with exit code 0" in r.stderr and " events/s " in r.stderr
    _, _, rest = r.stdout.partition("GET /materialized:\n")
    view_text, _, samples = rest.partition("sample events (the daemon's stdout):\n")
    view = json.loads(view_text)
    assert set(view) == {"events_total", "events_per_minute", "events_per_second_moving_average",
                         "top_player_bets", "top_player_wins", "top_player_deposits"}
    stdout_lines = (tmp_path / "d" / "casino-events.jsonl").read_text().splitlines()
    assert view["events_total"] == len(stdout_lines) >= 1000
    shown = [json.loads(x) for x in samples.splitlines()]
    assert len(shown) >= 4 and {e["type"] for e in shown} == {"game_start", "bet", "deposit", "game_stop"}
    assert all(e["description"] == describe(msgspec.convert(e, CasinoEvent)) for e in shown)
    if real:
        assert "players in PostgreSQL" in r.stderr and "published to NATS stream" in r.stderr
        rows = asyncio.run(sql(pg_dsn, f"SELECT count(*) AS n FROM {schema}.players"))
        assert rows[0]["n"] == 5
