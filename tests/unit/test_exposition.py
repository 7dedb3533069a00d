"""What the Prometheus text shows of an aggregate: ``aggregate_series`` over merged
results of two runtimes (workers), windows by event and processing time, the bound."""

from __future__ import annotations

from typing import Any

import msgspec

from collector.stages.aggregates import Aggregate, merge
from collector.stages.exposition import aggregate_series
from collector.stages.windows import Hopping, Sliding, Tumbling


class Ev(msgspec.Struct):
    user: str
    region: str
    amount: float
    t: float = 0.0


def merged(agg: Aggregate, *chunks: list[Ev]) -> Any:
    """Each chunk through its own runtime (a worker), then merged."""
    parts = []
    for c in chunks:
        rt = agg.build()
        rt(c)
        parts.append(rt.snapshot())
    return merge(parts)


def test_event_time_tumbling_shows_the_window_of_the_newest_event() -> None:
    agg = Aggregate("sum", "sum", value="amount", by="region", window=Tumbling(60, time_field="t", lateness=600))
    r = merged(agg, [Ev("a", "eu", 1.0, 30), Ev("b", "us", 2.0, 70)], [Ev("c", "eu", 4.0, 100), Ev("d", "eu", 8.0, 50)])
    s = aggregate_series(agg, r, now=10_000.0)  # the wall clock does not matter for event time
    assert s is not None and s.window == "tumbling" and s.window_start == 60.0
    assert sorted(s.values) == [("eu", 4.0), ("us", 2.0)] and s.groups == 2 and not s.truncated


def test_processing_time_hopping_and_sliding_use_the_clock() -> None:
    t = [1000.0]
    hop = Aggregate("n", "count", window=Hopping(60, hop=20), clock=lambda: t[0])
    r = merged(hop, [Ev("a", "eu", 1.0)] * 3, [Ev("b", "eu", 1.0)] * 2)
    s = aggregate_series(hop, r, now=1005.0)
    assert s is not None and s.window_start == 1000.0 and s.values == [(None, 5.0)]
    later = aggregate_series(hop, r, now=1130.0)  # a window the events are not in
    assert later is not None and later.window_start == 1120.0 and later.values == [(None, 0.0)]
    rate = Aggregate("rate", "rate", window=Sliding(10, step=1), clock=lambda: t[0])
    s = aggregate_series(rate, merged(rate, [Ev("a", "eu", 1.0)] * 20), now=1005.0)
    assert s is not None and s.window_start is None and s.values == [(None, 20 / 5)]


def test_the_bound_top_k_tuples_and_empty_figures() -> None:
    evs = [Ev(f"u{i % 7}", "eu" if i % 2 else "us", float(i)) for i in range(70)]
    by_user = Aggregate("by_user", "count", by="user", max_series=6)
    s = aggregate_series(by_user, merged(by_user, evs[:35], evs[35:]), now=0.0)
    assert s is not None and s.truncated and s.values == [] and s.groups >= 4
    wide = Aggregate("by_user", "count", by="user", max_series=7)
    s = aggregate_series(wide, merged(wide, evs[:35], evs[35:]), now=0.0)
    assert s is not None and not s.truncated and dict(s.values) == {f"u{i}": 10.0 for i in range(7)}
    top = Aggregate("top", "top_k", by="user", value="amount", k=5, max_series=3)
    s = aggregate_series(top, merged(top, evs), now=0.0)
    assert s is not None and s.truncated and [k for k, _ in s.values] == ["u6", "u5", "u4"]
    pairs = Aggregate("pairs", "count", by=("region", "user"))
    s = aggregate_series(pairs, merged(pairs, evs[:2]), now=0.0)
    assert s is not None and sorted(s.values) == [("eu,u1", 1.0), ("us,u0", 1.0)]
    low = Aggregate("low", "min", value="amount")
    s = aggregate_series(low, merged(low, []), now=0.0)
    assert s is not None and s.values == []  # no events: no minimum to show
    assert aggregate_series(Aggregate("off", prometheus=False), merged(Aggregate("off"), evs), now=0.0) is None
