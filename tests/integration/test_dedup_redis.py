"""Dedup shared through a real Redis (``Dedup(store="redis")``, seed 003).

* two Collectors (separate supervisors and worker processes) on one Redis: an id one
  stored is a duplicate for the other; the ledger over both stores: 0 lost, 0 stored twice;
* a key field and a TTL per event type (attempts, sessions, placements), short TTLs;
* ack after commit across processes: a chunk whose sink failed releases its claims, so
  the retry (here or in the other collector) is stored, not dropped as a duplicate; a
  copy of an id another process holds pending waits for its outcome;
* Redis unreachable: ``on_unavailable`` (``retry``: refused, ``pass``: stored unchecked),
  counted, no crash;
* ``[[stages]] kind = "dedup"`` with the new fields, and bad values, in ``check-config``.

Each test uses its own key prefix and deletes its keys. Skipped without Redis (a
failure under ``COLLECTOR_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import wait_until
from dedup_support import Seed3Event, attempt, dedup, pipeline
from ledger import Ledger

from collector import Collector
from collector.sinks import DeadLetterConfig, JsonlSinkConfig

redis = pytest.importorskip("redis")




def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


async def drops(window: Any, events: list[Any]) -> list[tuple[int, str]]:
    got = window(events)
    if type(got) is not list:
        got = await got
    return [(d.pos, d.kind) for d in got]


async def settle(window: Any, events: list[Any], ok: bool, failed: Any = ()) -> None:
    res = window.settle(events, ok, failed)
    if res is not None:
        await res


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_dec = msgspec.json.Decoder(Seed3Event)


def stored_ids(*dirs: Path) -> list[str]:
    """Every id written to the JSONL files under ``dirs`` (a repeat: stored twice)."""
    out = []
    for d in dirs:
        for f in sorted(d.glob("*.jsonl")):
            out += [_dec.decode(line).id for line in f.read_bytes().splitlines()]
    return out


def answer(ledger: Ledger, res: Any, batch: list[Seed3Event]) -> Counter[str]:
    """Record an engine result in the ledger as the daemon would answer it; the statuses."""
    kinds = {e.index: e.kind for e in res.errors}
    results = [{"id": ev.id, "status": kinds.get(i, "accepted")} for i, ev in enumerate(batch)]
    ledger.answer(results, [ev.id for ev in batch])
    return Counter(r["status"] for r in results)


# ------------------------------------------------------------------ two collectors
def test_two_collectors_share_the_window_an_id_one_stored_is_a_duplicate_for_the_other(
    redis_url: str, prefix: str, tmp_path: Path, no_leaks: None
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    ledger = Ledger()
    first = [attempt(f"a{i}") for i in range(200)]
    new = [attempt(f"b{i}") for i in range(100)]
    p1 = pipeline(redis_url, prefix, sinks=(JsonlSinkConfig(path=str(one / "events-{worker}.jsonl")),))
    p2 = pipeline(redis_url, prefix, sinks=(JsonlSinkConfig(path=str(two / "events-{worker}.jsonl")),))
    with Collector(p1, workers=2) as c1, Collector(p2, workers=2) as c2:
        for batch in (first, new):
            ledger.send(ev.id for ev in batch)
        assert answer(ledger, c1.handle(first).wait(timeout=60), first) == {"accepted": 200}
        # the same 200 (stored by the other collector) and 100 new ones
        both = first + new
        assert answer(ledger, c2.handle(both).wait(timeout=60), both) == {"duplicate": 200, "accepted": 100}
        # back to the first: the new ones are known only through Redis there
        assert answer(ledger, c1.handle(new).wait(timeout=60), new) == {"duplicate": 100}
        d2 = wait_until(lambda: (a := c2.aggregate("dedup")) and sum(a.values()) == 200 and a, 10,
                        what="c2's duplicate counts")
        assert d2 == {"attempt": 200}
        n2 = wait_until(lambda: (n := c2.aggregate("dedup", counters=True))["remote_duplicates"] == 200 and n, 10,
                        what="c2's counters")
        assert n2["remote_checked"] == 300 and n2["unavailable"] == 0
        assert n2["round_trips"] >= 2  # at least one claim and one settle per worker that had keys
        assert c2.stats().duplicates_dropped == 200
    verdict = ledger.check(stored_ids(one, two))
    verdict.assert_clean()
    assert verdict.duplicated == 0 and verdict.stored == 300


def test_two_collectors_sent_the_same_ids_at_once_store_each_once(
    redis_url: str, prefix: str, tmp_path: Path, no_leaks: None
) -> None:
    """Both collectors get the same 3,000 ids at the same time, in different chunk
    orders: every id is claimed by one of them, the other answers ``duplicate`` (after
    waiting for the claim when it was still pending); the stores hold each id once."""
    one, two = tmp_path / "one", tmp_path / "two"
    ledger = Ledger()
    batch = [attempt(f"c{i}") for i in range(3000)]
    ledger.send(ev.id for ev in batch)
    p1 = pipeline(redis_url, prefix, sinks=(JsonlSinkConfig(path=str(one / "events-{worker}.jsonl")),), wait=20)
    p2 = pipeline(redis_url, prefix, sinks=(JsonlSinkConfig(path=str(two / "events-{worker}.jsonl")),), wait=20)
    with Collector(p1, workers=2, chunk_size=100) as c1, Collector(p2, workers=2, chunk_size=100) as c2:
        rev = batch[::-1]
        op1, op2 = c1.handle(batch), c2.handle(rev)
        s1 = answer(ledger, op1.wait(timeout=120), batch)
        s2 = answer(ledger, op2.wait(timeout=120), rev)
    assert s1["accepted"] + s2["accepted"] == 3000 and s1["duplicate"] + s2["duplicate"] == 3000, (s1, s2)
    verdict = ledger.check(stored_ids(one, two))
    verdict.assert_clean()
    assert verdict.duplicated == 0 and verdict.stored == 3000


# ------------------------------------------------------------------ per-type keys and TTLs
def test_each_type_is_keyed_by_its_own_field_with_its_own_ttl(redis_url: str, prefix: str) -> None:
    spec = dedup(redis_url, prefix, ttl=30, ttl_by_type={"attempt": 0.3, "session": 1.0, "placement": 30})
    r = redis.Redis.from_url(redis_url)

    async def main() -> None:
        w = spec.build()
        chunk = [
            Seed3Event("e1", "attempt", client_attempt_id="k"),
            Seed3Event("e2", "session", session_id="k"),  # the same value, another type: not a copy
            Seed3Event("e3", "placement", placement_id="k"),
            Seed3Event("e4", "other"),  # not listed: keyed by `field` (id)
            Seed3Event("e5", "attempt"),  # no client_attempt_id: passes, counted
            Seed3Event("e6", "attempt", session_id="k", client_attempt_id="k2"),
        ]
        assert await drops(w, chunk) == []
        await settle(w, chunk, True)
        ttl = {k: r.pttl(prefix + k) for k in ("attempt:k", "session:k", "placement:k", "e4", "attempt:k2")}
        assert 0 < ttl["attempt:k"] <= 300 and 300 < ttl["session:k"] <= 1000, ttl
        assert 1000 < ttl["placement:k"] <= 30_000 and 1000 < ttl["e4"] <= 30_000, ttl
        assert w.counters["missing_key"] == 1
        # another worker (cold window): every copy is a duplicate through Redis; the
        # attempt without a key passes again
        other = spec.build()
        again = [
            Seed3Event("x1", "attempt", client_attempt_id="k"),
            Seed3Event("x2", "session", session_id="k"),
            Seed3Event("x3", "placement", placement_id="k"),
            Seed3Event("e4", "other"),
            Seed3Event("x5", "attempt"),
        ]
        assert await drops(other, again) == [(0, "duplicate"), (1, "duplicate"), (2, "duplicate"), (3, "duplicate")]
        await settle(other, again, True)
        await asyncio.sleep(0.45)  # the attempt's 0.3 s have passed, the session's 1 s have not
        later = [Seed3Event("y1", "attempt", client_attempt_id="k"), Seed3Event("y2", "session", session_id="k")]
        assert await drops(other, later) == [(1, "duplicate")]
        await settle(other, later, True)
        assert await drops(w, [Seed3Event("y3", "attempt", client_attempt_id="k")]) == [(0, "duplicate")]
        await asyncio.sleep(0.7)  # now the session's TTL has passed too
        last = [Seed3Event("z2", "session", session_id="k")]
        assert await drops(w, last) == []
        c = Counter(other.dups)
        assert c == {"attempt": 1, "session": 2, "placement": 1, "other": 1}
        for win in (w, other):
            await win.aclose()

    try:
        run(main())
    finally:
        r.close()


# ------------------------------------------------------------------ ack after commit
def test_a_copy_held_pending_by_another_process_waits_for_its_outcome(redis_url: str, prefix: str) -> None:
    """Windows of one spec stand for two processes: one claims, the other's copy polls."""
    spec = dedup(redis_url, prefix, wait=5)

    async def main() -> None:
        a, b = spec.build(), spec.build()
        held = [attempt("p1"), attempt("p2")]
        assert await drops(a, held) == []
        copy = asyncio.ensure_future(drops(b, [attempt("p1")]))
        await asyncio.sleep(0.05)
        assert not copy.done()  # pending in a: polled, not answered
        await settle(a, held, True)
        assert await copy == [(0, "duplicate")]
        # a chunk that failed releases its claims: the copy waiting in b is stored in its place
        failed = [attempt("f1")]
        assert await drops(a, failed) == []
        copy2 = [attempt("f1")]
        waiting = asyncio.ensure_future(drops(b, copy2))
        await asyncio.sleep(0.05)
        await settle(a, failed, False)
        assert await waiting == []
        await settle(b, copy2, True)
        assert await drops(a, [attempt("f1")]) == [(0, "duplicate")]
        # an event a sink dead-lettered is released too; the rest of its chunk is stored
        chunk = [attempt("d1"), attempt("d2")]
        assert await drops(a, chunk) == []
        await settle(a, chunk, True, [chunk[1]])
        assert await drops(b, [attempt("d1"), attempt("d2")]) == [(0, "duplicate")]
        assert b.counters["remote_waits"] == 2 and b.counters["remote_duplicates"] >= 2
        for w in (a, b):
            await w.aclose()

    run(main())


