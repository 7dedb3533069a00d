"""The ``sqlite`` sink: the embedded default. stdlib ``sqlite3`` on a private thread.

Table layout (``{table}``) and its typed view (``{table}_fields``)::

    id           INTEGER or TEXT PRIMARY KEY   -- the pipeline's id field, else a content hash
    event        TEXT NOT NULL                 -- the event as JSON, with its own keys
    inserted_at  TEXT DEFAULT CURRENT_TIMESTAMP

    VIEW {table}_fields: id, inserted_at, event and, for every top-level
        int/float/str/bool field of the event type, json_extract(event, '$.<field>')

Only ``id`` and ``event`` are written. The typed columns live in a view, not in
generated columns on the table: SQLite evaluates even *virtual* generated columns on
every insert, which made each row cost about three times as much (measured: 72k vs
230k rows/s per core). Index a field you filter on with an expression index, e.g.
``CREATE INDEX ... ON {table}(json_extract(event, '$.user_id'))``. A new scalar field
in the event type is a new view definition; the migration replaces the view.

One transaction per group of concurrent chunks (group commit: the chunks that arrive
while a transaction runs share the next one; ``executemany`` of ``INSERT ... ON
CONFLICT(id) DO NOTHING``), WAL journal. Each chunk is acknowledged after the
transaction holding it committed. ``synchronous=NORMAL``: a committed chunk survives a crash of
the process; the last commits before a power loss can be lost. ``FULL`` fsyncs the
WAL on every commit and survives that too, at a cost per chunk.

``table`` may be a template (``cs_{event}``, :mod:`collector.sinks.tables`): a chunk
is split by table, each table (and its view) is created in the transaction that first
writes to it, and the tables of a group still share one transaction. An event whose
table name is not a plain identifier is dead-lettered; the rest of its chunk is stored.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from typing import Any

from .base import Batch, DeadLetter, EventCodec, Sink
from .batching import GroupCommit, SinkThread
from .config import SqliteSinkConfig
from .tables import TableTemplate, refused_records

__all__ = ["MAX_GROUP_ROWS", "SqliteSink"]

log = logging.getLogger("collector.sinks")

_AFFINITY = {"int": "INTEGER", "bool": "INTEGER", "float": "REAL", "str": "TEXT"}
_RESERVED = {"id", "event", "inserted_at", "rowid", "oid", "_rowid_"}


MAX_GROUP_ROWS = 32_768  # rows per group-commit transaction at most


class SqliteSink(Sink):
    """Chunks into a SQLite table (see the module docstring for the layout)."""

    kind = "sqlite"

    def __init__(self, config: SqliteSinkConfig, *, name: str, codec: EventCodec, worker: int) -> None:
        super().__init__(config, name=name, codec=codec, worker=worker)
        self.cfg = config
        self.path = config.path.replace("{worker}", str(worker))
        # sqlite3 connections belong to one thread: every call runs on this one
        self.executor = SinkThread(f"collector-sink-{name}")
        self.db: sqlite3.Connection | None = None
        self.group = GroupCommit(self._commit, self.is_data_error, MAX_GROUP_ROWS)
        self.tables = TableTemplate(config.table)
        self.ready: set[str] = set()  # tables known to exist (and their views current) on this connection

    # -- blocking parts, on the sink's thread
    def _connect(self, migrate: bool = True) -> sqlite3.Connection:
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
                if migrate and self.cfg.create_table:
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

    def view_sql(self, table: str | None = None) -> str:
        """The ``CREATE VIEW`` of the typed view over ``table`` (default: the configured one)."""
        t = table or self.cfg.table
        cols = "".join(f", json_extract(event, '{path}') AS \"{col}\"" for col, _, path in self.columns())
        return f'CREATE VIEW "{t}_fields" AS SELECT id, inserted_at{cols}, event FROM "{t}"'

    def _migrate(self, db: sqlite3.Connection, tables: list[str] | None = None) -> list[str]:
        """Create ``tables`` (default: the configured table, when it is not a template)."""
        if tables is None:
            tables = [self.cfg.table] if self.tables.constant else []
        if not tables:
            return []
        applied: list[str] = []
        db.execute("BEGIN IMMEDIATE")  # one migrating writer at a time (workers share the file)
        try:
            for t in tables:
                applied += self._create(db, t)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.ready.update(tables)
        return applied

    def _create(self, db: sqlite3.Connection, t: str) -> list[str]:
        """Create table ``t`` and (re)create its view, inside the caller's transaction."""
        applied = []
        idtype = "INTEGER" if self.codec.id_kind == "int" else "TEXT"
        exists = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (t,)).fetchone()
        if not exists:
            db.execute(
                f'CREATE TABLE "{t}" (id {idtype} PRIMARY KEY NOT NULL, event TEXT NOT NULL, '
                "inserted_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            )
            applied.append(f"create table {t}")
        view = self.view_sql(t)
        row = db.execute("SELECT sql FROM sqlite_master WHERE type='view' AND name=?", (f"{t}_fields",)).fetchone()
        if row is None or row[0] != view:
            db.execute(f'DROP VIEW IF EXISTS "{t}_fields"')
            db.execute(view)
            applied.append(f"{'create' if row is None else 'replace'} view {t}_fields")
        return applied

    def _write(self, rows: list[Any]) -> None:
        """One transaction: ``(id, text)`` rows of the fixed table, or ``(table, id, text)`` rows."""
        db = self._connect()
        created: list[str] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            if self.tables.constant:
                db.executemany(_insert_sql(self.cfg.table), rows)
            else:
                groups: dict[str, list[tuple[object, str]]] = {}
                for t, i, x in rows:
                    g = groups.get(t)
                    if g is None:
                        g = groups[t] = []
                    g.append((i, x))
                for t, g in groups.items():
                    if t not in self.ready and self.cfg.create_table:
                        self._create(db, t)
                        created.append(t)
                    db.executemany(_insert_sql(t), g)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.ready.update(created)

    def _close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
            self.ready.clear()

    # -- async API
    async def open(self) -> None:
        """Open the database and run the migration (a locked database is retried on write)."""
        try:
            await self.executor.run(self._connect)
        except (sqlite3.Error, OSError) as e:
            # a locked or unreachable file is an outage, not a boot failure: every
            # write connects again, so retries and the dead-letter sink apply
            self.healthy = False
            log.warning("sink %s: open deferred: %s", self.name, self.describe_error(e))

    async def migrate(self, tables: list[str] | None = None) -> list[str]:
        """Create the table and replace its view if the event type changed.

        With a template ``table``, ``tables`` are the concrete names to create now
        (``collector.sinks.tables.table_names``); without them a template's tables are
        created on first use only.
        """
        def run() -> list[str]:
            # connect without the automatic migration, so the steps applied are reported
            return self._migrate(self._connect(migrate=False), tables)

        got: list[str] = await self.executor.run(run)
        return got

    async def write(self, batch: Batch) -> list[DeadLetter] | None:
        """Insert the chunk; rows whose id exists are skipped. Returns once it is committed.

        Group commit: chunks that arrive while a transaction runs share the next one
        (up to ``MAX_GROUP_ROWS`` rows). Fewer, larger transactions are faster: with
        8192-event chunks the sink measured ~230k events/s against ~134k with 2048
        (``bench/sinks.py``), and this gets part of that at any chunk size.
        """
        if self.tables.constant:
            await self.group.submit(list(zip(batch.ids, batch.texts, strict=True)))
            return None
        by_table, refused = self.tables.route(batch.events)
        ids, texts = batch.ids, batch.texts
        rows = [(t, ids[i], texts[i]) for t, idx in by_table.items() for i in idx]
        if rows:
            await self.group.submit(rows)
        return refused_records(refused, texts, self.name, self.worker)

    async def _commit(self, rows: list[Any]) -> None:
        await self.executor.run(self._write, rows)

    async def flush(self) -> None:
        """Wait for the commits in progress."""
        await self.group.drain()

    def is_data_error(self, e: BaseException) -> bool:
        """A constraint or value SQLite refuses (``IntegrityError``, ``DataError``); a lock is not one."""
        return isinstance(e, sqlite3.IntegrityError | sqlite3.DataError)

    async def close(self) -> None:
        """Close the connection and stop the thread."""
        await self.executor.run(self._close)
        self.executor.shutdown(wait=True)


def _insert_sql(table: str) -> str:
    return f'INSERT INTO "{table}" (id, event) VALUES (?, ?) ON CONFLICT(id) DO NOTHING'

