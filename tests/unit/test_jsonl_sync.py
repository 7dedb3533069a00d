"""The JSONL sink's ``fsync = "batch"``: where its ``fdatasync`` runs.

A fast one runs on the worker's loop right after the chunk's write; when their moving
average passes ``INLINE_SYNC_MAX`` the next ones go to the sink's thread for
``INLINE_SYNC_RETRY`` seconds (a slow disk must not hold the loop), then the loop tries
again; a lone spike does not move them. Every chunk is
in the file, once, whichever way it was synced.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from collector.sinks import build_sink
from collector.sinks import files as files_mod
from collector.sinks.base import Batch, EventCodec
from collector.sinks.config import JsonlSinkConfig


class Ev(msgspec.Struct):
    id: int
    user: str


def test_fast_syncs_run_on_the_loop_and_a_slow_one_moves_them_to_the_thread_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fdatasync
    where: list[str] = []
    slow = {"next": 0.0}

    def fdatasync(fd: int) -> None:
        where.append("loop" if threading.current_thread() is threading.main_thread() else "thread")
        if slow["next"]:
            time.sleep(slow["next"])
            slow["next"] = 0.0
        real(fd)

    monkeypatch.setattr(files_mod.os, "fdatasync", fdatasync)
    monkeypatch.setattr(files_mod, "INLINE_SYNC_RETRY", 0.3)
    codec = EventCodec(Ev, "id")
    sink = build_sink(JsonlSinkConfig(path=str(tmp_path / "events.jsonl"), fsync="batch"), index=0, codec=codec,
                      worker=0)
    assert isinstance(sink, files_mod.JsonlSink)

    async def main() -> None:
        await sink.open()
        n = 0

        async def chunk() -> None:
            nonlocal n
            await sink.write(Batch([Ev(n + i, "u") for i in range(10)], codec))
            n += 10

        await chunk()
        await chunk()
        assert where == ["loop", "loop"]
        slow["next"] = 0.1  # a disk 10x slower than the limit
        await chunk()  # slow, still on the loop: it is only measured there
        assert where[-1] == "loop"
        await chunk()
        await chunk()
        assert where[-2:] == ["thread", "thread"], where
        assert (sink.syncs_inline, sink.syncs_on_thread) == (3, 2)
        await asyncio.sleep(0.45)  # INLINE_SYNC_RETRY and the slow sync's own time
        await chunk()
        assert where[-1] == "loop", where
        slow["next"] = 0.02  # one spike twice the limit: the average rides it out
        await chunk()
        await chunk()
        assert where[-2:] == ["loop", "loop"], where
        await sink.close()

    asyncio.run(main())
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    assert [msgspec.json.decode(x, type=Ev).id for x in lines] == list(range(80))


def test_fsync_never_and_always_do_not_sync_on_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def record(name: str, fn: Callable[[int], None]) -> Callable[[int], None]:
        def call(fd: int) -> None:
            on = "loop" if threading.current_thread() is threading.main_thread() else "thread"
            calls.append(f"{name}@{on}")
            fn(fd)

        return call

    monkeypatch.setattr(files_mod.os, "fsync", record("fsync", os.fsync))
    monkeypatch.setattr(files_mod.os, "fdatasync", record("fdatasync", os.fdatasync))
    codec = EventCodec(Ev, "id")

    async def one_chunk(sink: files_mod.JsonlSink) -> None:
        await sink.open()
        await sink.write(Batch([Ev(1, "u")], codec))
        await sink.close()

    for policy in ("never", "always"):
        calls.clear()
        sink = build_sink(JsonlSinkConfig(path=str(tmp_path / f"{policy}.jsonl"), fsync=policy), index=0,
                          codec=codec, worker=0)
        assert isinstance(sink, files_mod.JsonlSink)
        asyncio.run(one_chunk(sink))
        if policy == "never":
            assert calls == []
        else:
            assert calls and all(c.endswith("@thread") for c in calls), calls
        assert (tmp_path / f"{policy}.jsonl").read_bytes().count(b"\n") == 1
