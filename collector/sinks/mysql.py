"""The ``mysql`` sink: aiomysql into seed 004's ``processed_events`` table, verbatim.

Mapping from an event to a row:

==================== ==========================================================
column               value
==================== ==========================================================
id VARCHAR(36)       the pipeline's id field as text (else a content hash)
type ENUM(...)       the event's ``type`` field (else ``default_type``)
source VARCHAR(50)   the event's ``source`` field (else ``default_source``)
user_id VARCHAR(50)  the event's ``user_id`` field, or NULL
processed_data JSON  the whole event as JSON
processing_time_ms   the event's ``processing_time_ms`` field, or NULL
created_at, processed_at  the server's defaults
==================== ==========================================================

Rows go in as multi-row ``INSERT IGNORE`` statements (``rows_per_insert`` rows each),
one transaction per chunk. ``INSERT IGNORE`` would also turn a bad value into a silent
warning (an unknown ENUM becomes ``''``, a long string is cut); so every row is
checked first, and an event the table cannot hold goes to the dead-letter sink with
the column and the reason. What ``IGNORE`` then skips is only a duplicate id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from operator import attrgetter
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import ConfigError, missing
from ..pipeline import event_type_name
from .base import Batch, DeadLetter, EventCodec, Sink
from .config import MysqlSinkConfig, resolve_dsn

__all__ = ["TABLE_DDL", "TYPES", "MysqlSink"]

log = logging.getLogger("collector.sinks")

TYPES = ("user_action", "sensor_data", "system_log")

# seed 004, as written there (only the table name is configurable)
TABLE_DDL = """CREATE TABLE IF NOT EXISTS {t} (
  id VARCHAR(36) PRIMARY KEY,
  type ENUM('user_action', 'sensor_data', 'system_log') NOT NULL,
  source VARCHAR(50) NOT NULL,
  user_id VARCHAR(50),
  processed_data JSON,
  processing_time_ms INT,
  created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  processed_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,

  INDEX idx_type_created (type, created_at),
  INDEX idx_user_created (user_id, created_at)
)"""


_NO_BACKSLASH_ESCAPES = 512  # SERVER_STATUS_NO_BACKSLASH_ESCAPES (sql_mode of the session)
_NEEDS_ESCAPE = re.compile(r"[\x00\n\r\x1a'\"\\]").search  # what pymysql's escape_string would change


def _quoter(no_backslash_escapes: bool) -> Any:
    """A function quoting a string as a MySQL literal, as pymysql would."""
    from pymysql.converters import escape_string

    if no_backslash_escapes:
        def q(v: str) -> str:
            return "'" + v.replace("'", "''") + "'"
    else:
        def q(v: str) -> str:
            return "'" + (v if _NEEDS_ESCAPE(v) is None else escape_string(v)) + "'"
    return q


def _aiomysql() -> Any:
    try:
        import aiomysql
    except ImportError:
        raise missing("aiomysql", "mysql", "the mysql sink") from None
    return aiomysql


def parse_mysql_dsn(dsn: str) -> dict[str, Any]:
    """``mysql://user:pass@host:port/db?charset=...`` → aiomysql connect arguments."""
    u = urlsplit(dsn)
    if u.scheme not in ("mysql", "mariadb", "mysql+aiomysql"):
        raise ConfigError(f"mysql sink: DSN scheme must be mysql:// (got {u.scheme}://)")
    q = {k: v[-1] for k, v in parse_qs(u.query).items()}
    args: dict[str, Any] = {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 3306,
        "user": unquote(u.username) if u.username else "root",
        "password": unquote(u.password) if u.password else q.pop("password", ""),
        "db": u.path.lstrip("/") or None,
        "charset": q.pop("charset", "utf8mb4"),
    }
    if "unix_socket" in q:
        args["unix_socket"] = q.pop("unix_socket")
    return args