def test_a_copy_still_pending_elsewhere_after_the_wait_is_told_to_retry(redis_url: str, prefix: str) -> None:
    spec = dedup(redis_url, prefix, wait=0.2)

    async def main() -> None:
        a, b = spec.build(), spec.build()
        held = [attempt("s1")]
        assert await drops(a, held) == []
        assert await drops(b, [attempt("s1"), attempt("s2")]) == [(0, "retry")]
        await settle(a, held, True)
        for w in (a, b):
            await w.aclose()

    run(main())


def test_a_sink_that_fails_once_its_retry_is_stored_not_dropped(
    redis_url: str, prefix: str, tmp_path: Path, no_leaks: None
) -> None:
    """The first collector's JSONL sink cannot write (its directory is a file), spends
    its one retry and dead-letters the chunk. The retries, to the other collector and
    then to the repaired first one, are stored once each; nothing is answered
    ``duplicate`` before it is stored."""
    blocker = tmp_path / "one"
    blocker.write_text("")  # a file where the sink's directory should be
    two = tmp_path / "two"
    ledger = Ledger()
    sink1 = JsonlSinkConfig(path=str(blocker / "events-{worker}.jsonl"), retries=1, backoff=0.01)
    p1 = pipeline(redis_url, prefix, sinks=(sink1,), deadletter=DeadLetterConfig(path=str(tmp_path / "dl-{worker}.jsonl")))
    p2 = pipeline(redis_url, prefix, sinks=(JsonlSinkConfig(path=str(two / "events-{worker}.jsonl")),))
    batch = [attempt(f"r{i}") for i in range(60)]
    ledger.send(ev.id for ev in batch)
    with Collector(p1, workers=2) as c1, Collector(p2, workers=2) as c2:
        assert answer(ledger, c1.handle(batch).wait(timeout=60), batch) == {"deadlettered": 60}
        half, rest = batch[:30], batch[30:]
        assert answer(ledger, c2.handle(half).wait(timeout=60), half) == {"accepted": 30}
        blocker.unlink()
        blocker.mkdir()  # the first collector's sink works again
        assert answer(ledger, c1.handle(rest).wait(timeout=60), rest) == {"accepted": 30}
        assert answer(ledger, c1.handle(half).wait(timeout=60), half) == {"duplicate": 30}
        assert answer(ledger, c2.handle(batch).wait(timeout=60), batch) == {"duplicate": 60}
    stored = stored_ids(blocker, two)
    verdict = ledger.check(stored)
    verdict.assert_clean()
    assert verdict.duplicated == 0 and verdict.stored == 60 and ledger.answers["accepted"] == 60


