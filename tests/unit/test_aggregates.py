"""Aggregates against a brute-force reference: two simulated workers' partials, merged.

Events are generated, sharded by user into two ``AggregateRuntime``s (as the engine
shards by key), fed in chunks, snapshotted to bytes and merged; every figure is
compared with the same figure computed directly over all events. One test runs an
``Aggregate`` stage inside a real ``Collector``.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import zlib
from typing import Any

import msgspec
import pytest

from collector.errors import ConfigError
from collector.stages.aggregates import Aggregate, AggregateResult, merge, read
from collector.stages.materialized import seed001
from collector.stages.windows import Global, Hopping, Sliding, Tumbling

T0 = 1_700_000_000.0


class Ev(msgspec.Struct):
    id: int
    user: str | None
    region: str
    type: str
    amount: Any
    t: Any
    won: bool = False


def events(n: int = 20_000, users: int = 3000, seed: int = 1) -> list[Ev]:
    rnd = random.Random(seed)
    regions = ["eu", "us", "ap", "sa", "af"]
    return [
        Ev(
            id=i,
            user=f"u{int(rnd.paretovariate(1.2)) % users}",
            region=rnd.choice(regions),
            type=rnd.choice(["bet", "bet", "deposit", "game_start"]),
            amount=rnd.randrange(-500, 2000) if rnd.random() < 0.7 else round(rnd.uniform(0, 99), 3),
            t=T0 + i * 0.05 + rnd.uniform(-20, 0),  # out of order by up to 20 s
            won=rnd.random() < 0.05,
        )
        for i in range(n)
    ]


def shard(evs: list[Ev], workers: int = 2) -> list[list[Ev]]:
    out: list[list[Ev]] = [[] for _ in range(workers)]
    for e in evs:
        out[zlib.crc32(str(e.user).encode()) % workers].append(e)
    return out


def run(agg: Aggregate, evs: list[Ev], chunk: int = 512, by_key: bool = True) -> AggregateResult:
    """Feed two runtimes (sharded by user, or alternately) in chunks; merge their snapshots."""
    parts = shard(evs) if by_key else [evs[0::2], evs[1::2]]
    snaps = []
    for part in parts:
        rt = agg.build()
        for i in range(0, len(part), chunk):
            assert rt(part[i : i + chunk]) == []  # an aggregate never drops
        snaps.append(rt.snapshot())
    return merge(snaps)


def ref_groups(evs: list[Ev], by: Any) -> dict[Any, list[Ev]]:
    g: dict[Any, list[Ev]] = collections.defaultdict(list)
    for e in evs:
        g[by(e)].append(e)
    return g


@pytest.mark.parametrize("by_key", [True, False], ids=["sharded", "unsharded"])
@pytest.mark.parametrize("by", [None, "region", ("region", "type")])
@pytest.mark.parametrize("fn", ["count", "sum", "avg", "min", "max"])
def test_exact_functions_match_brute_force(fn: str, by: Any, by_key: bool) -> None:
    evs = events()
    agg = Aggregate(f"{fn}", fn, by=by, value=None if fn == "count" else "amount")
    res = run(agg, evs, by_key=by_key)
    key = (lambda e: None) if by is None else (lambda e: getattr(e, by)) if isinstance(by, str) else (
        lambda e: (e.region, e.type)
    )
    ops = {
        "count": len,
        "sum": lambda es: sum(e.amount for e in es),
        "avg": lambda es: sum(e.amount for e in es) / len(es),
        "min": lambda es: min(e.amount for e in es),
        "max": lambda es: max(e.amount for e in es),
    }
    want = {k: ops[fn](es) for k, es in ref_groups(evs, key).items()}
    got = read(res)
    if by is None:
        assert got == pytest.approx(want[None])
    else:
        assert got == pytest.approx(want)
        k0 = next(iter(want))
        assert read(res, k0) == pytest.approx(want[k0])
    assert res.counters["events"] == len(evs) and res.workers == 2


def test_where_pair_dict_and_callable() -> None:
    evs = events()
    bets = Aggregate("bets", "count", by="region", where=("type", "bet"))
    wins = Aggregate("wins", "count", where={"type": "bet", "won": True})
    big = Aggregate("big", "count", where=_big)
    assert read(run(bets, evs)) == dict(collections.Counter(e.region for e in evs if e.type == "bet"))
    assert read(run(wins, evs)) == sum(1 for e in evs if e.type == "bet" and e.won)
    assert read(run(big, evs)) == sum(1 for e in evs if _big(e))


def _big(e: Ev) -> bool:
    return bool(e.amount > 1000)


def test_top_k_sharded_by_item_is_exact() -> None:
    evs = events()
    res = run(Aggregate("top", "top_k", by="user", k=10), evs)
    want = collections.Counter(e.user for e in evs)
    got = read(res)
    assert [n for _, n in got] == [n for _, n in want.most_common(10)]
    assert all(want[u] == n for u, n in got)
    assert read(res, got[0][0]) == got[0][1]
    # sums, top 5 deposits
    res = run(Aggregate("dep", "top_k", by="user", value="amount", k=5, where=("type", "deposit")), evs)
    sums: dict[Any, float] = collections.defaultdict(float)
    for e in evs:
        if e.type == "deposit":
            sums[e.user] += e.amount
    best = sorted(sums.values(), reverse=True)[:5]
    assert [v for _, v in read(res)] == pytest.approx(best)


def test_top_k_pruned_and_unsharded_stays_within_its_error_bound() -> None:
    evs = events(30_000)
    rnd = random.Random(9)
    for e in evs:  # a few heavy hitters over a long uniform tail
        e.user = f"h{rnd.randrange(10)}" if rnd.random() < 0.2 else f"u{rnd.randrange(5000)}"
    agg = Aggregate("top", "top_k", by="user", k=10, max_groups=400, snapshot_top=40)
    res = run(agg, evs, by_key=False)
    want = collections.Counter(e.user for e in evs)
    bound = res.error_bound()
    assert 0 < bound < want.most_common(1)[0][1]  # pruning happened; the bound is useful
    assert res.counters["evicted_groups"] > 0
    for u, n in read(res):
        assert n <= want[u] <= n + bound
    true_top = want.most_common(1)[0]
    assert read(res)[0][0] == true_top[0]  # a heavy hitter survives pruning


def test_distinct_exact_below_its_bound_then_hyperloglog_within_stated_error() -> None:
    evs = events(40_000)
    rnd = random.Random(4)
    for e in evs:
        e.user = f"u{rnd.randrange(30_000)}"
    exact = run(Aggregate("d", "distinct", value="user", by="region", exact_distinct=100_000), evs)
    want = {r: len({e.user for e in es}) for r, es in ref_groups(evs, lambda e: e.region).items()}
    assert read(exact) == want
    pytest.importorskip("datasketches")
    from collector.stages.aggregators import HLL_RELATIVE_ERROR

    est = run(Aggregate("d", "distinct", value="user", exact_distinct=1000), evs, by_key=False)
    n = len({e.user for e in evs})
    assert n > 1000
    assert abs(read(est) - n) <= 3 * HLL_RELATIVE_ERROR * n
    # per group, one worker still exact and the other already a sketch: their union
    w0 = [e for e in evs if e.region != "eu"] + [e for e in evs if e.region == "eu"][:300]
    w1 = [e for e in evs if e.region == "eu"]
    agg = Aggregate("d", "distinct", value="user", by="region", exact_distinct=2000)
    rts = [agg.build(), agg.build()]
    rts[0](w0)
    rts[1](w1)
    got = read(merge([rts[0].snapshot(), rts[1].snapshot()]))
    for r, es in ref_groups(evs, lambda e: e.region).items():
        want_r = len({e.user for e in es})
        assert abs(got[r] - want_r) <= 3 * HLL_RELATIVE_ERROR * want_r, r


def test_tumbling_event_time_with_out_of_order_and_late_events() -> None:
    agg = Aggregate("w", "count", window=Tumbling(60.0, time_field="t", lateness=30.0, retention=1e9))
    rt = agg.build()
    b = (T0 // 60) * 60
    rt([Ev(0, "a", "eu", "bet", 1, b + 5), Ev(1, "a", "eu", "bet", 1, b + 70)])  # watermark b+70
    rt([Ev(2, "a", "eu", "bet", 1, b + 50)])  # out of order, within lateness: window 0 still open
    rt([Ev(3, "a", "eu", "bet", 1, b + 200)])  # watermark moves past b+60+30
    rt([Ev(4, "a", "eu", "bet", 1, b + 10), Ev(5, "a", "eu", "bet", 1, "bad time")])  # late; unreadable
    res = merge([rt.snapshot()])
    got = {w["start"] - b: w["value"] for w in read(res)}
    assert got == {0: 2, 60: 1, 180: 1}
    assert res.counters["late"] == 1 and res.counters["missing_time"] == 1
    # a time range keeps only windows inside it
    assert [w["start"] - b for w in read(res, start=b + 60, end=b + 120)] == [60]


def test_windows_match_brute_force_and_iso_times() -> None:
    evs = events(8000)
    for e in evs[::3]:  # some times as ISO strings, as casino events carry them
        e.t = __import__("datetime").datetime.fromtimestamp(e.t, __import__("datetime").UTC).isoformat()
    w = Hopping(120.0, hop=30.0, time_field="t", lateness=60.0, retention=1e9)
    res = run(Aggregate("h", "sum", value="amount", by="region", window=w), sorted(evs, key=lambda e: e.id))
    assert res.counters["late"] == 0
    from collector.stages.windows import parse_time

    for win in read(res):
        inside = [e for e in evs if win["start"] <= parse_time(e.t) < win["end"]]  # type: ignore[operator]
        want = {r: sum(e.amount for e in es) for r, es in ref_groups(inside, lambda e: e.region).items()}
        assert win["value"] == pytest.approx(want)


def test_retention_forgets_closed_windows() -> None:
    rt = Aggregate("w", "count", window=Tumbling(10.0, time_field="t", retention=20.0)).build()
    rt([Ev(i, "a", "eu", "bet", 1, T0 + i * 10) for i in range(10)])
    rt([Ev(99, "a", "eu", "bet", 1, T0 + 100)])
    assert len(rt.panes) <= 4 and rt.counters["expired_panes"] >= 7


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_moving_rate_within_tolerance_with_a_patched_clock() -> None:
    clock = Clock(T0)
    moving = Aggregate("r", "rate", window=Sliding(60.0, 1.0), clock=clock)
    overall = Aggregate("all", "rate", clock=clock)
    rts = [moving.build(), moving.build(), overall.build()]
    ev = Ev(0, "a", "eu", "bet", 1, 0)
    early = moving.build()
    for step in range(100):  # 10 s at 30 ev/s: the rate is over those 10 s, not diluted by 60
        clock.t = T0 + step * 0.1
        early([ev] * 3)
    assert read(merge([early.snapshot()]), now=clock.t + 0.1) == pytest.approx(30.0, rel=0.03)
    for step in range(1200):  # 120 s: 50 ev/s for the first minute, then 200 ev/s
        clock.t = T0 + step * 0.1
        n = 5 if step < 600 else 20
        rts[step % 2]([ev] * (n // 2))
        rts[1 - step % 2]([ev] * (n - n // 2))
        rts[2]([ev] * n)
    now = clock.t + 0.05
    res = merge([rts[0].snapshot(), rts[1].snapshot()])
    assert read(res, now=now) == pytest.approx(200.0, rel=0.03)
    assert read(merge([rts[2].snapshot()]), now=now) == pytest.approx((600 * 5 + 600 * 20) / 120, rel=0.03)
    assert len(rts[0].panes) <= 62  # sliding panes are not retained past the window


def test_bad_values_and_missing_keys_are_counted_and_skipped_not_dropped() -> None:
    evs = [Ev(i, f"u{i % 3}", "eu", "bet", i, T0) for i in range(10)]
    evs[2].amount = "12"
    evs[3].amount = None
    evs[4].user = None
    rt = Aggregate("s", "sum", by="user", value="amount").build()
    assert rt(evs) == []
    res = merge([rt.snapshot()])
    assert res.counters["bad_value"] == 2 and res.counters["missing_key"] == 1
    assert sum(read(res).values()) == sum(range(10)) - 2 - 3 - 4


def test_group_cap_evicts_oldest_groups_and_counts_them() -> None:
    rt = Aggregate("c", "count", by="user", max_groups=100).build()
    for i in range(0, 1000, 50):
        rt([Ev(j, f"u{j}", "eu", "bet", 1, T0) for j in range(i, i + 50)])
    g = rt.panes[0]
    assert len(g) <= 100 and "u999" in g and "u0" not in g
    assert rt.counters["evicted_groups"] == 1000 - len(g)


def test_snapshot_is_plain_msgpack_and_merge_refuses_a_mix() -> None:
    rt = Aggregate("c", "count", by=("region", "type")).build()
    rt(events(100))
    raw = msgspec.msgpack.decode(rt.snapshot())
    assert raw["name"] == "c" and raw["fn"] == "count"
    other = Aggregate("x", "sum", value="amount").build()
    with pytest.raises(ValueError, match="cannot merge"):
        merge([rt.snapshot(), other.snapshot()])
    assert isinstance(next(iter(read(merge([rt.snapshot()])))), tuple)  # tuple groups survive
    assert rt.snapshot() is rt.snapshot()  # idle: the last snapshot again, no work
    before = rt.snapshot()
    rt(events(10))
    assert rt.snapshot() != before


@pytest.mark.parametrize("fn", ["count", "avg", "distinct", "top_k"])
def test_restore_continues_from_a_snapshot(fn: str) -> None:
    evs = events(6000)
    w = Tumbling(60.0, time_field="t", lateness=1e9, retention=1e9)
    agg = Aggregate(
        "a", fn, by="user" if fn == "top_k" else "region", window=w,
        value=None if fn in ("count", "top_k") else "amount",
        snapshot_top=10_000,  # a top_k snapshot keeps its top items only: restore them all
    )
    whole = agg.build()
    whole(evs)
    first, later = agg.build(), agg.build()
    first(evs[:3000])
    later.restore(first.snapshot())  # a replacement worker starting from the last published partial
    later(evs[3000:])
    assert read(merge([later.snapshot()])) == read(merge([whole.snapshot()]))
    with pytest.raises(ValueError, match="cannot restore"):
        Aggregate("b", "sum", value="amount").build().restore(first.snapshot())


@pytest.mark.parametrize(
    "kw",
    [dict(fn="median"), dict(fn="sum"), dict(fn="top_k"), dict(fn="rate", by="user"), dict(k=0)],
)
def test_config_errors_name_the_aggregate(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="'bad'"):
        Aggregate("bad", **kw)


class Casino(msgspec.Struct):
    id: int
    player_id: int
    type: str
    amount_eur: int = 0
    has_won: bool = False


def test_seed001_materialized_view_from_two_workers() -> None:
    rnd = random.Random(5)
    clock = Clock(T0)
    aggs, view = seed001(clock=clock)
    evs = [
        Casino(i, rnd.randrange(10, 20), t := rnd.choice(["game_start", "bet", "deposit", "game_stop"]),
               rnd.randrange(2000) if t in ("bet", "deposit") else 0, t == "bet" and rnd.random() < 0.2)
        for i in range(6000)
    ]
    rts = [[a.build() for a in aggs] for _ in range(2)]
    for step in range(120):  # 50 events each second for two minutes
        clock.t = T0 + step
        chunk = evs[step * 50 : (step + 1) * 50]
        for w in range(2):
            part = [e for e in chunk if e.player_id % 2 == w]
            for rt in rts[w]:
                rt(part)
    results = {a.name: merge([rts[0][i].snapshot(), rts[1][i].snapshot()]) for i, a in enumerate(aggs)}
    doc = msgspec.json.decode(view.render_json(results, now=T0 + 120))
    bets = collections.Counter(e.player_id for e in evs if e.type == "bet")
    wins = collections.Counter(e.player_id for e in evs if e.type == "bet" and e.has_won)
    deps: collections.Counter[int] = collections.Counter()
    for e in evs:
        if e.type == "deposit":
            deps[e.player_id] += e.amount_eur
    assert list(doc) == [
        "events_total", "events_per_minute", "events_per_second_moving_average",
        "top_player_bets", "top_player_wins", "top_player_deposits",
    ]
    assert doc["events_total"] == 6000
    assert doc["events_per_minute"] == pytest.approx(3000, rel=0.02)
    assert doc["events_per_second_moving_average"] == pytest.approx(50, rel=0.03)
    assert doc["top_player_bets"]["count"] == bets.most_common(1)[0][1]
    assert bets[doc["top_player_bets"]["id"]] == doc["top_player_bets"]["count"]
    assert doc["top_player_wins"]["count"] == wins.most_common(1)[0][1]
    assert doc["top_player_deposits"] == {"id": deps.most_common(1)[0][0], "count": deps.most_common(1)[0][1]}
    assert view.aggregates() == sorted(a.name for a in aggs)
    assert view.render({})["top_player_bets"] == {"id": None, "count": 0}


@pytest.mark.usefixtures("no_leaks")
def test_aggregate_stage_runs_inside_a_real_collector() -> None:
    from engine_clients import Immediate

    from collector import Collector
    from collector.playback import generate_events, playback_pipeline

    stages = (
        Aggregate("events", "count"),
        Aggregate("by_device", "count", by="device_type", window=Tumbling(3600.0, time_field="start_at")),
        Aggregate("top_users", "top_k", by="user_id", k=10),
        Aggregate("bitrate", "avg", value="error_code"),  # strings: every value is bad, none dropped
        Aggregate("rate", "rate", window=Sliding(60.0)),
    )
    pipe = dataclasses.replace(playback_pipeline(Immediate()), stages=stages)
    evs = generate_events(5000, users=500, seed=3)
    with Collector(pipe, workers=2) as c:
        res = c.handle(evs, return_events=True).wait(timeout=60)
    assert res.handled_events == 5000 and res.failed_events == 0 and not res.errors
    assert sorted(e.id for e in res.events) == [e.id for e in evs]


def test_global_window_is_the_default() -> None:
    assert isinstance(Aggregate("c").window, Global)
