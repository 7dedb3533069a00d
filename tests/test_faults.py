"""Faults on real processes and real servers, judged by a ledger (tests/ledger.py).

* A PostgreSQL or MariaDB outage (the test runs on each) with an at-least-once client that times out and resends the same
  ids while the first attempt is still in the sink's retry loop, then the daemon
  SIGKILLed (with its process group) before the store comes back: no id may have been
  acknowledged that the store does not hold (before the fix, the retries were answered
  ``duplicate`` at once and 1,300 to 1,500 acknowledged events were lost this way). The
  daemon restarted on the same data dir takes the retries, sweeps the dead daemon's
  shared memory, and every id ends up stored.

Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import wait_until
from ledger import Ledger
from test_daemon import Daemon, start_daemon, with_kill
from test_sinks import MysqlStore, PostgresStore, TcpProxy

pytestmark = pytest.mark.services

EVENT = {"type": "user_action", "source": "web", "user_id": "user_1", "data": {"n": 1}}


def batch(ids: list[str]) -> dict[str, Any]:
    return {"events": [{**EVENT, "id": i} for i in ids]}


def post_batch(d: Daemon, ids: list[str], timeout: float) -> tuple[int, list[dict[str, Any]]] | None:
    """POST /events/batch as a client with a deadline: None when no answer came in time."""
    try:
        status, _, body = d.request("POST", "/events/batch", json.dumps(batch(ids)), timeout=timeout)
    except (TimeoutError, ConnectionError):
        return None
    return status, json.loads(body).get("results", [])


class PgFault:
    """PostgreSQL behind the proxy: the sink's config and the ids the table holds."""

    def __init__(self, dsn: str) -> None:
        self.store = PostgresStore(dsn)
        u = urlsplit(dsn)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 5432)

    def sink(self, port: int) -> str:
        s = self.store
        return f'kind = "postgres"\nname = "pg"\ndsn = "{s.dsn_via(port)}"\ntable = "{s.table}"\n'

    def stored_ids(self) -> list[str]:
        s = self.store
        if not s._run("SELECT to_regclass($1) IS NOT NULL", f"public.{s.table}")[0][0]:
            return []
        return [r[0] for r in s._run(f'SELECT event->>\'id\' FROM "{s.table}"')]

    def cleanup(self) -> None:
        self.store.cleanup()


class MysqlFault:
    """MariaDB behind the proxy (seed 004's table: ``id`` is the primary key)."""

    def __init__(self, dsn: str) -> None:
        self.store = MysqlStore(dsn)
        self.upstream = (str(self.store.args["host"]), int(self.store.args["port"]))

    def sink(self, port: int) -> str:
        s = self.store
        return f'kind = "mysql"\nname = "mysql"\ndsn = "mysql://{s.args["user"]}@127.0.0.1:{port}/{s.args["database"]}"\ntable = "{s.table}"\n'

    def stored_ids(self) -> list[str]:
        s = self.store
        if not s._run(f"SHOW TABLES LIKE '{s.table}'"):
            return []
        return [r[0] for r in s._run(f"SELECT id FROM `{s.table}`")]

    def cleanup(self) -> None:
        self.store.cleanup()


def store_config(store: PgFault | MysqlFault, port: int) -> str:
    return (
        "[pipeline]\nenrich_latency = 0.001\ndedup_wait = 30\n"
        "[[sinks]]\n" + store.sink(port) +
        "retries = -1\nbackoff = 0.05\nbackoff_max = 0.5\ntimeout = 2\n"
    )


@pytest.fixture(params=["postgres", "mysql"])
def fault_store(request: pytest.FixtureRequest) -> Iterator[PgFault | MysqlFault]:
    """Each SQL store the daemon can write to, on its real server (a fresh table)."""
    store: PgFault | MysqlFault
    if request.param == "postgres":
        store = PgFault(request.getfixturevalue("pg_dsn"))
    else:
        store = MysqlFault(request.getfixturevalue("mysql_dsn"))
    try:
        yield store
    finally:
        store.cleanup()


@pytest.mark.slow
def test_retries_during_an_outage_are_never_acknowledged_before_the_store_holds_them(
    tmp_path: Path, fault_store: PgFault | MysqlFault
) -> None:
    store = fault_store
    proxy = TcpProxy(*store.upstream)
    ledger = Ledger()
    d = start_daemon(tmp_path, store_config(store, proxy.port))
    dead_pgid = d.proc.pid
    try:
        warm = [f"w-{i}" for i in range(50)]
        ledger.send(warm)
        got = post_batch(d, warm, 30)
        assert got is not None and got[0] == 202, got
        ledger.answer(got[1], warm)

        proxy.cut()
        ids = [str(uuid.uuid4()) for _ in range(300)]
        ledger.send(ids)
        answers = []
        for _ in range(4):  # the first attempt and three retries, 3 s each
            for part in (ids[:100], ids[100:200], ids[200:]):
                got = post_batch(d, part, 3)
                ledger.answer(got[1] if got else None, part)
                answers.append(None if got is None else got[0])
        assert 413 not in answers
        held = set(store.stored_ids())
        premature = ledger.acked - held
        assert not premature, (
            f"{len(premature)} ids were acknowledged during the outage although the store "
            f"does not hold them (answers {dict(ledger.answers)}, statuses {answers})"
        )
        os.killpg(d.proc.pid, signal.SIGKILL)  # the daemon, its workers and its resource tracker
        d.proc.wait(10)
    finally:
        proxy.restore()
        with_kill(d.proc)
    try:
        ledger.check(store.stored_ids()).assert_clean()  # nothing acknowledged was lost

        shm = Path("/dev/shm")
        stale = [n for n in os.listdir(shm) if n.startswith(f"collector_{dead_pgid}_")]
        d = start_daemon(tmp_path, store_config(store, proxy.port))
        try:
            assert not [n for n in stale if (shm / n).exists()], "the dead daemon's shared memory was not swept"

            def resent() -> bool:
                ok = True
                for part in (ids[:100], ids[100:200], ids[200:]):
                    got = post_batch(d, part, 10)
                    ledger.answer(got[1] if got else None, part)
                    ok = ok and got is not None and got[0] == 202
                return ok

            wait_until(resent, 60, interval=0.5, what="the retried batch to be accepted after the restart")
        finally:
            code = d.stop()
            assert code == 0, d.log.read_text()[-3000:]
        verdict = ledger.check(store.stored_ids())
        print(f"LEDGER outage+SIGKILL {type(store).__name__}: {verdict}")
        verdict.assert_clean()
        assert verdict.stored == verdict.sent == len(ids) + len(warm), verdict
        assert verdict.duplicated == 0  # the sink is idempotent on the id
    finally:
        proxy.close()