# ------------------------------------------------------------------ Redis unavailable
@pytest.mark.parametrize(("policy", "answers"), [("retry", {"retry": 20}), ("pass", {"accepted": 20})])
def test_redis_unavailable_applies_the_policy_counted_without_a_crash(
    policy: str, answers: dict[str, int], tmp_path: Path, no_leaks: None
) -> None:
    """Needs no Redis server (the redis package only): the URL points at a closed port."""
    dead = f"redis://127.0.0.1:{closed_port()}/0"
    p = pipeline(dead, "test:dedup:down:", sinks=(JsonlSinkConfig(path=str(tmp_path / "events-{worker}.jsonl")),),
                 on_unavailable=policy, timeout=0.5)
    batch = [attempt(f"u{i}") for i in range(20)]
    with Collector(p, workers=2) as c:
        res = c.handle(batch).wait(timeout=60)
        assert Counter(e.kind for e in res.errors) == {k: v for k, v in answers.items() if k != "accepted"}
        assert res.failed_events == answers.get("retry", 0)
        n = wait_until(lambda: (x := c.aggregate("dedup", counters=True))["unavailable"] == 20 and x, 10,
                       what="the unavailable count")
        assert n["remote_checked"] == 20
        again = c.handle(batch).wait(timeout=60)  # the workers are still there, and answer the same way
        if policy == "pass":  # stored unchecked, then known to the worker's own window
            assert [e.kind for e in again.errors] == ["duplicate"] * 20
        else:
            assert [e.kind for e in again.errors] == ["retry"] * 20
        assert c.stats().worker_restarts == 0
    assert len(stored_ids(tmp_path)) == answers.get("accepted", 0)


