"""NATS JetStream end to end, against the real server (nothing mocked).

Each test makes its own stream and subjects (a random suffix) and deletes them after.
The ledger is the set of ids sent against the ids a sink file or table holds: 0 lost,
0 unexpected. The server's address comes from ``COLLECTOR_NATS_URL`` (default
``nats://127.0.0.1:4222``); absent server → skip, or fail under
``COLLECTOR_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import _need

from collector import Collector
from collector.generic import GenericEvent, generate_generic, generic_pipeline
from collector.ingress.nats import NatsIngress
from collector.sinks import (
    DeadLetterConfig,
    JsonlSinkConfig,
    NatsSinkConfig,
    SqliteSinkConfig,
    build_sink,
)
from collector.sinks.base import Batch, EventCodec

nats = pytest.importorskip("nats")

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def nurl() -> str:
    """The NATS server's URL (COLLECTOR_NATS_URL, else COLLECTOR_TEST_NATS, else the default)."""
    url = os.environ.get("COLLECTOR_NATS_URL") or os.environ.get("COLLECTOR_TEST_NATS") or "nats://127.0.0.1:4222"
    return _need(url, 4222, "NATS")


class Names:
    """One test's stream, subject prefix and consumer, unique on the server."""

    def __init__(self) -> None:
        s = uuid.uuid4().hex[:10]
        self.stream = f"TEST_{s}"
        self.prefix = f"t{s}"
        self.subjects = [f"{self.prefix}.>"]
        self.durable = f"c{s}"


@asynccontextmanager
async def jetstream(url: str, names: Names) -> AsyncIterator[Any]:
    """A JetStream context; the test's stream is deleted afterwards."""
    nc = await nats.connect(url, connect_timeout=5)
    try:
        yield nc.jetstream()
    finally:
        with suppress(Exception):
            await nc.jetstream().delete_stream(names.stream)
        await nc.close()


async def add_stream(js: Any, names: Names, window: float = 120.0) -> None:
    await js.add_stream(name=names.stream, subjects=names.subjects, duplicate_window=window)


