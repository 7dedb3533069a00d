"""Keyed state under scale-out: two ``collector serve --pack clickstream`` ETL daemons on
one JetStream durable consumer share its messages, so one page view's start and end
often reach different daemons. With ``pair_store = "redis"`` the waiting half is in
Redis, shared by both: every page view is paired exactly once across the two daemons.

Ledger: every event id published is stored once over both daemons' sinks (none lost,
none unexpected), every page_view_id has exactly one ``page_view`` record, paired, and
some page views were paired across daemons (the start stored by one, the end by the
other), so the test exercises what it claims.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import Counter
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import _need, wait_until
from test_daemon import Daemon, start_daemon

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

N = 300  # page views: 600 halves


def _ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def page_views(n: int) -> tuple[list[dict[str, Any]], list[str]]:
    """``n`` page views' halves in stream order (a third of the starts, then ends and starts
    interleaved, then the rest of the ends; every start before its end), and their ids."""
    t0 = datetime.now(UTC)
    tag = uuid.uuid4().hex[:8]
    starts, ends, pvs = [], [], []
    for i in range(n):
        pv = str(uuid.uuid4())
        pvs.append(pv)
        user = f"u-{tag}-{i % 37}"
        base = {"user_id": user, "session_id": f"s-{tag}-{i % 37}"}
        starts.append({**base, "id": f"{tag}-s{i}", "event": "page_view_start", "timestamp": _ts(t0 + timedelta(seconds=i)),
                       "data": {"page_view_id": pv, "page_type": "movie"}})
        ends.append({**base, "id": f"{tag}-e{i}", "event": "page_view_end",
                     "timestamp": _ts(t0 + timedelta(seconds=i + 5 + i % 7)),
                     "data": {"page_view_id": pv, "page_type": "movie"}})
    third = n // 3
    order = starts[:third]
    for i in range(third, n):
        order += [ends[i - third], starts[i]]
    order += ends[n - third:]
    assert len(order) == 2 * n
    return order, pvs


def stored(d: Daemon) -> list[dict[str, Any]]:
    out = []
    for p in d.data.glob("events-*.jsonl"):
        out += [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
    return out


def test_two_etl_daemons_on_one_durable_pair_every_page_view_once_through_redis(tmp_path: Path, redis_url: str,
                                                                                  no_leaks: None) -> None:
    nats = pytest.importorskip("nats")
    redis = pytest.importorskip("redis")
    from test_nats import Names

    nurl = _need(os.environ.get("COLLECTOR_NATS_URL") or "nats://127.0.0.1:4222", 4222, "NATS")
    names = Names()
    prefix = f"pvtest:{names.durable}:"  # this test's halves only
    evs, pvs = page_views(N)

    async def stream(what: str) -> None:
        nc = await nats.connect(nurl, connect_timeout=5)
        try:
            js = nc.jetstream()
            if what == "delete":
                with suppress(Exception):
                    await js.delete_stream(names.stream)
            elif what == "create":
                await js.add_stream(name=names.stream, subjects=names.subjects)
            else:
                for k, e in enumerate(evs):  # one event per message; the id is the message id
                    await js.publish(f"{names.prefix}.{e['event']}", json.dumps(e).encode(),
                                     headers={"Nats-Msg-Id": e["id"]}, timeout=10)
                    if k % 20 == 19:
                        await asyncio.sleep(0.01)  # a steady flow both daemons fetch from
        finally:
            await nc.close()

    cfg = "\n".join([
        "[pipeline]", 'pack = "clickstream"', "[pipeline.options]", 'role = "etl"', f"redis_url = {json.dumps(redis_url)}",
        'pair_store = "redis"', f"pair_prefix = {json.dumps(prefix)}",
        "[[sinks]]", 'kind = "jsonl"', 'path = "events-{worker}.jsonl"',
        # small fetches, so both daemons get a share of the messages
        "[source]", "batch = 4", "fetchers = 1", "max_batches = 2", "ack_wait = 20.0", "",
    ])
    args = ["--source", nurl, "--stream", names.stream, "--subject", f"{names.prefix}.>", "--durable", names.durable]
    daemons: list[Daemon] = []
    r = redis.Redis.from_url(redis_url)
    try:
        asyncio.run(stream("create"))
        for tag in ("a", "b"):
            (tmp_path / tag).mkdir()
            daemons.append(start_daemon(tmp_path / tag, cfg, workers=1, args=args))
        asyncio.run(stream("publish"))  # both consume while it flows in

        def done() -> bool:
            return sum(len(stored(d)) for d in daemons) >= 3 * N  # 2N halves + N page views

        wait_until(done, 120, interval=0.2, what=f"{3 * N} rows over both daemons")
        wait_until(lambda: all(d.get("/ingress")[1]["messages_inflight"] == 0 for d in daemons), 30,
                   what="nothing left in flight")
        ingress = [d.get("/ingress")[1] for d in daemons]
        for d in daemons:
            assert d.stop() == 0, d.log.read_text()[-3000:]
        rows = [stored(d) for d in daemons]
    finally:
        for d in daemons:
            with suppress(Exception):
                d.stop()
        asyncio.run(stream("delete"))
        with suppress(Exception):
            keys = list(r.scan_iter(match=prefix + "*", count=1000))
            if keys:
                r.delete(*keys)
        r.close()

    # the halves: every id once over both daemons (none lost, none unexpected, none twice)
    sent = Counter(e["id"] for e in evs)
    halves = Counter(x["id"] for rs in rows for x in rs if x["event"] != "page_view")
    assert set(halves) == set(sent), (len(set(sent) - set(halves)), len(set(halves) - set(sent)))
    assert max(halves.values()) == 1
    # the page views: each page_view_id exactly once, paired, with a duration
    views = [x for rs in rows for x in rs if x["event"] == "page_view"]
    by_pv = Counter(v["data"]["page_view_id"] for v in views)
    assert set(by_pv) == set(pvs) and max(by_pv.values()) == 1, (len(by_pv), len(pvs))
    assert all(v["data"]["paired"] is True and v["data"]["duration_seconds"] >= 5 for v in views), views[:3]
    # both daemons took a share, and pairs were made across them
    assert all(rs for rs in rows), [len(rs) for rs in rows]
    where = {x["id"]: i for i, rs in enumerate(rows) for x in rs}
    tag = evs[0]["id"].rsplit("-", 1)[0]
    across = sum(where[f"{tag}-s{i}"] != where[f"{tag}-e{i}"] for i in range(N))
    assert across > 0, "every page view's halves went to one daemon: the test did not exercise scale-out"
    assert sum(i["acked"] for i in ingress) == 2 * N and all(i["fetched"] > 0 for i in ingress), ingress
    print(f"\n{across} of {N} page views had their halves on different daemons; "
          f"rows per daemon: {[len(rs) for rs in rows]}")


def test_partitioned_by_subject_each_daemon_pairs_its_users_in_memory(tmp_path: Path, no_leaks: None) -> None:
    """The other answer: partition the stream by subject. The nats sink publishes to
    ``<prefix>.<event>.{user_id:p2}`` (the user's partition out of 2), and each daemon has
    its own durable filtering one partition (``<prefix>.*.0`` / ``.1``), so one user's
    halves always reach one daemon and per-worker memory pairing is enough."""
    nats = pytest.importorskip("nats")
    import msgspec
    from test_nats import Names

    from collector.packs.clickstream import click_event_type
    from collector.sinks import NatsSinkConfig, build_sink
    from collector.sinks.base import Batch, EventCodec

    nurl = _need(os.environ.get("COLLECTOR_NATS_URL") or "nats://127.0.0.1:4222", 4222, "NATS")
    names = Names()
    evs, pvs = page_views(N)

    async def publish() -> None:
        codec = EventCodec(click_event_type(), "id")
        sink = build_sink(NatsSinkConfig(url=nurl, subject=names.prefix + ".{event}.{user_id:p2}"), index=0,
                          codec=codec, worker=0)  # type: ignore[arg-type]
        await sink.open()
        try:
            for k in range(0, len(evs), 20):
                await sink.write(Batch(msgspec.convert(evs[k:k + 20], list[click_event_type()]), codec))
        finally:
            await sink.close()

    async def delete() -> None:
        nc = await nats.connect(nurl, connect_timeout=5)
        try:
            with suppress(Exception):
                await nc.jetstream().delete_stream(names.stream)
        finally:
            await nc.close()

    cfg = "\n".join([
        "[pipeline]", 'pack = "clickstream"', "[pipeline.options]", 'role = "etl"', 'pair_store = "memory"',
        "[[sinks]]", 'kind = "jsonl"', 'path = "events-{worker}.jsonl"',
        # whichever daemon starts first creates the stream over every partition
        "[source]", f"stream_subjects = [{json.dumps(names.prefix + '.>')}]", "",
    ])
    daemons: list[Daemon] = []
    try:
        for p in (0, 1):
            (tmp_path / f"p{p}").mkdir()
            daemons.append(start_daemon(tmp_path / f"p{p}", cfg, workers=1, args=[
                "--source", nurl, "--stream", names.stream, "--subject", f"{names.prefix}.*.{p}",
                "--durable", f"{names.durable}-p{p}"]))
        asyncio.run(publish())
        wait_until(lambda: sum(len(stored(d)) for d in daemons) >= 3 * N, 120, interval=0.2,
                   what=f"{3 * N} rows over both daemons")
        ingress = [d.get("/ingress")[1] for d in daemons]
        for d in daemons:
            assert d.stop() == 0, d.log.read_text()[-3000:]
        rows = [stored(d) for d in daemons]
    finally:
        for d in daemons:
            with suppress(Exception):
                d.stop()
        asyncio.run(delete())

    halves = Counter(x["id"] for rs in rows for x in rs if x["event"] != "page_view")
    assert set(halves) == {e["id"] for e in evs} and max(halves.values()) == 1
    views = [x for rs in rows for x in rs if x["event"] == "page_view"]
    by_pv = Counter(v["data"]["page_view_id"] for v in views)
    assert set(by_pv) == set(pvs) and max(by_pv.values()) == 1, (len(by_pv), len(pvs))
    assert all(v["data"]["paired"] is True for v in views), [v for v in views if not v["data"]["paired"]][:3]
    # one user, one daemon; both partitions used
    owner: dict[str, set[int]] = {}
    for i, rs in enumerate(rows):
        for x in rs:
            owner.setdefault(x["user_id"], set()).add(i)
    assert all(len(s) == 1 for s in owner.values()), {u: s for u, s in owner.items() if len(s) > 1}
    assert all(rs for rs in rows), [len(rs) for rs in rows]
    assert [i["subjects"] for i in ingress] == [[f"{names.prefix}.*.0"], [f"{names.prefix}.*.1"]]
    assert sum(i["acked"] for i in ingress) == 2 * N, ingress
