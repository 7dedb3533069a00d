"""The ``sqlite`` sink: the embedded default. stdlib ``sqlite3`` on a private thread.

Table layout (``{table}``)::

    id           INTEGER or TEXT PRIMARY KEY   -- the pipeline's id field, else a content hash
    event        TEXT NOT NULL                 -- the event as JSON, with its own keys
    inserted_at  TEXT DEFAULT CURRENT_TIMESTAMP
    <field>      VIRTUAL GENERATED column = json_extract(event, '$.<field>')
                 for every top-level int/float/str/bool field of the event type

Only ``id`` and ``event`` are written: the typed columns are *virtual* generated
columns, so they cost nothing on insert, can be indexed, and a new scalar field in
the event type is one ``ALTER TABLE ... ADD COLUMN`` (the migration adds it).

One transaction per chunk (``executemany`` of ``INSERT ... ON CONFLICT(id) DO
NOTHING``), WAL journal. ``synchronous=NORMAL``: a committed chunk survives a crash of
the process; the last commits before a power loss can be lost. ``FULL`` fsyncs the
WAL on every commit and survives that too, at a cost per chunk.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor

from .base import Batch, EventCodec, Sink
from .config import SqliteSinkConfig

__all__ = ["SqliteSink"]

_AFFINITY = {"int": "INTEGER", "bool": "INTEGER", "float": "REAL", "str": "TEXT"}
_RESERVED = {"id", "event", "inserted_at", "rowid", "oid", "_rowid_"}


class SqliteSink(Sink):
    """Chunks into a SQLite table (see the module docstring for the layout)."""

    kind = "sqlite"

    def __init__(self, config: SqliteSinkConfig, *, name: str, codec: EventCodec, worker: int) -> None:
        super().__init__(config, name=name, codec=codec, worker=worker)
        self.cfg = config
        self.path = config.path.replace("{worker}", str(worker))
        # sqlite3 connections belong to one thread: every call runs on this one
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"collector-sink-{name}")
        self.db: sqlite3.Connection | None = None
        t = config.table
        self.insert_sql = f'INSERT INTO "{t}" (id, event) VALUES (?, ?) ON CONFLICT(id) DO NOTHING'

    # -- blocking parts, on the sink's thread
    def _connect(self) -> sqlite3.Connection:
        if self.db is None:
            d = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(d, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=self.cfg.busy_timeout, isolation_level=None, check_same_thread=False
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={self.cfg.synchronous}")
                db.execute(f"PRAGMA busy_timeout={int(self.cfg.busy_timeout * 1000)}")
                if self.cfg.create_table:
                    self._migrate(db)
            except BaseException:
                db.close()
                raise
            self.db = db
        return self.db

    def columns(self) -> list[tuple[str, str, str]]:
        """The typed columns: (column, SQL type, JSON path)."""
        cols = []
        for attr, key, kind in self.codec.fields:
            if kind is None or attr in _RESERVED or attr == self.codec.id_field:
                continue
            cols.append((attr, _AFFINITY[kind], "$." + key.replace('"', "")))
        return cols

    def _migrate(self, db: sqlite3.Connection) -> list[str]:
        t = self.cfg.table
        applied = []
        idtype = "INTEGER" if self.codec.id_kind == "int" else "TEXT"
        db.execute("BEGIN IMMEDIATE")  # one migrating writer at a time (workers share the file)
        try:
            exists = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (t,)).fetchone()
            if not exists:
                db.execute(
                    f'CREATE TABLE "{t}" (id {idtype} PRIMARY KEY NOT NULL, event TEXT NOT NULL, '
                    "inserted_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
                )
                applied.append(f"create table {t}")
            have = {r[1] for r in db.execute(f'PRAGMA table_xinfo("{t}")')}
            for col, sqltype, path in self.columns():
                if col not in have:
                    db.execute(
                        f'ALTER TABLE "{t}" ADD COLUMN "{col}" {sqltype} '
                        f"GENERATED ALWAYS AS (json_extract(event, '{path}')) VIRTUAL"
                    )
                    applied.append(f"add column {t}.{col}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return applied

    def _write(self, rows: list[tuple[object, str]]) -> None:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(self.insert_sql, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    # -- async API
    async def open(self) -> None:
        """Open the database and run the migration (a locked database is retried on write)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self._connect)
        except sqlite3.OperationalError as e:
            self.healthy = False
            import logging

            logging.getLogger("collector.sinks").warning("sink %s: open deferred: %s", self.name, e)

    async def migrate(self) -> list[str]:
        """Create the table and add typed columns the event type gained."""
        loop = asyncio.get_running_loop()

        def run() -> list[str]:
            return self._migrate(self._connect())

        return await loop.run_in_executor(self.executor, run)

    async def write(self, batch: Batch) -> None:
        """Insert the chunk in one transaction; rows whose id exists are skipped."""
        rows = list(zip(batch.ids, batch.texts, strict=True))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._write, rows)

    async def close(self) -> None:
        """Close the connection and stop the thread."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._close)
        self.executor.shutdown(wait=True)
