"""The ``clickhouse`` sink: ClickHouse's HTTP interface through aiohttp.

Table layout (``{database}.{table}``; works on ClickHouse 18.16, Debian's package)::

    id           String                       -- the pipeline's id field, else a content hash
    event        String                       -- the event as JSON, with its own keys
    inserted_at  DateTime DEFAULT now()
    ENGINE = ReplacingMergeTree() ORDER BY id

Each chunk (with the chunks that arrived while a round of inserts ran: group commit,
:mod:`collector.sinks.batching`) is one ``INSERT INTO db.t (id, event) FORMAT
JSONEachRow`` per table, over up to ``connections`` HTTP connections per worker.

**Idempotency.** A chunk written again (a retry whose first attempt landed, a worker's
redelivery, a replay) adds rows with ids already stored; ``ReplacingMergeTree`` keeps
one row per id once the parts are merged, which happens in the background. Read with
``FINAL`` (``SELECT ... FROM t FINAL``) or count ``uniqExact(id)`` to see exactly one
row per id before that. The inserts of one round into several tables are separate
statements: a round that fails half-way is retried whole, which is harmless for the
same reason.

**Fields.** ClickHouse 18.16 has no ``JSONExtract*``; read fields with
``visitParamExtractString(event, 'page')`` / ``visitParamExtractInt`` / ``...Float`` /
``...Bool`` / ``visitParamExtractRaw`` (top-level keys; newer servers also have
``JSONExtract*``).

**Errors.** An error ClickHouse reports about the data (codes :data:`DATA_CODES`: a
value it cannot parse) is a data error: the sink set halves the chunk and dead-letters
only the refused events. Everything else (connection refused, a timeout, HTTP 5xx, an
unknown table) is an outage: retried with backoff, then dead-lettered per the retry
policy. ``table`` may be a template (``cs_{event}``, :mod:`collector.sinks.tables`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import msgspec

from ..errors import ConfigError, missing
from .base import Batch, DeadLetter, EventCodec, Sink
from .batching import RoundBatcher
from .config import ClickhouseSinkConfig
from .tables import TableTemplate, refused_records

__all__ = ["DATA_CODES", "MAX_ROUND_ROWS", "ClickhouseError", "ClickhouseSink", "migrate"]

log = logging.getLogger("collector.sinks")

MAX_ROUND_ROWS = 65_536  # rows per round of inserts at most

# ClickHouse error codes that mean "this data cannot be stored" (retrying cannot help)
DATA_CODES = frozenset({
    6,    # CANNOT_PARSE_TEXT
    26,   # CANNOT_PARSE_QUOTED_STRING
    27,   # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    32,   # ATTEMPT_TO_READ_AFTER_EOF
    38,   # CANNOT_PARSE_DATE
    41,   # CANNOT_PARSE_DATETIME
    53,   # TYPE_MISMATCH
    69,   # ARGUMENT_OUT_OF_BOUND
    70,   # CANNOT_CONVERT_TYPE
    72,   # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA
    131,  # TOO_LARGE_STRING_SIZE
})
UNKNOWN_TABLE = 60
_CODE = re.compile(r"Code: (\d+)")


class ClickhouseError(Exception):
    """An error answer of ClickHouse: HTTP ``status``, ClickHouse ``code`` (0 if none) and its text."""

    def __init__(self, status: int, text: str) -> None:
        m = _CODE.search(text)
        self.status = status
        self.code = int(m.group(1)) if m else 0
        super().__init__(f"HTTP {status}: {text.strip()[:500]}")


class _Row(msgspec.Struct):
    id: str
    event: str


class _Round:
    """What one round inserts: ``(table, JSONEachRow bytes)`` parts, ``n`` rows in all."""

    __slots__ = ("n", "parts")

    def __init__(self, parts: list[tuple[str, bytes]], n: int) -> None:
        self.parts = parts
        self.n = n

    def __len__(self) -> int:
        return self.n

    @staticmethod
    def merge(rounds: list[_Round]) -> _Round:
        return _Round([p for r in rounds for p in r.parts], sum(r.n for r in rounds))


def aiohttp_module() -> Any:
    """The ``aiohttp`` package, or the error naming the extra to install."""
    try:
        import aiohttp
    except ImportError:
        raise missing("aiohttp", "clickhouse", "the clickhouse sink") from None
    return aiohttp


class ClickhouseSink(Sink):
    """Chunks into ClickHouse tables (see the module docstring for the layout)."""

    kind = "clickhouse"

    def __init__(self, config: ClickhouseSinkConfig, *, name: str, codec: EventCodec, worker: int) -> None:
        super().__init__(config, name=name, codec=codec, worker=worker)
        self.aiohttp = aiohttp_module()
        self.cfg = config
        self.url = self._url(config)
        self.remember_secret(self.url)
        self.password = ""
        if config.password_env:
            pw = os.environ.get(config.password_env)
            if pw is None:
                raise ConfigError(f"clickhouse sink {name}: environment variable {config.password_env!r} is not set")
            self.password = pw
            self._secrets.append(pw)
        self.tables = TableTemplate(config.table)
        self.encoder = msgspec.json.Encoder()
        self.session: Any = None
        self.ready: set[str] = set()  # tables known to exist
        self.db_ready = False
        self.group: RoundBatcher[_Round] = RoundBatcher(
            self._insert, _Round.merge, max_size=MAX_ROUND_ROWS, concurrency=config.connections,
            split=self.is_data_error,
        )

    @staticmethod
    def _url(cfg: ClickhouseSinkConfig) -> str:
        url = cfg.url
        if cfg.url_env:
            v = os.environ.get(cfg.url_env)
            if v:
                url = v
        return url.rstrip("/") + "/"

    # -- HTTP
    def _session(self) -> Any:
        if self.session is None:
            aiohttp = self.aiohttp
            auth = aiohttp.BasicAuth(self.cfg.user, self.password) if self.cfg.user else None
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.cfg.connections),
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
                auth=auth,
            )
        return self.session

    async def query(self, sql: str, body: bytes | None = None) -> str:
        """Run ``sql`` (with ``body`` as its data, for an ``INSERT``); the answer's text."""
        session = self._session()
        if body is None:
            req = session.post(self.url, data=sql.encode())
        else:
            req = session.post(self.url, params={"query": sql}, data=body)
        async with req as r:
            text = await r.text(errors="replace")
            if r.status != 200:
                raise ClickhouseError(r.status, text)
            return str(text)

    # -- tables
    def create_sql(self, table: str) -> str:
        """The ``CREATE TABLE`` of one table."""
        return (
            f"CREATE TABLE IF NOT EXISTS {self.cfg.database}.{table} "
            "(id String, event String, inserted_at DateTime DEFAULT now()) "
            "ENGINE = ReplacingMergeTree() ORDER BY id"
        )

    async def _create(self, table: str) -> list[str]:
        applied = []
        db = self.cfg.database
        if not self.db_ready:
            if (await self.query(f"SELECT count() FROM system.databases WHERE name = '{db}'")).strip() == "0":
                await self.query(f"CREATE DATABASE IF NOT EXISTS {db}")
                applied.append(f"create database {db}")
            self.db_ready = True
        if table not in self.ready:
            if (await self.query(f"EXISTS TABLE {db}.{table}")).strip() != "1":
                await self.query(self.create_sql(table))
                applied.append(f"create table {db}.{table}")
            self.ready.add(table)
        return applied

    async def migrate(self, tables: Sequence[str] | None = None) -> list[str]:
        """Create the database and tables; the steps applied (none when all exist).

        With a template ``table``, ``tables`` are the concrete names to create now
        (``collector.sinks.tables.table_names``); otherwise the template's tables are
        created on first use.
        """
        if tables is None:
            tables = [self.cfg.table] if self.tables.constant else []
        self.ready.difference_update(tables)  # ask the server, do not trust this process
        self.db_ready = False
        applied: list[str] = []
        for t in tables:
            applied += await self._create(t)
        if not tables:
            await self.query("SELECT 1")  # still check that the server answers
        return applied

    # -- writing
    async def open(self) -> None:
        """Create the table (a fixed one) now; a server that is down is an outage, retried on write."""
        if not (self.cfg.create_table and self.tables.constant):
            return
        try:
            await self._create(self.cfg.table)
        except Exception as e:
            self.healthy = False
            log.warning("sink %s: open deferred: %s", self.name, self.describe_error(e))

    async def write(self, batch: Batch) -> list[DeadLetter] | None:
        """Insert the chunk (one ``INSERT`` per table); returns once ClickHouse acknowledged it."""
        ids, texts = batch.ids, batch.texts
        if self.codec.id_kind == "int":
            ids = [str(i) for i in ids]
        Row = _Row
        enc = self.encoder.encode_lines
        by_table, refused = self.tables.route(batch.events)
        if self.tables.constant:
            parts = [(self.cfg.table, enc(list(map(Row, ids, texts))))]
            n = len(texts)
        else:
            parts = [(t, enc([Row(ids[i], texts[i]) for i in idx])) for t, idx in by_table.items()]
            n = sum(len(idx) for idx in by_table.values())
        if parts:
            await self.group.submit(_Round(parts, n))
        return refused_records(refused, texts, self.name, self.worker)

    async def _insert(self, rnd: _Round) -> None:
        blobs: dict[str, list[bytes]] = {}
        for t, b in rnd.parts:
            blobs.setdefault(t, []).append(b)
        await asyncio.gather(*(self._insert_table(t, b) for t, b in blobs.items()))

    async def _insert_table(self, table: str, blobs: list[bytes]) -> None:
        if self.cfg.create_table and table not in self.ready:
            await self._create(table)
        body = blobs[0] if len(blobs) == 1 else b"".join(blobs)
        try:
            await self.query(f"INSERT INTO {self.cfg.database}.{table} (id, event) FORMAT JSONEachRow", body)
        except ClickhouseError as e:
            if e.code == UNKNOWN_TABLE:  # dropped meanwhile: the next attempt creates it again
                self.ready.discard(table)
                self.db_ready = False
            raise

    async def flush(self) -> None:
        """Wait for the inserts in progress."""
        await self.group.drain()

    def is_data_error(self, e: BaseException) -> bool:
        """An error ClickHouse reports about the data itself (:data:`DATA_CODES`)."""
        return isinstance(e, ClickhouseError) and e.code in DATA_CODES

    async def health(self) -> bool:
        """``GET /ping``."""
        try:
            async with self._session().get(self.url + "ping") as r:
                return bool(r.status == 200)
        except Exception:
            return False

    async def close(self) -> None:
        """Close the HTTP session."""
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()


async def migrate(cfg: ClickhouseSinkConfig, tables: Sequence[str] | None = None) -> list[str]:
    """Create the database and ``tables`` of a clickhouse sink config; the steps applied.

    ``tables`` are concrete names (for a template: ``table_names(cfg.table, types)``);
    none: the configured table, when it is not a template. Idempotent.
    """
    sink = ClickhouseSink(cfg, name=cfg.name or "clickhouse", codec=EventCodec(None, None), worker=0)
    try:
        return await sink.migrate(tables)
    finally:
        await sink.close()
