"""The ``postgres`` sink: asyncpg, binary COPY straight into the table, idempotent on the id.

::

    chunk ─► COPY (binary) ─► table ─► COMMIT                                  the normal case
               └─ unique violation (some ids are stored already) ─► ROLLBACK, then:
    chunk ─► COPY (binary) ─► pg_temp.stage ─► INSERT INTO table SELECT ... ON CONFLICT (id) DO NOTHING ─► COMMIT

One transaction per chunk, so a chunk is stored whole or not at all. A chunk whose
ids are all new (every chunk, unless a worker died or a commit's answer was lost) is
one COPY into the table: the staging round costs a second write of every row and
halved the throughput (measured). A chunk that meets an id already stored (a
redelivery after a worker died, a retry whose commit did go through, a replay) fails
on the primary key, is rolled back, and goes through the staging table with
``ON CONFLICT (id) DO NOTHING``, as do the next few chunks of that sink (redeliveries
come in runs). The staging table is per connection, ``ON COMMIT DELETE ROWS``. Table::

    id           BIGINT or TEXT PRIMARY KEY   -- the pipeline's id field, else a content hash
    event        JSONB NOT NULL               -- the event, nested data included
    inserted_at  TIMESTAMPTZ NOT NULL DEFAULT now()

Migrations are numbered steps recorded in ``collector_migrations`` and applied under
an advisory lock, so many workers opening at once apply each step exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ..errors import missing
from .base import Batch, EventCodec, Sink
from .config import PostgresSinkConfig, resolve_dsn

__all__ = ["MIGRATIONS", "STAGED_AFTER_CONFLICT", "PostgresSink"]

STAGED_AFTER_CONFLICT = 16  # chunks written through staging after one met a stored id

log = logging.getLogger("collector.sinks")

# (version, description, SQL); {t} is the qualified table, {idtype} the id column type.
# Append new steps; never edit an applied one.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "create table",
        "CREATE TABLE IF NOT EXISTS {t} (id {idtype} PRIMARY KEY, event JSONB NOT NULL, "
        "inserted_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    ),
]


def _asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise missing("asyncpg", "postgres", "the postgres sink") from None
    return asyncpg


class PostgresSink(Sink):
    """Chunks into a PostgreSQL table (see the module docstring)."""

    kind = "postgres"

    def __init__(self, config: PostgresSinkConfig, *, name: str, codec: EventCodec, worker: int) -> None:
        super().__init__(config, name=name, codec=codec, worker=worker)
        self.cfg = config
        self.asyncpg = _asyncpg()  # fail at build time, with the extra's name
        self.dsn = resolve_dsn(config)
        self.remember_secret(self.dsn)
        self.pool: Any = None
        self._lock: asyncio.Lock | None = None
        self._staged_left = 0  # chunks still to write through staging (after a conflict)
        self.conflicts = 0  # chunks that met an id already stored
        self.idtype = "BIGINT" if codec.id_kind == "int" else "TEXT"
        self.qtable = f'"{config.schema}"."{config.table}"'
        self.stage = f"collector_stage_{config.table}"
        self.insert_sql = (
            f"INSERT INTO {self.qtable} (id, event) SELECT id, event FROM pg_temp.{self.stage} "
            "ON CONFLICT (id) DO NOTHING"
        )

    async def _init_conn(self, conn: Any) -> None:
        # per-connection staging table; emptied by every commit
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {self.stage} (id {self.idtype}, event JSONB) ON COMMIT DELETE ROWS"
        )

    async def _ensure(self) -> Any:
        if self.pool is not None:
            return self.pool
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # concurrent first writes build one pool, not several
            if self.pool is not None:
                return self.pool
            pool = await self.asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.cfg.pool_size,
                init=self._init_conn,
                command_timeout=self.cfg.timeout,
                timeout=min(self.cfg.timeout, 10.0),
            )
            try:
                if self.cfg.create_table:
                    await self._migrate(pool)
            except BaseException:
                pool.terminate()
                raise
            self.pool = pool
            return pool

    async def _migrate(self, pool: Any) -> list[str]:
        applied = []
        async with pool.acquire() as conn, conn.transaction():
            # many workers open at once: one applies the steps, the others then see them
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('collector_migrations'))")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS collector_migrations (target TEXT NOT NULL, version INT NOT NULL, "
                "description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now(), "
                "PRIMARY KEY (target, version))"
            )
            target = f"{self.cfg.schema}.{self.cfg.table}"
            done = {r[0] for r in await conn.fetch("SELECT version FROM collector_migrations WHERE target = $1", target)}
            for version, desc, sql in MIGRATIONS:
                if version in done:
                    continue
                await conn.execute(sql.format(t=self.qtable, idtype=self.idtype))
                await conn.execute(
                    "INSERT INTO collector_migrations (target, version, description) VALUES ($1, $2, $3)",
                    target, version, desc,
                )
                applied.append(f"{target} v{version}: {desc}")
        return applied

    async def open(self) -> None:
        """Create the pool and migrate; an unreachable server is retried on write."""
        try:
            await self._ensure()
        except (OSError, self.asyncpg.PostgresConnectionError, TimeoutError) as e:
            self.healthy = False
            log.warning("sink %s: server not reachable yet (%s); writes will retry", self.name, self.describe_error(e))

    async def migrate(self) -> list[str]:
        """Apply the migrations this table has not had yet; the steps applied."""
        if self.pool is None:
            pool = await self.asyncpg.create_pool(self.dsn, min_size=1, max_size=1, init=self._init_conn)
            try:
                return await self._migrate(pool)
            finally:
                await pool.close()
        return await self._migrate(self.pool)

    async def write(self, batch: Batch) -> None:
        """Store the chunk in one transaction: COPY into the table, or through staging after a conflict."""
        pool = await self._ensure()
        records = list(zip(batch.ids, batch.texts, strict=True))
        async with pool.acquire() as conn:
            try:
                if self._staged_left <= 0:
                    try:
                        async with conn.transaction():
                            await conn.copy_records_to_table(
                                self.cfg.table, records=records, columns=("id", "event"), schema_name=self.cfg.schema
                            )
                        return
                    except self.asyncpg.UniqueViolationError:
                        # rolled back whole; the chunk (and the next few) take the staging path
                        self.conflicts += 1
                        self._staged_left = STAGED_AFTER_CONFLICT
                self._staged_left -= 1
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        self.stage, records=records, columns=("id", "event"), schema_name="pg_temp"
                    )
                    await conn.execute(self.insert_sql)
            except BaseException as e:
                # a connection that failed mid-COPY (or was cancelled by the attempt's
                # timeout) is in an unknown state: drop it rather than return it (an
                # error the server reported leaves it usable, rolled back). When the
                # server went away asyncpg may already have detached it from the pool
                # proxy, and terminate() then raises: that must not hide the error
                if not isinstance(e, self.asyncpg.PostgresError):
                    with contextlib.suppress(Exception):
                        conn.terminate()
                raise

    def is_data_error(self, e: BaseException) -> bool:
        """A data exception (SQLSTATE class 22, e.g. a NUL character JSONB cannot hold) or a constraint violation."""
        a = self.asyncpg
        return isinstance(e, a.DataError | a.IntegrityConstraintViolationError)

    async def health(self) -> bool:
        """``SELECT 1`` through the pool."""
        try:
            pool = await self._ensure()
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
            return True
        except Exception:
            return False

    async def close(self) -> None:
        """Close the pool (waits for connections in use)."""
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await pool.close()
            except Exception:
                pool.terminate()
