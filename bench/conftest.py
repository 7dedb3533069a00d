"""Fixtures of the pytest-benchmark suite (``tox -e bench``; not part of the test run).

Sizes come from the environment so a quick local run and a full one share the code:
``COLLECTOR_BENCH_EVENTS`` (default 200000) events per inmem batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from collector.benchmarks.common import Input, make_input

EVENTS = int(os.environ.get("COLLECTOR_BENCH_EVENTS", "200000"))
NCPU = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@pytest.fixture(scope="session")
def inp() -> Input:
    """The inmem workload, generated once per session."""
    return make_input(EVENTS)


@pytest.fixture(scope="session")
def warm() -> Input:
    """A small batch over the same users, to warm workers' caches before timing."""
    return make_input(20_000, seed=1)


@pytest.fixture(scope="session")
def workdir() -> Iterator[str]:
    """Scratch space for the peers' input parts."""
    import shutil

    from collector.benchmarks.peers import tempdir

    d = tempdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)