async def until(pred: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``pred`` every 50 ms; fail after ``timeout`` seconds (every wait is bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        v = pred()
        if not isinstance(v, bool):
            v = await v
        if v:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def events(n: int) -> list[dict[str, Any]]:
    """``n`` generic events with ids no other test run uses."""
    evs = generate_generic(n, seed=int.from_bytes(os.urandom(3), "big"))
    tag = uuid.uuid4().hex[:8]
    for i, e in enumerate(evs):
        e["id"] = f"{tag}-{i:06d}"
    return evs


async def publish(url: str, subject: str, evs: list[dict[str, Any]], mode: str = "event") -> Any:
    """Publish through the nats sink (as a worker would); returns the sink (for its counters)."""
    codec = EventCodec(GenericEvent, "id")
    sink = build_sink(NatsSinkConfig(url=url, subject=subject, mode=mode), index=0, codec=codec, worker=0)  # type: ignore[arg-type]
    await sink.open()
    await sink.write(Batch(msgspec.convert(evs, list[GenericEvent]), codec))
    await sink.close()
    return sink


def jsonl_ids(pattern: str) -> list[str]:
    out = []
    for p in glob.glob(pattern):
        with open(p, "rb") as f:
            out += [json.loads(ln)["id"] for ln in f if ln.strip()]
    return out


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


async def consumer_state(js: Any, names: Names) -> Any:
    return await js.consumer_info(names.stream, names.durable)


# ---------------------------------------------------------------------- pure parts


def test_subject_template() -> None:
    from collector.errors import ConfigError
    from collector.sinks.nats import SubjectTemplate

    t = SubjectTemplate("events.{type}.{source}")
    assert t.fields == ["type", "source"]
    assert t.render({"type": "a.b c*>", "source": None}) == "events.a_b_c__._"
    assert t.of_objects([{"type": "x", "source": "web"}]) == ["events.x.web"]
    assert SubjectTemplate("events.all").of_objects([{}, {}]) == ["events.all", "events.all"]
    for bad in ("", "events.{0}", "events.{a.b}", "a b"):
        with pytest.raises(ConfigError):
            SubjectTemplate(bad)
    codec = EventCodec(GenericEvent, "id")
    with pytest.raises(ConfigError, match="does not have"):
        build_sink(NatsSinkConfig(subject="events.{colour}"), index=0, codec=codec, worker=0)


# ---------------------------------------------------------------------- the sink


def test_sink_retry_is_a_counted_duplicate_and_stored_once(nurl: str) -> None:
    names = Names()

    async def main() -> None:
        async with jetstream(nurl, names) as js:
            await add_stream(js, names)
            evs = events(50)
            codec = EventCodec(GenericEvent, "id")
            cfg = NatsSinkConfig(url=nurl, subject=f"{names.prefix}.{{type}}")
            sink = build_sink(cfg, index=0, codec=codec, worker=0)
            await sink.open()
            batch = Batch(msgspec.convert(evs, list[GenericEvent]), codec)
            await sink.write(batch)
            assert (sink.published, sink.duplicates) == (50, 0)  # type: ignore[attr-defined]
            await sink.write(batch)  # the retry of a chunk whose PubAcks were lost
            assert (sink.published, sink.duplicates) == (100, 50)  # type: ignore[attr-defined]
            await sink.close()
            info = await js.stream_info(names.stream)
            assert info.state.messages == 50
            # keyed by event type, the id in Nats-Msg-Id
            sub = await js.pull_subscribe(f"{names.prefix}.>", durable="check", stream=names.stream)
            got = await sub.fetch(50, timeout=5)
            assert {m.headers["Nats-Msg-Id"] for m in got} == {e["id"] for e in evs}
            assert all(m.subject == f"{names.prefix}.{json.loads(m.data)['type']}" for m in got)

            # chunk mode: one NDJSON message per subject, its id a hash of the ids
            sink2 = await publish(nurl, f"{names.prefix}.chunk", evs, mode="chunk")
            sink3 = await publish(nurl, f"{names.prefix}.chunk", evs, mode="chunk")
            assert (sink2.duplicates, sink3.duplicates) == (0, 1)
            assert (await js.stream_info(names.stream)).state.messages == 51

    asyncio.run(main())


def test_pipeline_with_the_nats_sink_stores_each_event_once_when_sent_twice(nurl: str) -> None:
    """Workers publish through the sink; the same batch again (a retry, a replay) adds nothing."""
    names = Names()
    evs = events(300)

    async def main() -> None:
        async with jetstream(nurl, names) as js:
            await add_stream(js, names)
            sink = NatsSinkConfig(url=nurl, subject=f"{names.prefix}.{{type}}")
            async with Collector(generic_pipeline(enrich_latency=0, dedup_ttl=0, sinks=(sink,)), workers=2) as c:
                for _ in range(2):
                    res = await (await c.ahandle(evs))
                    assert (res.handled_events, res.failed_events) == (300, 0)
            info = await js.stream_info(names.stream)
            assert info.state.messages == 300
            sub = await js.pull_subscribe(f"{names.prefix}.>", durable="check", stream=names.stream)
            got: list[Any] = []
            while len(got) < 300:
                got += await sub.fetch(300 - len(got), timeout=5)
            assert {m.subject for m in got} == {f"{names.prefix}.{t}" for t in ("user_action", "sensor_data", "system_log")}
            assert sorted(m.headers["Nats-Msg-Id"] for m in got) == sorted(e["id"] for e in evs)

    asyncio.run(main())


# ---------------------------------------------------------------------- the ingress


def _pipeline(tmp: Path, **kw: Any) -> Any:
    return generic_pipeline(
        enrich_latency=0,
        sinks=(JsonlSinkConfig(path=str(tmp / "events-{worker}.jsonl"), fsync="never"),),
        deadletter=DeadLetterConfig(path=str(tmp / "dead-{worker}.jsonl")),
        **kw,
    )


def _ingress(c: Collector, url: str, names: Names, **kw: Any) -> NatsIngress:
    opts: dict[str, Any] = dict(ack_wait=10.0, lag_interval=0.1, nak_delay=0.2, drain_timeout=5.0)
    opts.update(kw)
    return NatsIngress(c, url, stream=names.stream, subjects=names.subjects, durable=names.durable, **opts)


@asynccontextmanager
async def consuming(ing: NatsIngress) -> AsyncIterator[NatsIngress]:
    task = asyncio.create_task(ing.run())
    try:
        await asyncio.wait_for(ing.ready.wait(), 15)
        yield ing
    finally:
        ing.stop()
        await asyncio.wait_for(task, 30)


def test_round_trip_ledger(nurl: str, tmp_path: Path) -> None:
    """publish → stream → NatsIngress → Collector → JSONL sink: 0 lost, 0 unexpected."""
    names = Names()
    single = events(1500)
    ndjson = events(500)  # 25 messages of 20 events

    async def main() -> None:
        async with jetstream(nurl, names) as js:
            async with Collector(_pipeline(tmp_path), workers=2) as c:
                ing = _ingress(c, nurl, names, batch=128)
                async with consuming(ing):
                    await publish(nurl, f"{names.prefix}.{{type}}", single)
                    for lo in range(0, len(ndjson), 20):
                        await publish(nurl, f"{names.prefix}.ndjson", ndjson[lo : lo + 20], mode="chunk")
                    await until(lambda: ing.stats().acked == 1525, 60, "every message acked")
                    await until(lambda: ing.stats().num_pending == 0 and ing.stats().num_ack_pending == 0, 10, "lag 0")
                st = ing.stats()
            assert (st.fetched, st.acked, st.nakked, st.terminated, st.deadlettered) == (1525, 1525, 0, 0, 0)
            assert st.events == 2000
            info = await consumer_state(js, names)
            assert (info.num_pending, info.num_ack_pending) == (0, 0)
        sent = {e["id"] for e in single + ndjson}
        stored = jsonl_ids(str(tmp_path / "events-*.jsonl"))
        assert len(stored) == len(set(stored)), "no event stored twice"
        assert set(stored) - sent == set(), "0 unexpected"
        assert sent - set(stored) == set(), "0 lost"

    asyncio.run(main())


def test_invalid_and_poison_messages_are_dead_lettered_and_the_rest_flow(nurl: str, tmp_path: Path) -> None:
    """Malformed JSON and schema-invalid events are acked and dead-lettered with their
    subject and stream sequence; a message failing in pipeline code is terminated and
    dead-lettered on its max_deliver-th delivery; everything else is stored."""
    from nats_support import Explode

    names = Names()
    good = events(40)
    poison = events(1)[0] | {"user_id": "poison"}
    invalid_event = events(1)[0] | {"type": "bogus"}
    mixed = events(3)
    mixed_lines = [json.dumps(mixed[0]), "{not json", json.dumps(mixed[1]), json.dumps(mixed[2])]

    async def main() -> None:
        async with jetstream(nurl, names) as js:
            await add_stream(js, names)
            # dedup off: this test counts deliveries of the poison message alone
            base = _pipeline(tmp_path, dedup_ttl=0)
            import dataclasses

            pipeline = dataclasses.replace(base, stages=(*base.stages, Explode("poison")))
            async with Collector(pipeline, workers=2) as c:
                # batch=1: the poison message fails alone, not the chunk it shares
                ing = _ingress(c, nurl, names, batch=1, max_deliver=3)
                async with consuming(ing):
                    nc = await nats.connect(nurl)
                    p = names.prefix
                    acks = [await js.publish(f"{p}.bad", b"{not json at all")]
                    acks.append(await js.publish(f"{p}.bad", json.dumps(invalid_event).encode()))
                    acks.append(await js.publish(f"{p}.mixed", "\n".join(mixed_lines).encode()))
                    acks.append(await js.publish(f"{p}.poison", json.dumps(poison).encode()))
                    await nc.close()
                    await publish(nurl, f"{p}.{{type}}", good)
                    await until(lambda: ing.stats().acked == 43 and ing.stats().terminated == 1, 60, "settled")
                    await until(lambda: ing.stats().num_ack_pending == 0, 10, "nothing pending")
                st = ing.stats()
            assert st.terminated == 1
            assert st.nakked == 2  # the poison message's first two deliveries
            assert st.redelivered == 2
            assert st.deadlettered == 4  # 2 malformed here, 1 invalid in a worker, 1 poison
            seq = {"bad": acks[0].seq, "mixed": acks[2].seq, "poison": acks[3].seq}
        stored = set(jsonl_ids(str(tmp_path / "events-*.jsonl")))
        assert stored == {e["id"] for e in good + mixed}
        ingress_dl = records(tmp_path / "dead-nats.jsonl")
        by_subject = {(r["subject"], r["sequence"], r["index"]): r for r in ingress_dl}
        assert set(by_subject) == {
            (f"{names.prefix}.bad", seq["bad"], 0),
            (f"{names.prefix}.mixed", seq["mixed"], 1),
            (f"{names.prefix}.poison", seq["poison"], 0),
        }
        assert by_subject[(f"{names.prefix}.bad", seq["bad"], 0)]["reason"].startswith("malformed JSON")
        pr = by_subject[(f"{names.prefix}.poison", seq["poison"], 0)]
        assert pr["deliveries"] == 3 and "poison message" in pr["reason"] and json.loads(pr["payload"])["id"] == poison["id"]
        worker_dl = [r for p in glob.glob(str(tmp_path / "dead-[0-9]*.jsonl")) for r in records(Path(p))]
        assert [json.loads(r["payload"])["id"] for r in worker_dl] == [invalid_event["id"]]

    asyncio.run(main())


def _sqlite_pipeline(db: Path) -> Any:
    """The generic pipeline into SQLite, failing fast while another connection holds the lock."""
    return generic_pipeline(
        enrich_latency=0,
        dedup_ttl=0,
        sinks=(SqliteSinkConfig(path=str(db), busy_timeout=0.05, backoff=0.05, backoff_max=0.2),),
    )


async def _sink_down(c: Collector, db: Path) -> sqlite3.Connection:
    """Once the sink opened (and made its table), hold SQLite's write lock on ``db``:
    the sink's writes fail until ROLLBACK."""
    await asyncio.sleep(0.5)
    return _write_lock(db)


async def _all_fetched(ing: NatsIngress, url: str, names: Names, evs: list[dict[str, Any]]) -> None:
    await publish(url, f"{names.prefix}.{{type}}", evs)
    await until(lambda: ing.stats().fetched == len(evs), 20, "all fetched")


def _write_lock(db: Path) -> sqlite3.Connection:
    """Hold SQLite's write lock on ``db`` (the sink's writes fail until ROLLBACK)."""
    lock = sqlite3.connect(str(db), isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    return lock


def test_a_batch_waiting_for_its_sink_is_kept_in_progress_past_ack_wait(nurl: str, tmp_path: Path) -> None:
    """ack_wait 1 s, the sink blocked for 3 s: in_progress keeps every message from
    being delivered again; each is acked once, after the commit."""
    names = Names()
    evs = events(40)
    db = tmp_path / "events.db"

    async def main() -> None:
        async with jetstream(nurl, names) as js:
            await add_stream(js, names)
            async with Collector(_sqlite_pipeline(db), workers=1) as c:
                lock = await _sink_down(c, db)
                try:
                    ing = _ingress(c, nurl, names, batch=20, max_batches=40, ack_wait=1.0)
                    async with consuming(ing):
                        await _all_fetched(ing, nurl, names, evs)
                        await asyncio.sleep(3.0)
                        assert ing.stats().acked == 0
                        lock.execute("ROLLBACK")
                        await until(lambda: ing.stats().acked == 40, 30, "every message acked")
                        await asyncio.sleep(1.5)  # a redelivery would show up now
                        st = ing.stats()
                finally:
                    lock.close()
            assert (st.fetched, st.redelivered, st.nakked) == (40, 0, 0)
            info = await consumer_state(js, names)
            assert (info.num_ack_pending, info.num_redelivered) == (0, 0)

    asyncio.run(main())


def test_message_whose_sink_commit_fails_is_not_acked_and_is_redelivered(nurl: str, tmp_path: Path) -> None:
    """The SQLite sink cannot commit (another connection holds the write lock): nothing
    is acked; the collector stops; a second one gets every message again and stores
    each event once. (max_batches: a fetch may return fewer than `batch` messages, and
    every batch stays unsettled while the sink is down.)"""
    names = Names()
    evs = events(60)
    db = tmp_path / "events.db"

    async def main() -> None:
        async with jetstream(nurl, names) as js:
            await add_stream(js, names)
            async with Collector(_sqlite_pipeline(db), workers=1) as c:
                lock = await _sink_down(c, db)
                try:
                    ing = _ingress(c, nurl, names, batch=20, max_batches=60, drain_timeout=1.0)
                    async with consuming(ing):
                        await _all_fetched(ing, nurl, names, evs)
                        await asyncio.sleep(1.5)  # the sink keeps failing meanwhile
                        assert ing.stats().acked == 0
                        info = await consumer_state(js, names)
                        assert info.num_ack_pending == 60
                    assert ing.stats().acked == 0
                    await c.aclose(timeout=2)
                finally:
                    lock.execute("ROLLBACK")
                    lock.close()
            async with Collector(_sqlite_pipeline(db), workers=1) as c2:
                ing2 = _ingress(c2, nurl, names, batch=20)
                async with consuming(ing2):
                    await until(lambda: ing2.stats().acked == 60, 30, "every message acked after recovery")
                    await until(lambda: ing2.stats().num_ack_pending == 0, 10, "nothing pending")
                st = ing2.stats()
            assert st.redelivered == 60 and st.fetched == 60
        with sqlite3.connect(str(db)) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM events")]
        assert sorted(ids) == sorted(e["id"] for e in evs)

    asyncio.run(main())


def test_two_consumers_share_a_durable_and_a_sigkill_loses_nothing(nurl: str, tmp_path: Path) -> None:
    """Scale-out: two `collector consume` processes on one durable consumer; one is
    killed with SIGKILL mid-run; its unacked messages are delivered to the other after
    ack_wait. Ledger across both sinks: 0 lost, 0 unexpected, duplicates at most what
    the killed one had in flight."""
    import signal

    names = Names()
    evs = events(3000)
    batch, max_batches = 50, 4  # the killed consumer holds at most 200 unacked messages

    def start(tag: str) -> subprocess.Popen[bytes]:
        # 0.1 s of enrichment per chunk: the killed one surely holds unacked messages
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'support'}",
                   NATS_TEST_SINK=str(tmp_path / f"{tag}-{{worker}}.jsonl"), NATS_TEST_LATENCY="0.1")
        cmd = [sys.executable, "-m", "collector", "consume", "--from", nurl, "--stream", names.stream,
               "--subject", names.subjects[0], "--durable", names.durable, "--batch", str(batch),
               "--ack-wait", "2", "--pipeline", "nats_support:jsonl_pipeline", "--workers", "1",
               "--stats-interval", "0.5"]
        with open(tmp_path / f"{tag}.log", "wb") as err:
            return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)

    def log(tag: str) -> str:
        return (tmp_path / f"{tag}.log").read_text(errors="replace")

    async def main() -> None:
        async with jetstream(nurl, names) as js:
            await add_stream(js, names)
            a = start("a")
            b = None
            try:
                await until(lambda: "consuming" in log("a"), 60, "consumer a ready")
                b = start("b")
                await until(lambda: "consuming" in log("b"), 60, "consumer b ready")
                sent = 0
                killed_at = None
                for lo in range(0, len(evs), 100):
                    await publish(nurl, f"{names.prefix}.{{type}}", evs[lo : lo + 100])
                    sent += 100
                    await asyncio.sleep(0.05)
                    if killed_at is None and sent >= 1200 and glob.glob(str(tmp_path / "a-*.jsonl")):
                        a.send_signal(signal.SIGKILL)
                        killed_at = sent
                assert killed_at is not None, "consumer a stored nothing before the kill"
                a.wait(10)
                want = {e["id"] for e in evs}
                await until(lambda: want <= set(jsonl_ids(str(tmp_path / "*-*.jsonl"))), 60, "every event stored")
                b.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(b.wait, 30) == 0, log("b")
            finally:
                for p in (a, b):
                    if p is not None and p.poll() is None:
                        p.kill()
                        p.wait(10)
            info = await consumer_state(js, names)
            assert (info.num_pending, info.num_ack_pending) == (0, 0)
        stored = jsonl_ids(str(tmp_path / "*-*.jsonl"))
        assert set(stored) == {e["id"] for e in evs}, "0 lost, 0 unexpected"
        dups = len(stored) - len(set(stored))
        assert dups <= batch * max_batches, f"{dups} duplicates, more than the killed consumer held"
        assert jsonl_ids(str(tmp_path / "a-*.jsonl")) and jsonl_ids(str(tmp_path / "b-*.jsonl")), "both did work"
        final = json.loads(log("b").strip().splitlines()[-1])
        assert final["redelivered"] >= 1  # what a had fetched and not acked came to b

    asyncio.run(main())