class MysqlSink(Sink):
    """Chunks into ``processed_events`` (see the module docstring for the mapping)."""

    kind = "mysql"

    def __init__(self, config: MysqlSinkConfig, *, name: str, codec: EventCodec, worker: int) -> None:
        super().__init__(config, name=name, codec=codec, worker=worker)
        self.cfg = config
        self.aiomysql = _aiomysql()
        dsn = resolve_dsn(config)
        self.remember_secret(dsn)
        self.connect_args = parse_mysql_dsn(dsn)
        if self.connect_args["password"]:
            self._secrets.append(self.connect_args["password"])
        if config.default_type is not None and config.default_type not in TYPES:
            raise ConfigError(f"mysql sink {name}: default_type must be one of {TYPES} (got {config.default_type!r})")
        for col, default in (("type", config.default_type), ("source", config.default_source)):
            if not codec.has(col) and default is None and codec.event_type is not None:
                raise ConfigError(
                    f"mysql sink {name}: {event_type_name(codec.event_type)} has no {col!r} field and "
                    f"default_{col} is not set (the column is NOT NULL)"
                )
        self.get_type = attrgetter("type") if codec.has("type") else None
        self.get_source = attrgetter("source") if codec.has("source") else None
        self.get_user = attrgetter("user_id") if codec.has("user_id") else None
        self.get_ptime = attrgetter("processing_time_ms") if codec.has("processing_time_ms") else None
        self.pool: Any = None
        self._lock: asyncio.Lock | None = None
        self.insert_head = (
            f"INSERT IGNORE INTO `{config.table}` "
            "(id, type, source, user_id, processed_data, processing_time_ms) VALUES "
        )
        aiomysql = self.aiomysql

        class QuietCursor(aiomysql.Cursor):  # type: ignore[name-defined]
            # duplicate ids are expected (redelivery) and every other value was checked
            # before the insert: skip the SHOW WARNINGS round trip aiomysql would make
            async def _show_warnings(self, conn: Any) -> None:
                return None

        self.cursor_class = QuietCursor

    async def _ensure(self) -> Any:
        if self.pool is not None:
            return self.pool
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.pool is not None:
                return self.pool
            pool = await self.aiomysql.create_pool(
                minsize=1,
                maxsize=self.cfg.pool_size,
                autocommit=False,
                connect_timeout=min(self.cfg.timeout, 10.0),
                pool_recycle=3600,
                cursorclass=self.cursor_class,
                **self.connect_args,
            )
            try:
                if self.cfg.create_table:
                    await self._migrate(pool)
            except BaseException:
                pool.terminate()
                await pool.wait_closed()
                raise
            self.pool = pool
            return pool

    async def _migrate(self, pool: Any) -> list[str]:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = %s", (self.cfg.table,))
            (exists,) = await cur.fetchone()
            if exists:
                await conn.commit()
                return []
            await cur.execute(TABLE_DDL.format(t=f"`{self.cfg.table}`"))
            await conn.commit()
        return [f"create table {self.cfg.table}"]

    async def open(self) -> None:
        """Create the pool and the table; an unreachable server is retried on write."""
        try:
            await self._ensure()
        except (OSError, self.aiomysql.OperationalError, TimeoutError) as e:
            self.healthy = False
            log.warning("sink %s: server not reachable yet (%s); writes will retry", self.name, self.describe_error(e))

    async def migrate(self) -> list[str]:
        """Create the table if it is missing."""
        if self.pool is None:
            pool = await self.aiomysql.create_pool(minsize=1, maxsize=1, cursorclass=self.cursor_class, **self.connect_args)
            try:
                return await self._migrate(pool)
            finally:
                pool.close()
                await pool.wait_closed()
        return await self._migrate(self.pool)

    def rows(self, batch: Batch) -> tuple[list[tuple[Any, ...]], list[DeadLetter]]:
        """The rows of a chunk, and dead-letter records for events the table cannot hold."""
        events = batch.events
        n = len(events)
        cfg = self.cfg
        types = list(map(self.get_type, events)) if self.get_type else [cfg.default_type] * n
        sources = list(map(self.get_source, events)) if self.get_source else [cfg.default_source] * n
        users = list(map(self.get_user, events)) if self.get_user else [None] * n
        ptimes = list(map(self.get_ptime, events)) if self.get_ptime else [None] * n
        ids, texts = batch.ids, batch.texts
        rows: list[tuple[Any, ...]] = []
        bad: list[DeadLetter] = []
        now = time.time()
        for i in range(n):
            t, s, u, p, k = types[i], sources[i], users[i], ptimes[i], ids[i]
            if type(k) is not str:
                k = str(k)  # the id column is VARCHAR(36)
            if t is None:
                t = cfg.default_type
            if s is None:
                s = cfg.default_source
            why = None
            if t not in TYPES:
                why = ("$.type", f"type {t!r} is not one of {', '.join(TYPES)}")
            elif not isinstance(s, str) or len(s) > 50:
                why = ("$.source", "source must be a string of at most 50 characters")
            elif u is not None and (not isinstance(u, str) or len(u) > 50):
                if isinstance(u, int) and len(str(u)) <= 50:
                    u = str(u)
                else:
                    why = ("$.user_id", "user_id must be a string of at most 50 characters")
            elif len(k) > 36:
                why = ("$.id", "id must be at most 36 characters")
            elif p is not None and not (isinstance(p, int | float) and -(2**31) <= p < 2**31):
                why = ("$.processing_time_ms", "processing_time_ms must be a number that fits INT")
            if why is not None:
                bad.append(DeadLetter(texts[i], why[1], why[0], f"sink:{self.name}", now, self.worker))
                continue
            rows.append((k, t, s, u, texts[i], None if p is None else int(p)))
        return rows, bad

    def statements(self, rows: list[tuple[Any, ...]], no_backslash_escapes: bool) -> list[str]:
        """Multi-row ``INSERT IGNORE`` statements for ``rows``, values escaped here.

        aiomysql's ``executemany`` escapes every value in Python one character at a
        time (``str.translate``): it was 80 % of a worker's time in this sink
        (measured with py-spy). The JSON column holds msgspec's output, in which no raw
        control character can occur, so only the backslash and the quote need escaping:
        two ``str.replace`` calls in C. Other strings take the fast path when a regex
        finds nothing to escape, else pymysql's own escaping.
        """
        q = _quoter(no_backslash_escapes)
        if no_backslash_escapes:
            def qjson(j: str) -> str:
                return "'" + j.replace("'", "''") + "'"
        else:
            def qjson(j: str) -> str:
                return "'" + j.replace("\\", "\\\\").replace("'", "\\'") + "'"
        step = self.cfg.rows_per_insert
        out = []
        for start in range(0, len(rows), step):
            values = [
                f"({q(k)},{q(t)},{q(s)},{'NULL' if u is None else q(u)},{qjson(j)},{'NULL' if p is None else p})"
                for k, t, s, u, j, p in rows[start : start + step]
            ]
            out.append(self.insert_head + ",".join(values))
        return out

    async def write(self, batch: Batch) -> list[DeadLetter] | None:
        """Insert the chunk in one transaction; returns the events it cannot hold."""
        rows, bad = self.rows(batch)
        if rows:
            pool = await self._ensure()
            async with pool.acquire() as conn:
                try:
                    nobs = bool(conn.server_status & _NO_BACKSLASH_ESCAPES)
                    async with conn.cursor() as cur:
                        for sql in self.statements(rows, nobs):
                            await cur.execute(sql)  # no args: aiomysql does not touch the text
                    await conn.commit()
                except BaseException:
                    # a failed or cancelled statement leaves the connection in an unknown
                    # state: close it so the pool does not hand it out again (quietly:
                    # a close that fails must not hide the write's error)
                    with contextlib.suppress(Exception):
                        conn.close()
                    raise
        return bad or None

    def is_data_error(self, e: BaseException) -> bool:
        """A value or constraint the server refuses (``DataError``, ``IntegrityError``)."""
        from pymysql.err import DataError, IntegrityError

        return isinstance(e, DataError | IntegrityError)

    async def health(self) -> bool:
        """``SELECT 1`` through the pool."""
        try:
            pool = await self._ensure()
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute("SELECT 1")
                await cur.fetchone()
            return True
        except Exception:
            return False

    async def close(self) -> None:
        """Close the pool."""
        if self.pool is not None:
            pool, self.pool = self.pool, None
            pool.close()
            await pool.wait_closed()
