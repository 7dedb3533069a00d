"""The payload arena (collector/arena.py) on real shared memory."""

from __future__ import annotations

import os

import pytest

from collector.arena import PayloadArena


def segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"collector_{os.getpid()}_")}


def test_a_worker_reads_what_the_supervisor_put_until_the_slot_is_freed() -> None:
    arena = PayloadArena(2, 1024)
    worker = PayloadArena(2, 1024, arena.name, create=False)  # as a worker maps it
    try:
        a, b = arena.put(b"first"), arena.put(memoryview(b"xxsecondxx")[2:8])
        assert {a, b} == {0, 1} and arena.put(b"third") == -1  # no slot left: inline
        assert bytes(worker.view(a, 5)) == b"first" and bytes(worker.view(b, 6)) == b"second"
        assert arena.put(b"y" * 1025) == -1  # larger than a slot: inline
        arena.free(a)
        c = arena.put(b"again")
        assert c == a and bytes(worker.view(c, 5)) == b"again"
    finally:
        worker.close()
        arena.close()
    assert arena.name.lstrip("/") not in segments()


def test_a_full_dev_shm_is_an_error_when_the_arena_is_made_not_a_sigbus_later() -> None:
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    before = segments()
    with pytest.raises(OSError):
        PayloadArena(2, free)  # twice what is free: the reservation fails at once
    assert segments() == before  # nothing left behind
