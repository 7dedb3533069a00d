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
