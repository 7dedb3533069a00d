"""The casino pack (seed 001): descriptions, EUR amounts from a rates service, player rows
(PostgreSQL, never cached, or the seed rows), seed 001's /materialized view, and the
daemon with ``--pack casino`` writing final events to stdout as JSON lines.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import wait_until

from collector import Collector
from collector.casino import CasinoEvent, casino_pipeline, describe, generate_casino
from collector.sources.rates import DEFAULT_RATES, RatesService, convert

DECIMALS = {"BTC": 8}


def eur(amount: int, currency: str) -> int:
    rates = {k: Decimal(v) for k, v in DEFAULT_RATES.items()}
    return convert(amount, currency, rates, "EUR", DECIMALS)


@pytest.mark.parametrize(("event", "text"), [
    ({"id": 1, "player_id": 10, "game_id": 100, "type": "game_start", "created_at": "2022-01-10T12:34:56.789+00"},
     'Player #10 started playing a game "Rocket Dice" on January 10th, 2022 at 12:34 UTC.'),
    ({"id": 2, "player_id": 11, "game_id": 101, "type": "bet", "amount": 500, "currency": "USD", "amount_eur": 468,
      "created_at": "2022-02-02T23:45:07.89+00", "player": {"email": "john@example.com"}},
     "Player #11 (john@example.com) placed a bet of 5 USD (4.68 EUR) on a game \"It's bananas!\" "
     "on February 2nd, 2022 at 23:45 UTC."),
    ({"id": 3, "player_id": 12, "type": "deposit", "amount": 10000, "currency": "EUR", "created_at": "2022-03-03T12:12:12+00"},
     "Player #12 made a deposit of 100 EUR on March 3rd, 2022 at 12:12 UTC."),
    ({"id": 4, "player_id": 13, "game_id": 109, "type": "game_stop", "created_at": "2022-03-03T12:12:12Z"},
     'Player #13 stopped playing a game "ChilliPop" on March 3rd, 2022 at 12:12 UTC.'),
    ({"id": 5, "player_id": 14, "game_id": 102, "type": "bet", "amount": 150000000, "currency": "BTC", "amount_eur": 9316770186,
      "has_won": True, "created_at": "2022-03-03T12:12:12Z"},
     'Player #14 placed a bet of 1.5 BTC (93167701.86 EUR) on a game "Wild Spin" and won on March 3rd, 2022 at 12:12 UTC.'),
])
def test_descriptions_in_the_seeds_style(event: dict[str, Any], text: str) -> None:
    assert describe(msgspec.convert(event, CasinoEvent)) == text


@pytest.mark.parametrize(("event", "why"), [
    ({"id": 1, "player_id": 10, "type": "bet", "game_id": 100, "created_at": "2022-01-10T12:34:56Z"}, "needs a currency"),
    ({"id": 1, "player_id": 10, "type": "game_start", "created_at": "2022-01-10T12:34:56Z"}, "needs a game_id"),
    ({"id": 1, "player_id": 10, "type": "deposit", "amount": 5, "currency": "XYZ", "created_at": "2022-01-10T12:34:56Z"}, "currency"),
    ({"id": 1, "player_id": 10, "type": "game_stop", "game_id": 100, "created_at": "2022-02-02T23:45:67.89+00"}, "RFC 3339"),
    ({"id": 1, "player_id": 10, "type": "game_stop", "game_id": 100, "created_at": "2022-02-02T23:45:07Z", "x": 1}, "unknown field"),
])
def test_invalid_events_say_why(event: dict[str, Any], why: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=why):
        msgspec.convert(event, CasinoEvent)


def test_the_pipeline_enriches_describes_and_materializes_exactly() -> None:
    svc = RatesService()
    events = generate_casino(3000, seed=11)
    with svc.running(), Collector(casino_pipeline(svc.url), workers=2) as c:
        res = c.handle(events, return_events=True).wait(timeout=60)
        assert res.failed_events == 0, res.errors[:3]
        out = res.events or []
        for sent, got in zip(events, out, strict=True):
            if sent["type"] in ("bet", "deposit"):
                assert got.amount_eur == eur(sent["amount"], sent["currency"])
            assert (got.player is not None) == (sent["player_id"] <= 14)  # 15..19 are not in players
            assert got.description == describe(got) and got.description.startswith(f"Player #{sent['player_id']}")
        assert svc.requests <= 2 * 2  # the table is reused for max_age, per worker
        bets = Counter(e["player_id"] for e in events if e["type"] == "bet")
        wins = Counter(e["player_id"] for e in events if e["type"] == "bet" and e.get("has_won"))
        deposits: Counter[int] = Counter()
        for e, g in zip(events, out, strict=True):
            if e["type"] == "deposit":
                deposits[e["player_id"]] += g.amount_eur
        wait_until(lambda: c.view("materialized")["events_total"] == len(events), 5, what="the partials")
        view = c.view("materialized")
        assert view["top_player_bets"] == {"id": bets.most_common(1)[0][0], "count": bets.most_common(1)[0][1]}
        assert view["top_player_wins"]["count"] == (wins.most_common(1)[0][1] if wins else 0)
        assert view["top_player_deposits"]["count"] == deposits.most_common(1)[0][1]
        assert set(view) == {"events_total", "events_per_minute", "events_per_second_moving_average",
                             "top_player_bets", "top_player_wins", "top_player_deposits"}
        assert view["events_per_second_moving_average"] > 0


@pytest.mark.services
def test_players_come_from_postgresql_uncached(pg_dsn: str) -> None:
    import asyncpg

    table = "players"
    schema = "casino_" + uuid.uuid4().hex[:8]

    async def sql(*stmts: str) -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            for s in stmts:
                await conn.execute(s)
        finally:
            await conn.close()

    asyncio.run(sql(f"CREATE SCHEMA {schema}",
                    f"CREATE TABLE {schema}.{table} (id bigserial primary key, email text not null, last_signed_in_at timestamptz)",
                    f"INSERT INTO {schema}.{table} VALUES (10, 'john@example.com', now())"))
    svc = RatesService()
    ev = {"id": 1, "player_id": 10, "game_id": 100, "type": "game_start", "created_at": "2022-01-10T12:34:56Z"}
    try:
        with svc.running(), Collector(casino_pipeline(svc.url, players_dsn=pg_dsn, players_schema=schema), workers=1) as c:
            first = c.handle([ev], return_events=True).wait(timeout=30).events[0]  # type: ignore[index]
            assert first.player.email == "john@example.com"
            asyncio.run(sql(f"UPDATE {schema}.{table} SET email = 'changed@example.com' WHERE id = 10"))
            second = c.handle([{**ev, "id": 2}], return_events=True).wait(timeout=30).events[0]  # type: ignore[index]
            assert second.player.email == "changed@example.com"  # read fresh: no cache
            assert "changed@example.com" in second.description
    finally:
        asyncio.run(sql(f"DROP SCHEMA {schema} CASCADE"))


def test_players_from_sqlite_migrated_by_the_cli_uncached(tmp_path: Path) -> None:
    """Embedded defaults with no PostgreSQL: `collector migrate --pack casino --dsn sqlite:///...`."""
    import sqlite3

    db = tmp_path / "players.db"
    run = [sys.executable, "-m", "collector", "migrate", "--pack", "casino", "--dsn", f"sqlite://{db}"]
    r = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "created table players; seeded players 10, 11, 12, 13, 14" in r.stdout
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "up to date" in again.stdout  # a second run changes nothing
    svc = RatesService()
    ev = {"id": 1, "player_id": 11, "game_id": 100, "type": "game_start", "created_at": "2022-01-10T12:34:56Z"}
    with svc.running(), Collector(casino_pipeline(svc.url, players_dsn=f"sqlite://{db}"), workers=1) as c:
        first = c.handle([ev, {**ev, "id": 2, "player_id": 19}], return_events=True).wait(timeout=30).events
        assert first is not None and first[0].player.email == "jane@example.com"
        assert first[1].player is None  # not in the table: the field keeps its zero value
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE players SET email = 'changed@example.com' WHERE id = 11")
        second = c.handle([{**ev, "id": 3}], return_events=True).wait(timeout=30).events
        assert second is not None and second[0].player.email == "changed@example.com"  # read fresh


@pytest.mark.slow
def test_the_daemon_serves_the_casino_pack_with_events_on_stdout(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    err = open(tmp_path / "stderr.log", "wb")  # noqa: SIM115 (closed below)
    out_file = open(tmp_path / "stdout.jsonl", "wb")  # noqa: SIM115 (a file: nobody must read a pipe meanwhile)
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector", "serve", "--pack", "casino", "--port", "0", "--port-file", str(port_file),
         "--data-dir", str(tmp_path / "data"), "--workers", "2"],
        stdout=out_file, stderr=err, start_new_session=True)
    try:
        wait_until(lambda: (port_file.exists() and port_file.read_text().strip()) or proc.poll() is not None, 60,
                   what="the daemon to listen")
        assert proc.poll() is None, (tmp_path / "stderr.log").read_text()[-2000:]
        port = int(port_file.read_text())
        import http.client

        events = generate_casino(200, seed=3)

        def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request(method, path, body=json.dumps(body) if body is not None else None,
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                return r.status, json.loads(r.read())
            finally:
                conn.close()

        for i in range(0, len(events), 100):
            status, body = call("POST", "/events/batch", {"events": events[i:i + 100]})
            assert status == 202 and body["accepted"] == 100, body
        wait_until(lambda: call("GET", "/materialized")[1]["events_total"] == len(events), 10, what="the view")
        status, view = call("GET", "/materialized")
        bets = Counter(e["player_id"] for e in events if e["type"] == "bet")
        assert view["top_player_bets"]["count"] == bets.most_common(1)[0][1]
        status, one = call("GET", "/processor/aggregation?aggregator=events_total")
        assert status == 200 and one["value"] == len(events)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        err.close()
        out_file.close()
    lines = [json.loads(ln) for ln in (tmp_path / "stdout.jsonl").read_text().splitlines() if ln.strip()]
    assert sorted(ln["id"] for ln in lines) == sorted(e["id"] for e in events)  # every event once, on stdout
    assert all(msgspec.convert(ln, CasinoEvent).description == ln["description"] for ln in lines)
    assert proc.returncode == 0