# ------------------------------------------------------------------ configuration
def _check_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "collector", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60)


GOOD = """
[[stages]]
kind = "dedup"
name = "shared"
store = "redis"
redis_url = "redis://127.0.0.1:6379/0"
prefix = "app:dedup:"
type_field = "type"
key_by_type = { attempt = "client_attempt_id", session = "session_id", placement = "placement_id" }
ttl_by_type = { attempt = 86400, session = 43200, placement = 604800 }
on_unavailable = "pass"
"""


@pytest.mark.parametrize(("change", "why"), [
    (('on_unavailable = "pass"', 'on_unavailable = "maybe"'), "on_unavailable must be one of retry, pass"),
    (("session = 43200", "session = -1"), "ttl_by_type values must be seconds >= 0"),
    (('type_field = "type"\n', ""), "need type_field"),
    (('store = "redis"', 'store = "memcached"'), "store must be one of memory, redis"),
    (('placement = "placement_id" }', 'placement = 3 }'), r"Expected `str`, got `int`"),
])
def test_dedup_tables_in_check_config(change: tuple[str, str], why: str, tmp_path: Path) -> None:
    r = _check_config(tmp_path, GOOD)
    assert r.returncode == 0, r.stderr
    r = _check_config(tmp_path, GOOD.replace(*change))
    assert r.returncode == 2 and "$.stages[0]" in r.stderr and why in r.stderr, r.stderr
