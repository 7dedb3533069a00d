"""The casino pack (seed 001): casino events enriched with EUR amounts, player rows and a
description, counted into seed 001's ``/materialized`` view, logged to standard output.

::

    CasinoEvent (validated) ─► Enrich: amount_eur ◄─ rates source (exchangerate.host format,
                                                      table reused ≤ 60 s)
                                       player     ◄─ PostgreSQL ``players`` (never cached: one
                                                      query per chunk), or the seed rows in memory
                             ─► Render description (templates per type, game titles)
                             ─► Aggregates: events_total, rates, top players ─► /materialized
                             ─► stdout sink: one JSON object per line, the event's own keys

Built only from the generic parts (a Struct, sources, a Render stage, Aggregate stages,
a View): a new domain costs no engine change. Sharded by ``player_id``, so the top-player
aggregates are exact.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec

from ..errors import ConfigError
from ..pipeline import Lookup, Pipeline
from ..stages import Enrich, Render
from ..stages.materialized import seed001
from ..template import compile_template

__all__ = [
    "CURRENCIES",
    "GAMES",
    "TEMPLATES",
    "CasinoEvent",
    "CasinoOptions",
    "Player",
    "builtin_rates_url",
    "casino_pipeline",
    "describe",
    "generate_casino",
    "migrate",
    "pack_pipeline",
    "seed_players",
]

GAMES: dict[int, str] = {
    100: "Rocket Dice", 101: "It's bananas!", 102: "Wild Spin", 103: "Book of Dead", 104: "Pirate Jackpots",
    105: "Western Gold 2", 106: "Super Rainbow Megaways", 107: "#BarsAndBells", 108: "Fortune Three",
    109: "ChilliPop",
}
CURRENCIES = ("EUR", "USD", "GBP", "NZD", "BTC")
EventType = Literal["game_start", "bet", "deposit", "game_stop"]
Currency = Literal["EUR", "USD", "GBP", "NZD", "BTC"]


class Player(msgspec.Struct, omit_defaults=True):
    """A row of the ``players`` table (seed 001)."""

    id: int = 0
    email: str = ""
    last_signed_in_at: datetime | None = None


class CasinoEvent(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Seed 001's event, with its JSON keys; zero values are omitted on output, as the
    original's ``omitempty`` does (``game_id``, ``has_won``, ``amount_eur``, ``player``)."""

    id: int
    player_id: int
    type: EventType
    created_at: str  # RFC 3339; the seed's "+00" offsets are accepted too, and kept as sent
    game_id: int = 0
    amount: int = 0
    currency: Currency | None = None
    has_won: bool = False
    amount_eur: int = 0
    player: Player | None = None
    description: str = ""

    def __post_init__(self) -> None:
        try:
            datetime.fromisoformat(self.created_at)
        except ValueError:
            raise ValueError(f"created_at {self.created_at!r} is not an RFC 3339 timestamp") from None
        if self.type in ("bet", "deposit"):
            if self.currency is None:
                raise ValueError(f"a {self.type} needs a currency (one of {', '.join(CURRENCIES)})")
            if self.amount <= 0:
                raise ValueError(f"a {self.type} needs a positive amount in minor units")
        if self.type != "deposit" and not self.game_id:
            raise ValueError(f"a {self.type} needs a game_id")
        if self.has_won and self.type != "bet":
            raise ValueError("has_won applies to bets only")


# Descriptions in the seed's style. game_stop and won bets are not in the seed; their
# wording follows the same pattern. The EUR amount is shown for other currencies only,
# and the e-mail only for known players.
_WHO = "Player #{player_id}[ ({player.email})]"
_WHEN = "on {created_at:date}."
_MONEY = "{amount:money:currency}[currency!=EUR| ({amount_eur:money:EUR})]"
TEMPLATES: dict[str, str] = {
    "game_start": f'{_WHO} started playing a game "{{game_id:map:games}}" {_WHEN}',
    "game_stop": f'{_WHO} stopped playing a game "{{game_id:map:games}}" {_WHEN}',
    "bet": f'{_WHO} placed a bet of {_MONEY} on a game "{{game_id:map:games}}"[has_won==True| and won] {_WHEN}',
    "deposit": f"{_WHO} made a deposit of {_MONEY} {_WHEN}",
}
_compiled = {k: compile_template(t, {"games": GAMES}, name=f"casino {k}") for k, t in TEMPLATES.items()}


