"""``Pair(store="sqlite", state_path=...)``: waiting halves in a SQLite file, so open page
views survive a restart of the daemon (seed 002: "persisted to Redis, or the SQLite state
file under embedded defaults").

The Redis store's algorithm on one local file that every worker of the daemon opens
(WAL, one write transaction per chunk)::

    chunk ─► pair within the chunk (memory, as store="memory")
          └► one transaction (BEGIN IMMEDIATE: the workers take turns):
               paired keys already in `done` ─► replayed (not paired twice, across restarts)
               each other half: its partner in `halves`? ─► DELETE it ─► paired record
                                             none ─────► INSERT (a copy already waiting: duplicate)
               paired keys ─► `done` until now + replay_ttl
    expire(now), every tick (and at most once a tick per chunk), one transaction:
        halves with deadline <= now (sweep_limit of them) ─► DELETE ─► unpaired records

Tables: ``halves(kind, key, arrival, time, carried, deadline)`` (``key``: the key's values
as a JSON array, ``carried``: msgpack) and ``done(key, until)``. Each half is taken by
exactly one transaction, so across workers and restarts a start/end pair gives one record
and an unpaired half one unpaired record, whichever worker sweeps; no sharding by user is
needed.

Durability: a transaction is committed before the chunk's records reach the sinks, in WAL
mode with ``synchronous=NORMAL`` (a killed process loses nothing committed; a power cut
may lose the last transactions). A restart, clean or SIGKILL, keeps every waiting half.
Loss: a worker killed between a chunk's transaction and its sinks' commit loses the
records that transaction made (the redelivered halves find their partners gone and
their keys in ``done``: replayed); at most the records of the chunks it had in flight.
In a worker the file's work runs on one thread of the runtime (calls in order), so a
worker waiting for the file's write lock (another worker's transaction) goes on with its
other chunks meanwhile; called outside an event loop (tests, scripts) it runs inline.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from ..protocol import ErrorRecord
from .pairing import Pair, PairRuntime, Pending

__all__ = ["SCHEMA", "SqlitePairRuntime"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS halves (
    kind TEXT NOT NULL, key TEXT NOT NULL, arrival REAL NOT NULL, time REAL, carried BLOB NOT NULL,
    deadline REAL NOT NULL, PRIMARY KEY (kind, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS halves_deadline ON halves (deadline);
CREATE TABLE IF NOT EXISTS done (key TEXT PRIMARY KEY, until REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS done_until ON done (until);
"""
_enc = msgspec.msgpack.Encoder()
_carried = msgspec.msgpack.Decoder(list[Any])
_json = msgspec.json.Encoder()
_json_dec = msgspec.json.Decoder()


def _text(value: Any) -> str:
    """JSON text of ``value``: a key (a tuple, as a list) as the file stores it, or a list
    of such texts as one ``json_each`` parameter."""
    return _json.encode(value).decode()
_IN = "SELECT value FROM json_each(?)"  # a whole key list as one parameter


