"""The runner's emitter contract (``drain``) and its idle ``tick``, on a real SQLite sink.

A stage runtime with ``drain()`` hands records to the worker, which commits them with
the chunk's events (one commit; not positions of the chunk); ``tick()`` calls
``expire(now)`` and commits what that made on its own. Called directly in one process.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from collector import Pipeline
from collector import stats as S
from collector.protocol import Ack, Chunk
from collector.sinks import DeadLetterConfig, SqliteSinkConfig
from collector.sinks.base import Batch, EventCodec
from collector.sinks.files import read_deadletters
from collector.stages.aggregates import Aggregate
from collector.stages.pairing import Pair, PairRecord
from collector.worker.runner import PipelineRunner


class Ev(msgspec.Struct):
    id: int
    kind: str


class Rec(msgspec.Struct):
    """A record of another type than the pipeline's (no id field: a content hash)."""

    made_from: int
    why: str


class Bad(msgspec.Struct):
    """A record SQLite refuses: a text id in an INTEGER PRIMARY KEY column."""

    id: str


class Runtime:
    def __init__(self, fail_expiry: bool) -> None:
        self.out: list[Any] = []
        self.fail_expiry = fail_expiry
        self.clock = lambda: 123.0
        self.expired: list[float] = []

    def __call__(self, events: list[Any]) -> list[Any]:
        for e in events:
            if e.kind == "emit":
                self.out.append(Rec(e.id, "chunk"))
            elif e.kind == "bad":
                self.out.append(Bad(f"bad-{e.id}"))
        return []

    def drain(self) -> list[Any]:
        out, self.out = self.out, []
        return out

    def expire(self, now: float) -> None:
        if self.fail_expiry:
            raise RuntimeError("expiry bug")
        self.expired.append(now)
        self.out.append(Rec(0, "expired"))


@dataclass(frozen=True)
class Emitter:
    name: str = "emitter"
    fail_expiry: bool = False
    tick: float = 0.5

    def build(self) -> Runtime:
        return Runtime(self.fail_expiry)


def runner(tmp_path: Path, *stages: Any) -> tuple[PipelineRunner, list[Ack]]:
    p = Pipeline(
        name="t", event_type=Ev, key="id", stages=stages,
        sinks=(SqliteSinkConfig(path=str(tmp_path / "db")),),
        deadletter=DeadLetterConfig(path=str(tmp_path / "dl.jsonl")),
    )
    acks: list[Ack] = []
    slot = S.Slot(memoryview(bytearray(S.SLOT_BYTES)), 0)
    return PipelineRunner(p, slot, 0, acks.append), acks


def stored(tmp_path: Path) -> list[Any]:
    with sqlite3.connect(tmp_path / "db") as c:
        return [msgspec.json.decode(r[0]) for r in c.execute("SELECT event FROM events ORDER BY rowid")]


def chunk(i: int, *events: Ev) -> Chunk:
    return Chunk(i, msgspec.json.encode(list(events)))


def test_records_ride_on_the_chunks_commit_and_are_not_its_positions(tmp_path: Path) -> None:
    rn, acks = runner(tmp_path, Emitter())
    assert [type(r).__name__ for r in rn.emitters] == ["Runtime"] and rn.tick_interval == 0.5

    async def go() -> None:
        await rn.open()
        await rn.run_chunk(chunk(1, Ev(1, "emit"), Ev(2, "plain"), Ev(3, "emit")))
        await rn.run_chunk(chunk(2, Ev(4, "bad"), Ev(5, "emit")))
        await rn.close_sinks()

    asyncio.run(go())
    rn.close()
    assert [(a.handled, a.failed, a.errors) for a in acks] == [(3, 0, []), (2, 0, [])]
    rows = sorted(msgspec.json.encode(r) for r in stored(tmp_path))  # rowid is the id: not insertion order
    assert rows == sorted(msgspec.json.encode(r) for r in [
        Ev(1, "emit"), Ev(2, "plain"), Ev(3, "emit"), Ev(4, "bad"), Ev(5, "emit"),
        Rec(1, "chunk"), Rec(3, "chunk"), Rec(5, "chunk"),
    ])
    # the refused record went to the dead-letter sink; the chunk's answer does not mention it
    assert rn.dead_records == 1
    (dl,) = read_deadletters(str(tmp_path / "dl.jsonl"))
    assert msgspec.json.decode(dl.payload) == {"id": "bad-4"} and "refused" in dl.reason


