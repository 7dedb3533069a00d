"""Shared test fixtures: real-server addresses, the services gate, leak checks.

A test that needs a server asks for its fixture (``pg_dsn``, ``mysql_dsn``,
``redis_url``, ``nats_url``, ``clickhouse_url``). When the server does not answer, the test skips with the
reason, unless ``COLLECTOR_REQUIRE_SERVICES=1`` (set by ``.ci/run``), where it fails.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest

# tests live in tiers (unit/, integration/, e2e/) and share modules from support/; a test
# imports them by name, and so do the worker and daemon processes it starts (spawned
# processes inherit sys.path)
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE / d) for d in ("support", "unit", "integration", "e2e")]

REQUIRE = os.environ.get("COLLECTOR_REQUIRE_SERVICES") == "1"


def _reachable(host: str, port: int, timeout: float = 1.0) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port} unreachable ({e})"


def _need(url: str, default_port: int, what: str) -> str:
    u = urlparse(url)
    why = _reachable(u.hostname or "127.0.0.1", u.port or default_port)
    if why:
        msg = f"{what} not available at {url}: {why}"
        if REQUIRE:
            pytest.fail(f"{msg} (COLLECTOR_REQUIRE_SERVICES=1 makes this a failure)")
        pytest.skip(msg)
    return url


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """PostgreSQL DSN from COLLECTOR_TEST_PG (default: trust auth, database test)."""
    return _need(os.environ.get("COLLECTOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"), 5432, "PostgreSQL")


@pytest.fixture(scope="session")
def mysql_dsn() -> str:
    """MariaDB/MySQL DSN from COLLECTOR_TEST_MYSQL (default: root, no password, database test)."""
    return _need(os.environ.get("COLLECTOR_TEST_MYSQL", "mysql://root@127.0.0.1:3306/test"), 3306, "MariaDB")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Redis URL from COLLECTOR_TEST_REDIS."""
    return _need(os.environ.get("COLLECTOR_TEST_REDIS", "redis://127.0.0.1:6379/0"), 6379, "Redis")


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    import redis

    p = f"test:{uuid.uuid4().hex[:12]}:"
    yield p
    r = redis.Redis.from_url(redis_url)
    try:
        keys = list(r.scan_iter(match=p + "*", count=1000))
        if keys:
            r.delete(*keys)
    finally:
        r.close()


@pytest.fixture(scope="session")
def nats_url() -> str:
    """NATS URL from COLLECTOR_TEST_NATS."""
    return _need(os.environ.get("COLLECTOR_TEST_NATS", "nats://127.0.0.1:4222"), 4222, "NATS")


@pytest.fixture(scope="session")
def clickhouse_url() -> str:
    """ClickHouse HTTP interface URL from COLLECTOR_CLICKHOUSE_URL."""
    return _need(os.environ.get("COLLECTOR_CLICKHOUSE_URL", "http://127.0.0.1:8123"), 8123, "ClickHouse")


def _shm_segments() -> set[str]:
    try:
        names = {n for n in os.listdir("/dev/shm") if n.startswith("psm_") or n.startswith("collector")}
    except FileNotFoundError:
        return set()
    return {n for n in names if not _someone_elses(n)}


def _someone_elses(name: str) -> bool:
    """A ``collector_<pid>_...`` segment of a live process outside this test run.

    Other sessions on the machine (a daemon, a benchmark) create segments while a test
    runs; only the ones this process tree made, or whose creator is dead, can be leaks.
    """
    parts = name.split("_")
    if len(parts) < 3 or parts[0] != "collector" or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid() or not psutil.pid_exists(pid):
        return False
    try:
        p: psutil.Process | None = psutil.Process(pid)
        while p is not None:
            if p.pid == os.getpid():
                return False  # a descendant of ours (a daemon the test started)
            p = p.parent()
    except psutil.Error:
        return False
    return True


def wait_until(pred, timeout: float, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``pred`` until it is truthy; fail after ``timeout`` seconds (every wait is bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Assert the test leaves no child processes and no shared-memory segments behind."""
    before_shm = _shm_segments()
    me = psutil.Process()
    before_children = {c.pid for c in me.children(recursive=True)}
    yield
    def clean() -> bool:
        kids = [c for c in me.children(recursive=True) if c.pid not in before_children and c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        # the multiprocessing resource tracker is shared and long-lived, not a leak
        kids = [c for c in kids if "resource_tracker" not in " ".join(c.cmdline())]
        return not kids and not (_shm_segments() - before_shm)
    deadline = time.monotonic() + 10
    while not clean() and time.monotonic() < deadline:
        time.sleep(0.05)
    kids = [c for c in me.children(recursive=True) if c.pid not in before_children and c.is_running() and c.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(c.cmdline())]
    assert not kids, f"leaked processes: {[(k.pid, k.cmdline()) for k in kids]}"
    leaked = _shm_segments() - before_shm
    assert not leaked, f"leaked shared memory segments: {leaked}"