def describe(event: Any) -> str:
    """The seed's human-friendly description of one event (enriched or not)."""
    return _compiled[event.type if not isinstance(event, dict) else event["type"]](event)


class CasinoOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[pipeline.options]`` of the casino pack."""

    rates_url: str = ""  # empty: the built-in rates service, started in the daemon
    rates_max_age: float = 60.0
    players_dsn: str = ""  # PostgreSQL DSN, or sqlite:///path.db, with a players table; empty: the seed rows in memory
    players_dsn_env: str = ""
    players_schema: str = "public"
    stdout: bool = True  # log final events to standard output


# the seeded players (casino-facts.md): id -> (e-mail, last sign-in this long before the seeding)
SEED_PLAYERS: dict[int, tuple[str, timedelta]] = {
    10: ("john@example.com", timedelta(hours=1)), 11: ("jane@example.com", timedelta(hours=3)),
    12: ("bob@example.com", timedelta(days=2)), 13: ("rick@example.com", timedelta(hours=5)),
    14: ("morty@example.com", timedelta(days=1)),
}


def seed_players(now: datetime | None = None) -> dict[int, dict[str, Any]]:
    """The five seeded players, signed in 1 h, 3 h, 2 days, 5 h and 1 day before ``now``."""
    now = now or datetime.now(UTC)
    return {i: {"id": i, "email": email, "last_signed_in_at": (now - ago).isoformat()}
            for i, (email, ago) in SEED_PLAYERS.items()}


async def migrate(dsn: str, schema: str = "public") -> list[str]:
    """``collector migrate --pack casino``: create ``schema`` and its ``players`` table if
    missing and insert the seed players that are not there (their last sign-in relative to
    the database's ``now()``). Returns the steps applied: empty when all was in place.
    ``sqlite:///path.db`` creates the file and the table there instead (no schema)."""
    if dsn.startswith("sqlite:"):
        return _migrate_sqlite(dsn)
    import asyncpg

    q = '"' + schema.replace('"', '""') + '"'
    table = f"{q}.players"
    steps: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            if not await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q}")
                steps.append(f"created schema {schema}")
            if await conn.fetchval("SELECT to_regclass($1)", table) is None:
                await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id bigserial primary key, "
                                   "email text not null, last_signed_in_at timestamptz)")
                steps.append(f"created table {schema}.players")
            ids = list(SEED_PLAYERS)
            added = await conn.fetch(
                f"INSERT INTO {table} (id, email, last_signed_in_at) "
                "SELECT i, e, now() - a FROM unnest($1::bigint[], $2::text[], $3::interval[]) AS s(i, e, a) "
                "ON CONFLICT (id) DO NOTHING RETURNING id",
                ids, [SEED_PLAYERS[i][0] for i in ids], [SEED_PLAYERS[i][1] for i in ids])
            if added:
                # the serial goes on after the seeded ids, so a plain INSERT does not collide
                await conn.execute(f"SELECT setval(pg_get_serial_sequence($1, 'id'), (SELECT max(id) FROM {table}))",
                                   table)
                steps.append("seeded players " + ", ".join(str(r["id"]) for r in sorted(added, key=lambda r: r["id"])))
    finally:
        await conn.close()
    return steps


def _migrate_sqlite(dsn: str) -> list[str]:
    """``migrate`` for a SQLite file: the same table and seed rows (times as ISO 8601 text)."""
    import sqlite3

    from ..sources.sql import sqlite_path

    path = sqlite_path(dsn)
    steps: list[str] = []
    if not os.path.exists(path):
        steps.append(f"created {path}")
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'players'").fetchone() is None:
            conn.execute("CREATE TABLE players (id INTEGER PRIMARY KEY, email TEXT NOT NULL, last_signed_in_at TEXT)")
            steps.append("created table players")
        rows = seed_players()
        have = {r[0] for r in conn.execute("SELECT id FROM players")}
        new = [r for i, r in rows.items() if i not in have]
        conn.executemany("INSERT INTO players (id, email, last_signed_in_at) VALUES (:id, :email, :last_signed_in_at)", new)
        if new:
            steps.append("seeded players " + ", ".join(str(r["id"]) for r in new))
    return steps


