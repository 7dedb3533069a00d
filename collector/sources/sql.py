"""The ``postgres`` (asyncpg), ``mysql`` (aiomysql) and ``sqlite`` kinds: one query per batch of keys.

::

    distinct keys of a chunk ─► SELECT key, cols FROM table WHERE key = ANY($1)   (postgres)
                                SELECT key, cols FROM table WHERE key IN (...)     (mysql, sqlite)
                             ─► {key: value}: one value column gives a scalar, several a dict

Never one query per event: the runtime hands a chunk's distinct misses in calls of at
most ``max_keys`` keys. Connections are pooled (``pool_size`` per worker), created
inside the worker's loop (SQLite: one read-only connection on a thread of the source's
own, the stdlib driver being blocking). A query that fails because its connection was dropped
(server restart, idle kill, ``pg_terminate_backend``) is sent once more on a fresh
connection before it counts as failed. SQL sources are uncached by default (seed 001:
"DB results may not be cached"), so every chunk sees the rows as they are; autocommit
keeps MySQL from reading an old snapshot. DSNs are never logged (``describe`` redacts).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec

from ..errors import ConfigError, missing
from ..sinks.config import redact_dsn
from .base import Source
from .config import MysqlSourceConfig, PostgresSourceConfig, SqliteSourceConfig

__all__ = ["MysqlSource", "PostgresSource", "SqliteSource", "sqlite_path"]

log = logging.getLogger("collector.sources")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class _SqlSource(Source):
    """What the two SQL kinds share: DSN, query text, row → value, retry on a dropped link."""

    quote = '"'
    keys_clause = "= ANY($1)"  # postgres: the keys as one array parameter
    default_dsn = ""
    lost: tuple[type[BaseException], ...] = (ConnectionError, OSError)

    def __init__(self, config: Any = None, /, **fields: Any) -> None:
        super().__init__(config, **fields)
        cfg = self.config
        self.pool: Any = None
        self.queries = 0  # queries sent (for tests and stats)
        self.reconnects = 0  # queries sent again after a dropped connection
        cols = cfg.columns
        if not cfg.query:
            for ident in (cfg.table, cfg.key_column, *cols):
                if not _IDENT.match(ident):
                    raise ConfigError(f"{self.kind} source: {ident!r} is not a plain SQL identifier")
            if not cols:
                raise ConfigError(f"{self.kind} source: set `columns` (or a `query`)")
        self.sql = cfg.query or self.build_query()

    def q(self, ident: str) -> str:
        """``ident`` quoted (it matched the plain-identifier pattern)."""
        return f"{self.quote}{ident}{self.quote}"

    def table(self) -> str:
        """The quoted table name."""
        return self.q(self.config.table)

    def build_query(self) -> str:
        """The SELECT for ``table``/``key_column``/``columns``."""
        c = self.config
        cols = ", ".join(self.q(x) for x in c.columns)
        key = self.q(c.key_column)
        return f"SELECT {key}, {cols} FROM {self.table()} WHERE {key} {self.keys_clause}"

    @property
    def dsn(self) -> str:
        """``$<dsn_env>``, else ``dsn``."""
        cfg = self.config
        dsn = (os.environ.get(cfg.dsn_env) if cfg.dsn_env else None) or cfg.dsn or self.default_dsn
        if not dsn:
            raise ConfigError(f"{self.kind} source: set `dsn` or `dsn_env`")
        return dsn

    @property
    def max_batch(self) -> int:
        return int(self.config.max_keys)

    def values(self, rows: list[Any]) -> dict[Any, Any]:
        """Rows (key first, then the value columns) → ``{key: value}``."""
        out: dict[Any, Any] = {}
        for row in rows:
            items = list(row.items()) if hasattr(row, "items") else list(enumerate(row))
            if len(items) == 2:
                out[items[0][1]] = items[1][1]
            else:
                out[items[0][1]] = {k: v for k, v in items[1:]}
        return out

    async def get_many(self, keys: Sequence[Any]) -> dict[Any, Any]:
        """One query for ``keys``; a dropped connection is replaced once."""
        try:
            return self.values(await self.fetch(list(keys)))
        except self.lost as e:
            log.info("%s: connection lost (%s); retrying on a fresh one", self.describe(), type(e).__name__)
            self.reconnects += 1
            return self.values(await self.fetch(list(keys)))

    async def fetch(self, keys: list[Any]) -> list[Any]:
        """The rows for ``keys``."""
        raise NotImplementedError

    async def health(self) -> dict[str, Any]:
        """``ok`` when one query for no key runs."""
        await self.fetch([])
        return {"kind": self.kind, "ok": True, "queries": self.queries, "reconnects": self.reconnects}

    def describe(self) -> str:
        try:
            return f"{self.kind} {redact_dsn(self.dsn)}"
        except ConfigError:
            return self.kind


class PostgresSource(_SqlSource):
    """``PostgresSource(dsn=..., table="players", columns=("email", "last_signed_in_at"))``."""

    kind = "postgres"
    Config = PostgresSourceConfig

    def __init__(self, config: Any = None, /, **fields: Any) -> None:
        try:
            import asyncpg
        except ImportError:
            raise missing("asyncpg", "postgres", "the postgres source") from None
        self.asyncpg = asyncpg
        self.lost = (
            ConnectionError,
            OSError,
            asyncpg.exceptions.ConnectionDoesNotExistError,
            asyncpg.exceptions.InterfaceError,
            asyncpg.exceptions.AdminShutdownError,
            asyncpg.exceptions.CannotConnectNowError,
        )
        super().__init__(config, **fields)

    def table(self) -> str:
        return f"{self.q(self.config.schema)}.{self.q(self.config.table)}"

    async def fetch(self, keys: list[Any]) -> list[Any]:
        if self.pool is None:
            self.pool = await self.asyncpg.create_pool(self.dsn, min_size=0, max_size=self.config.pool_size)
        self.queries += 1
        async with self.pool.acquire() as conn:
            try:
                return await conn.fetch(self.sql, keys)
            except Exception as e:
                if conn.is_closed() and not isinstance(e, self.lost):
                    raise ConnectionError(f"connection lost: {type(e).__name__}: {e}") from e
                raise

    async def close(self) -> None:
        if self.pool is not None:
            p, self.pool = self.pool, None
            await p.close()


class MysqlSource(_SqlSource):
    """``MysqlSource(dsn="mysql://root@127.0.0.1/test", table="players", columns=("email",))``."""

    kind = "mysql"
    Config = MysqlSourceConfig
    quote = "`"
    keys_clause = "IN ({keys})"  # one placeholder per key, written at query time

    def __init__(self, config: Any = None, /, **fields: Any) -> None:
        try:
            import aiomysql
            import pymysql
        except ImportError:
            raise missing("aiomysql", "mysql", "the mysql source") from None
        self.aiomysql = aiomysql
        self.lost = (ConnectionError, OSError, pymysql.err.OperationalError, pymysql.err.InterfaceError)
        super().__init__(config, **fields)

    async def fetch(self, keys: list[Any]) -> list[Any]:
        if self.pool is None:
            u = urlsplit(self.dsn)
            self.pool = await self.aiomysql.create_pool(
                host=u.hostname or "127.0.0.1",
                port=u.port or 3306,
                user=unquote(u.username or "root"),
                password=unquote(u.password or ""),
                db=u.path.lstrip("/") or None,
                minsize=0,
                maxsize=self.config.pool_size,
                autocommit=True,
                cursorclass=self.aiomysql.DictCursor,
            )
        self.queries += 1
        conn = await self.pool.acquire()
        try:
            async with conn.cursor() as cur:
                # one %s per key: the driver quotes each value
                marks = ", ".join(["%s"] * len(keys)) or "NULL"
                await cur.execute(self.sql.replace("{keys}", marks), keys)
                rows = await cur.fetchall()
        except self.lost:
            conn.close()  # a broken connection is not given back to the pool
            raise
        finally:
            self.pool.release(conn)
        return list(rows)

    async def close(self) -> None:
        if self.pool is not None:
            p, self.pool = self.pool, None
            p.close()
            await p.wait_closed()


def sqlite_path(dsn: str) -> str:
    """The file of a ``sqlite:///path`` DSN (or of a plain path)."""
    return dsn[len("sqlite://"):] if dsn.startswith("sqlite://") else dsn