def test_tick_expires_and_commits_without_a_chunk_and_survives_a_failing_stage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rn, acks = runner(tmp_path, Emitter(name="broken", fail_expiry=True), Emitter(tick=2.0))
    assert rn.tick_interval == 0.5

    async def go() -> tuple[int, int]:
        await rn.open()
        with caplog.at_level(logging.ERROR, "collector.worker"):
            n = await rn.tick()
        m = await rn.tick()
        await rn.close_sinks()
        return n, m

    n, m = asyncio.run(go())
    rn.close()
    assert (n, m) == (1, 1) and acks == []
    assert stored(tmp_path) == [{"made_from": 0, "why": "expired"}] * 1  # one id: the same record twice
    assert rn.expiring[1].expired == [123.0, 123.0]  # the stage's own clock
    assert "expiry bug" in caplog.text


def test_pair_records_in_a_chunk_and_on_tick(tmp_path: Path) -> None:
    class Click(msgspec.Struct):
        id: int
        event: str
        user_id: str
        timestamp: float
        pv: str

    t = [1000.0]
    pair = Pair(key=("user_id", "pv"), ttl=5.0, clock=lambda: t[0])
    p = Pipeline(name="t", event_type=Click, key="user_id", stages=(pair,), sinks=(SqliteSinkConfig(path=str(tmp_path / "db")),))
    rn = PipelineRunner(p, S.Slot(memoryview(bytearray(S.SLOT_BYTES)), 0), 0, lambda m: None)
    # what Pair publishes is its counters (partial()), never its whole state (snapshot())
    assert [name for name, _ in rn.stateful] == ["pair"]
    idle = rn.snapshots()[0][1]
    assert rn.snapshots()[0][1] is idle and pair.merge([idle])["pending"] == 0  # unchanged: the same bytes

    async def go() -> None:
        await rn.open()
        body = [Click(1, "page_view_start", "u", 10.0, "a"), Click(2, "page_view_end", "u", 14.0, "a"),
                Click(3, "page_view_start", "v", 11.0, "b")]
        await rn.run_chunk(Chunk(1, msgspec.json.encode(body)))
        counts = pair.merge([rn.snapshots()[0][1], idle])
        assert (counts["paired"], counts["pending"]) == (1, 1)
        t[0] += 5
        assert await rn.tick() == 1
        await rn.close_sinks()

    asyncio.run(go())
    rn.close()
    recs = {r.get("reason", "paired"): r for r in stored(tmp_path) if "key" in r}  # omit_defaults
    assert len(stored(tmp_path)) == 5 and set(recs) == {"paired", "expired"}
    assert recs["paired"]["duration_seconds"] == 4.0 and recs["expired"]["key"] == ["v", "b"]


def test_a_batch_with_foreign_records_has_ids_for_them() -> None:
    codec = EventCodec(Ev, "id")
    rec = PairRecord("page_view", ("u", "a"), True, 1.0)
    ids = Batch([Ev(7, "x"), rec, Ev(8, "y")], codec).ids
    assert ids[0] == 7 and ids[2] == 8 and isinstance(ids[1], int) and 0 <= ids[1] < 1 << 63
    assert Batch([rec], codec).ids == [ids[1]]  # the same record, the same id
    text = Batch([rec], EventCodec(msgspec.defstruct("S", [("id", str)]), "id")).ids[0]
    assert isinstance(text, str) and len(text) == 32


def test_aggregate_panes_of_a_processing_time_window_expire_on_tick() -> None:
    from collector.stages.windows import Tumbling

    t = [1000.0]
    agg = Aggregate("n", "count", window=Tumbling(10, retention=20), clock=lambda: t[0]).build()
    agg([Ev(1, "x")])
    snap = agg.snapshot()
    agg.expire(1015.0)
    assert agg.panes and agg.snapshot() is snap  # not closed for long enough: unchanged
    agg.expire(1031.0)
    assert not agg.panes and agg.counters["expired_panes"] == 1 and agg.snapshot() is not snap
    timed = Aggregate("m", "count", window=Tumbling(10, time_field="id", retention=0)).build()
    timed([Ev(1, "x")])
    timed.expire(10_000.0)
    assert timed.panes  # event time moves with events only