def casino_pipeline(
    rates_url: str,
    *,
    players_dsn: str = "",
    players_dsn_env: str = "",
    players_schema: str = "public",
    rates_max_age: float = 60.0,
    sinks: tuple[Any, ...] = (),
    deadletter: Any = None,
    window: float = 60.0,
) -> Pipeline:
    """Seed 001's pipeline on ``rates_url`` and PostgreSQL ``players`` (or the seed rows)."""
    from ..sources.config import RatesSourceConfig

    rates = RatesSourceConfig(url=rates_url, max_age=rates_max_age)
    columns = ("id", "email", "last_signed_in_at")
    if players_dsn.startswith("sqlite:"):
        from ..sources.config import SqliteSourceConfig

        players: Any = SqliteSourceConfig(name="players", dsn=players_dsn, table="players", columns=columns)
    elif players_dsn or players_dsn_env:
        from ..sources.config import PostgresSourceConfig

        players = PostgresSourceConfig(
            name="players", dsn=players_dsn, dsn_env=players_dsn_env, table="players", schema=players_schema,
            columns=columns)
    else:
        from ..sources.config import MapSourceConfig

        players = MapSourceConfig(name="players", data=seed_players())
    aggs, view = seed001()
    return Pipeline(
        name="casino",
        event_type=CasinoEvent,
        key="player_id",
        id_field="id",
        lookups=(
            Lookup(name="amount_eur", key="currency", key_fields=("amount",), target="amount_eur", source=rates),
            # seed 001: "log that it's missing and leave the field as zero-value": one line
            # per event (rate-limited), not one per key and chunk
            Lookup(name="player", key="player_id", target="player", source=players, on_failure="keep", log=True),
        ),
        stages=(
            Enrich(),
            Render(target="description", by="type", templates=TEMPLATES, maps={"games": GAMES}),
            *aggs,
        ),
        views=(view,),
        sinks=sinks,
        deadletter=deadletter,
    )


def pack_pipeline(cfg: Any, sinks: tuple[Any, ...], deadletter: Any) -> Pipeline:
    """``[pipeline] pack = "casino"``: :func:`casino_pipeline` from ``[pipeline.options]``."""
    try:
        opts = msgspec.convert(getattr(cfg, "options", None) or {}, CasinoOptions)
    except msgspec.ValidationError as e:
        raise ConfigError(f"`$.pipeline.options`: {e} (casino options: {', '.join(CasinoOptions.__struct_fields__)})") from None
    url = opts.rates_url or builtin_rates_url()
    if opts.stdout:
        from ..sinks import StdoutSinkConfig

        sinks = (StdoutSinkConfig(), *sinks) if not any(type(s) is StdoutSinkConfig for s in sinks) else sinks
    return casino_pipeline(url, players_dsn=opts.players_dsn, players_dsn_env=opts.players_dsn_env,
                           players_schema=opts.players_schema, rates_max_age=opts.rates_max_age, sinks=sinks, deadletter=deadletter)


def builtin_rates_url() -> str:
    """The URL of the built-in deterministic rates service, started in this process on
    first use on a free 127.0.0.1 port and kept for the process's life (no internet)."""
    from ..sources.rates import RatesService

    return RatesService.shared().url


def generate_casino(n: int, *, seed: int = 0, start_id: int = 1) -> list[dict[str, Any]]:
    """``n`` events as the seed's generator makes them (players 10 to 19, games 100 to 109, ...)."""
    rnd = random.Random(seed)
    out = []
    now = time.time()
    for i in range(n):
        t = rnd.choice(("game_start", "bet", "deposit", "game_stop"))
        ev: dict[str, Any] = {"id": start_id + i, "player_id": rnd.randint(10, 19), "type": t,
                              "created_at": datetime.fromtimestamp(now + i * 0.05, UTC).isoformat()}
        if t != "deposit":
            ev["game_id"] = rnd.randint(100, 109)
        if t in ("bet", "deposit"):
            cur = rnd.choice(CURRENCIES)
            ev["currency"] = cur
            ev["amount"] = rnd.randint(1, 99_999 if cur == "BTC" else 1_999)
        if t == "bet" and rnd.random() < 0.05:
            ev["has_won"] = True
        out.append(ev)
    return out