def _dict_row(cur: Any, row: tuple[Any, ...]) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cur.description, row, strict=True)}


class SqliteSource(_SqlSource):
    """``SqliteSource(dsn="sqlite:///var/lib/collector/players.db", table="players", columns=(...))``.

    Read-only (``mode=ro``): the source never creates the file or takes a write lock, so
    the process that owns the database writes on while workers read fresh rows.
    """

    kind = "sqlite"
    Config = SqliteSourceConfig
    # the keys as one JSON array parameter: one statement text for any number of keys
    # (SQLite caches it prepared) and no limit on bound variables; a ``query`` writes
    # ``IN ({keys})`` for the same
    keys_clause = "IN ({keys})"
    _KEYS = "SELECT value FROM json_each(?)"

    def __init__(self, config: Any = None, /, **fields: Any) -> None:
        import sqlite3

        self.sqlite3 = sqlite3
        self.lost = (sqlite3.OperationalError,)  # locked, file replaced: once more on a new connection
        self.conn: Any = None
        self.executor: ThreadPoolExecutor | None = None
        super().__init__(config, **fields)
        self.statement = self.sql.replace("{keys}", self._KEYS)

    def _query(self, keys: list[Any]) -> list[Any]:
        """On the source's thread: the rows for ``keys``."""
        if self.conn is None:
            path = sqlite_path(self.dsn)
            if not os.path.exists(path):
                raise ConfigError(f"sqlite source: no database at {path} (create it: collector migrate)")
            self.conn = self.sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            self.conn.row_factory = _dict_row
        try:
            return list(self.conn.execute(self.statement, (_json_text(keys),)).fetchall())
        except self.lost:
            self.conn.close()
            self.conn = None
            raise

    async def fetch(self, keys: list[Any]) -> list[Any]:
        if self.executor is None:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="collector-sqlite")
        self.queries += 1
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._query, keys)

    async def close(self) -> None:
        ex, self.executor = self.executor, None
        if ex is None:
            return
        conn, self.conn = self.conn, None
        if conn is not None:  # closed on its own thread, without blocking the loop
            await asyncio.get_running_loop().run_in_executor(ex, conn.close)
        ex.shutdown(wait=False)


def _json_text(keys: list[Any]) -> str:
    return msgspec.json.encode(keys).decode()