def test_ingress_reconnects_after_the_server_restarts(tmp_path: Path) -> None:
    """A private nats-server (its own port and store) is stopped and started again under
    the ingress: it reconnects and resumes; every event is stored."""
    import shutil
    import signal
    import socket

    exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.path.exists(exe):
        if os.environ.get("COLLECTOR_REQUIRE_SERVICES") == "1":
            pytest.fail("nats-server binary not found (COLLECTOR_REQUIRE_SERVICES=1)")
        pytest.skip("nats-server binary not found")
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    store = tmp_path / "js"

    def server() -> subprocess.Popen[bytes]:
        cmd = [exe, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        with socket.socket() as sk:
            return sk.connect_ex(("127.0.0.1", port)) == 0

    names = Names()
    first, second = events(300), events(300)

    async def main() -> None:
        srv = server()
        try:
            await until(up, 15, "private nats-server up")
            async with Collector(_pipeline(tmp_path), workers=1) as c:
                ing = _ingress(c, url, names, batch=50)
                async with consuming(ing):
                    await publish(url, f"{names.prefix}.{{type}}", first)
                    await until(lambda: ing.stats().acked == 300, 30, "first half acked")
                    assert ing.connected and ing.state.last_error is None, ing.state
                    srv.send_signal(signal.SIGTERM)
                    await asyncio.to_thread(srv.wait, 15)
                    # what /ingress and /ready show: disconnected, and why
                    await until(lambda: not ing.connected, 10, "the ingress to see the outage")
                    await asyncio.sleep(1.0)  # fetches fail meanwhile
                    assert ing.state.last_error is not None, ing.state
                    srv = server()
                    await until(up, 15, "private nats-server up again")
                    await until(lambda: ing.connected, 30, "the ingress connected again")
                    await publish(url, f"{names.prefix}.{{type}}", second)
                    await until(lambda: ing.stats().acked == 600, 60, "second half acked after the restart")
        finally:
            if srv.poll() is None:
                srv.terminate()
                srv.wait(15)
        stored = jsonl_ids(str(tmp_path / "events-*.jsonl"))
        assert sorted(stored) == sorted(e["id"] for e in first + second)

    asyncio.run(main())


# ---------------------------------------------------------------------- the CLI


def test_collector_publish_from_the_command_line(nurl: str, tmp_path: Path) -> None:
    names = Names()
    nd = tmp_path / "in.ndjson"
    file_events = events(30)
    nd.write_text("\n".join(json.dumps(e) for e in file_events) + "\n")

    async def main() -> None:
        async with jetstream(nurl, names) as js:
            await add_stream(js, names)
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            cmd = [sys.executable, "-m", "collector", "publish", "generic", "--to", nurl,
                   "--subject", f"{names.prefix}.{{type}}", "--count", "250", "--rate", "2000"]
            r = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60, env=env)
            assert r.returncode == 0, r.stderr
            assert "published 250 events in 250 messages" in r.stdout
            assert "published 250 events" in r.stderr  # the progress line
            cmd = [sys.executable, "-m", "collector", "publish", "--file", str(nd), "--to", nurl,
                   "--subject", f"{names.prefix}.file", "--per-message", "10"]
            for _ in range(2):  # the second run is all duplicates
                r = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60, env=env)
                assert r.returncode == 0, r.stderr
            assert "30 events in 3 messages" in r.stdout and "(3 duplicates)" in r.stdout
            assert (await js.stream_info(names.stream)).state.messages == 253
            sub = await js.pull_subscribe(f"{names.prefix}.>", durable="check", stream=names.stream)
            got: list[Any] = []
            while len(got) < 253:
                got += await sub.fetch(253 - len(got), timeout=5)
            gen = [m for m in got if not m.subject.endswith(".file")]
            assert len({m.headers["Nats-Msg-Id"] for m in gen}) == 250
            assert all(m.headers["Nats-Msg-Id"] == json.loads(m.data)["id"] for m in gen)
            lines = [json.loads(ln)["id"] for m in got if m.subject.endswith(".file") for ln in m.data.splitlines()]
            assert lines == [e["id"] for e in file_events]

    asyncio.run(main())