class SqlitePairRuntime(PairRuntime):
    """One worker's view of a SQLite-backed pairing (see the module docstring).

    Counters add ``stored`` (halves this worker left waiting); ``pending`` is the file's,
    shared by the workers: not counted. ``close()`` closes the connection.
    """

    shared_store = True

    def __init__(self, spec: Pair) -> None:
        super().__init__(spec)  # Pair checked that store="sqlite" has its state_path
        self._db: sqlite3.Connection | None = None
        self._pool: ThreadPoolExecutor | None = None  # one thread: the file's work, in call order
        self._pid = 0

    def db(self) -> sqlite3.Connection:
        """The connection of this process (opened, and the tables made, on first use)."""
        if self._db is None or self._pid != os.getpid():
            path = self.spec.state_path
            d = os.path.dirname(path)
            if d:
                os.makedirs(d, exist_ok=True)
            db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            # workers open the file at once: switching a new file to WAL may find it
            # locked without waiting on the busy timeout, so that step is retried (bounded)
            for attempt in range(100):
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    if attempt == 99:
                        db.close()
                        raise
                    time.sleep(0.05)
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            self._db, self._pid = db, os.getpid()
        return self._db

    def close(self) -> None:
        """Close the connection and the file's thread (the worker calls ``aclose`` at its drain)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._db is not None:
            db, self._db = self._db, None
            db.close()

    async def aclose(self) -> None:
        """``close()`` for the worker's drain."""
        self.close()


    def __call__(self, events: list[Any]) -> Any:
        """Pair within the chunk, then against the file in one transaction: the drops, or
        (in a running event loop) a coroutine of them, the file's work on its thread."""
        now = self.clock()
        sp = self.spec
        sweep = now - self.last_sweep >= sp.tick
        if sweep:
            self.last_sweep = now
        starts: dict[Any, Pending] = {}  # this chunk's unpaired halves
        ends: dict[Any, Pending] = {}
        matches, used = self._scan(events, starts, ends, now, None, None)
        drops = [ErrorRecord(i, "$", f"consumed by {sp.name}", "paired") for i in used]
        if not (matches or starts or ends or sweep):
            return drops
        if not _in_loop():
            self._apply(self._work(matches, starts, ends, now, sweep))
            return drops
        return self._remote(matches, starts, ends, now, sweep, drops)

    async def _remote(
        self, matches: list[tuple[Any, Pending, Pending]], starts: dict[Any, Pending], ends: dict[Any, Pending],
        now: float, sweep: bool, drops: list[ErrorRecord],
    ) -> list[ErrorRecord]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"pair-{self.spec.name}")
        loop = asyncio.get_running_loop()
        self._apply(await loop.run_in_executor(self._pool, self._work, matches, starts, ends, now, sweep))
        return drops

    def expire(self, now: float) -> Any:
        """Take every half whose deadline passed (each becomes one unpaired record) and
        forget paired keys past ``replay_ttl`` (a coroutine in a running event loop)."""
        self.last_sweep = now
        if not _in_loop():
            self._apply(self._work([], {}, {}, now, True))
            return None
        return self._remote([], {}, {}, now, True, [])

    # ------------------------------------------------------------ the file's thread
    def _work(
        self, matches: list[tuple[Any, Pending, Pending]], starts: dict[Any, Pending], ends: dict[Any, Pending],
        now: float, sweep: bool,
    ) -> _Done:
        """The transactions of one call: no runtime state is touched (it runs on the
        file's thread while the loop goes on); :meth:`_apply` takes the outcome."""
        out = _Done()
        if sweep:
            self._sweep(now, out)
        if matches or starts or ends:
            self._transact(matches, starts, ends, now, out)
        return out

    def _transact(
        self, matches: list[tuple[Any, Pending, Pending]], starts: dict[Any, Pending], ends: dict[Any, Pending],
        now: float, out: _Done,
    ) -> None:
        sp = self.spec
        db = self.db()
        db.execute("BEGIN IMMEDIATE")
        try:
            taken: list[tuple[Any, Pending, Pending]] = []  # pairs made with a half from the file
            left: list[tuple[dict[Any, Pending], str, dict[Any, str]]] = []
            texts: dict[Any, str] = {}  # every half's key text, made once
            for table, kind, other in ((starts, "start", "end"), (ends, "end", "start")):
                if not table:
                    continue
                ks = {k: _text(k) for k in table}
                texts.update(ks)
                found = {r[0]: r for r in db.execute(
                    f"DELETE FROM halves WHERE kind = ? AND key IN ({_IN}) RETURNING key, arrival, time, carried",
                    (other, _text(list(ks.values()))))}
                for k, ktext in ks.items():
                    r = found.get(ktext)
                    if r is not None:
                        mine = table.pop(k)
                        theirs: Pending = (r[1], r[2], tuple(_carried.decode(r[3])))
                        taken.append((k, mine, theirs) if kind == "start" else (k, theirs, mine))
                left.append((table, kind, ks))
            # the replay guard: a half whose partner waited cannot have been paired since
            # (a paired key's halves are gone), so only the rest are asked
            # each key's text once: the matches' here, the halves' in ``ks`` above
            mtext = [_text(m[0]) for m in matches]
            ask = mtext + [ks[k] for table, _, ks in left for k in table]
            if ask:
                done = {r[0] for r in db.execute(f"SELECT key FROM done WHERE until > ? AND key IN ({_IN})",
                                                 (now, _text(ask)))}
                if done:  # paired before (maybe before a restart): a replay, not paired twice
                    for table, _, ks in left:
                        for k in [k for k in table if ks[k] in done]:
                            del table[k]
                            out.counts["replayed"] += 1
                    kept = [i for i, t in enumerate(mtext) if t not in done]
                    out.counts["replayed"] += 2 * (len(matches) - len(kept))
                    matches, mtext = [matches[i] for i in kept], [mtext[i] for i in kept]
            for table, kind, ks in left:
                if not table:
                    continue
                ttl = sp.ttl if kind == "start" else sp.orphan_ttl
                before = db.total_changes
                db.executemany("INSERT OR IGNORE INTO halves VALUES (?, ?, ?, ?, ?, ?)",
                               [(kind, ks[k], p[0], p[1], _enc.encode(list(p[2])), p[0] + ttl) for k, p in table.items()])
                stored = db.total_changes - before
                out.counts["stored"] += stored
                out.counts["duplicate_" + kind] += len(table) - stored  # a copy already waits: the first waits on
            mtext += [texts[k] for k, _, _ in taken]
            matches += taken
            if matches:
                until = now + sp.replay_ttl
                db.executemany("INSERT INTO done VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET until = excluded.until",
                               [(t, until) for t in mtext])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        out.matches = matches

    def _sweep(self, now: float, out: _Done) -> None:
        limit = self.spec.sweep_limit
        db = self.db()
        for _ in range(10):  # at most 10 * sweep_limit halves per call; the next tick goes on
            db.execute("BEGIN IMMEDIATE")
            try:
                due = db.execute("SELECT kind, key, arrival, time, carried FROM halves WHERE deadline <= ? "
                                 "ORDER BY deadline LIMIT ?", (now, limit)).fetchall()
                for kind in ("start", "end"):
                    keys = [r[1] for r in due if r[0] == kind]
                    if keys:
                        db.execute(f"DELETE FROM halves WHERE kind = ? AND key IN ({_IN})", (kind, _text(keys)))
                db.execute("DELETE FROM done WHERE until <= ?", (now,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            out.due += due
            if len(due) < limit:
                return

    # ------------------------------------------------------------ back on the loop
    def _apply(self, done: _Done) -> None:
        """Count and emit what the file's transactions decided."""
        c = self.counters
        for k, v in done.counts.items():
            c[k] += v
        for kind, key, arrival, t, carried in done.due:
            start = kind == "start"
            c["expired" if start else "orphan"] += 1
            self._unpaired(tuple(_json_dec.decode(key)), (arrival, t, tuple(_carried.decode(carried))), start,
                           "expired" if start else "orphan_end")
        if done.matches:
            self._emit(done.matches)


class _Done:
    """What one call's transactions decided: pairs to emit, halves expired, counts."""

    def __init__(self) -> None:
        self.matches: list[tuple[Any, Pending, Pending]] = []
        self.due: list[Any] = []
        self.counts: collections.Counter[str] = collections.Counter()


def _in_loop() -> bool:
    """Whether an event loop runs in this thread (a worker: the file's work goes to its thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
