"""The ``Pair`` stage (seed 002's page views), called directly with a patched clock."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from collector.errors import ConfigError
from collector.stages.pairing import Pair, PairRecord, PairRuntime

T0 = 1_700_000_000.0


class Data(msgspec.Struct):
    page_view_id: str | None
    page_type: str = "movie"


class Click(msgspec.Struct):
    event: str
    user_id: str
    timestamp: Any
    data: Data


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ev(kind: str, user: str, pv: str | None, t: Any, page: str = "movie") -> Click:
    return Click(f"page_view_{kind}", user, t, Data(pv, page))


def pair(clock: Clock, **kw: Any) -> PairRuntime:
    spec = Pair(key=("user_id", "data.page_view_id"), carry=("data.page_type",), clock=clock, **kw)
    return spec.build()


def test_start_then_end_and_end_then_start_both_pair() -> None:
    rt = pair(Clock())
    assert rt([ev("start", "u1", "a", T0), ev("end", "u2", "b", T0 + 9, "category")]) == []
    rt([ev("end", "u1", "a", "2023-11-14T22:13:50+00:00"), ev("start", "u2", "b", T0 + 4)])
    out = {r.key: r for r in rt.drain()}
    a, b = out[("u1", "a")], out[("u2", "b")]
    assert a.paired and a.duration_seconds == pytest.approx(30.0) and a.fields == {"data.page_type": "movie"}
    assert b.paired and b.duration_seconds == pytest.approx(5.0)
    assert b.fields == {"data.page_type": "movie"}  # the start's page type wins
    assert a.type == "page_view" and a.reason == "paired"
    assert rt.stats()["paired"] == 2 and rt.stats()["pending"] == 0 and rt.drain() == []


def test_same_page_view_id_of_two_users_does_not_pair() -> None:
    rt = pair(Clock())
    rt([ev("start", "u1", "same", T0), ev("end", "u2", "same", T0 + 1)])
    assert rt.drain() == [] and rt.stats()["pending"] == 1 and rt.stats()["pending_ends"] == 1


def test_a_start_without_end_expires_unpaired_after_its_ttl() -> None:
    clock = Clock()
    rt = pair(clock, ttl=12 * 3600.0)
    rt([ev("start", "u1", "a", T0)])
    clock.t = T0 + 12 * 3600 - 1
    rt([])
    assert rt.drain() == []
    clock.t = T0 + 12 * 3600
    rt([])
    (rec,) = rt.drain()
    assert rec == PairRecord("page_view", ("u1", "a"), False, None, T0, None, "expired", {"data.page_type": "movie"})
    assert rt.stats()["expired"] == 1 and rt.stats()["pending"] == 0


def test_an_orphan_end_is_reported_after_its_shorter_ttl() -> None:
    clock = Clock()
    rt = pair(clock, orphan_ttl=60.0)
    rt([ev("end", "u1", "a", T0)])
    clock.t = T0 + 60
    rt.expire(clock.t)
    (rec,) = rt.drain()
    assert rec.reason == "orphan_end" and not rec.paired and rec.end_time == T0 and rec.duration_seconds is None
    assert rt.stats()["orphan"] == 1


def test_duplicate_start_keeps_the_first_and_a_replay_does_not_pair_twice() -> None:
    rt = pair(Clock())
    rt([ev("start", "u1", "a", T0), ev("start", "u1", "a", T0 + 3)])
    rt([ev("end", "u1", "a", T0 + 10)])
    rt([ev("start", "u1", "a", T0), ev("end", "u1", "a", T0 + 10), ev("end", "u1", "a", T0 + 10)])  # replay
    (rec,) = rt.drain()
    assert rec.duration_seconds == 10.0
    st = rt.stats()
    assert st["duplicate_start"] == 1 and st["replayed"] == 3 and st["paired"] == 1


def test_missing_keys_are_counted_and_other_events_pass() -> None:
    rt = pair(Clock(), drop_inputs=True)
    other = Click("element_click", "u1", T0, Data("x"))
    unhashable = ev("end", "u1", ["a"], T0)  # type: ignore[arg-type]
    drops = rt([other, ev("start", "u1", None, T0), ev("start", "u1", "a", T0), unhashable])
    assert [d.pos for d in drops] == [1, 2, 3] and all(d.kind == "paired" for d in drops)
    assert rt.stats()["missing_key"] == 2 and rt.stats()["pending"] == 1


def test_pending_is_bounded_and_the_oldest_are_evicted_unpaired() -> None:
    clock = Clock()
    rt = pair(clock, max_pending=100)
    for i in range(5):
        clock.t = T0 + i
        rt([ev("start", "u", f"{i}-{j}", T0) for j in range(50)])
    assert rt.stats()["pending"] == 100 and rt.stats()["evicted"] == 150
    evicted = rt.drain()
    assert {r.key[1].split("-")[0] for r in evicted} == {"0", "1", "2"} and not any(r.paired for r in evicted)
    rt([ev("end", "u", "4-0", T0 + 1)])  # the newest still pair
    assert rt.drain()[0].paired


def test_snapshot_restore_round_trip_keeps_pending_and_expiry() -> None:
    clock = Clock()
    rt = pair(clock, ttl=100.0)
    rt([ev("start", "u1", "a", T0), ev("end", "u2", "b", T0 + 1), ev("start", "u3", "c", T0)])
    rt([ev("end", "u3", "c", T0 + 2)])
    data = rt.snapshot()
    assert isinstance(msgspec.msgpack.decode(data), list)  # plain msgpack, no pickle
    clock.t = T0 + 50
    back = pair(clock, ttl=100.0)
    back.restore(data)
    assert back.stats() == rt.stats()
    assert [r.key for r in back.drain()] == [("u3", "c")]  # undrained records survive too
    back([ev("end", "u1", "a", T0 + 7), ev("end", "u3", "c", T0 + 2)])  # pairs; replay guard survived
    (rec,) = back.drain()
    assert rec.key == ("u1", "a") and rec.duration_seconds == 7.0
    assert back.stats()["replayed"] == 1
    clock.t = T0 + 700
    back([])
    assert [r.reason for r in back.drain()] == ["orphan_end"]


def test_brute_force_pairing_over_shuffled_events_split_by_user() -> None:
    rnd = random.Random(2)
    evs: list[Click] = []
    want: dict[tuple[str, str], float] = {}
    for i in range(3000):
        u, pv, t = f"u{rnd.randrange(200)}", f"pv{i}", T0 + rnd.uniform(0, 1000)
        d = rnd.uniform(1, 300)
        evs.append(ev("start", u, pv, t))
        if rnd.random() < 0.9:
            evs.append(ev("end", u, pv, t + d))
            want[(u, pv)] = d
    rnd.shuffle(evs)
    clock = Clock()
    rts = [pair(clock), pair(clock)]
    for i in range(0, len(evs), 256):
        for w, rt in enumerate(rts):
            rt([e for e in evs[i : i + 256] if int(e.user_id[1:]) % 2 == w])
    got = {r.key: r.duration_seconds for rt in rts for r in rt.drain()}
    assert got == pytest.approx(want)
    assert sum(rt.stats()["pending"] for rt in rts) == 3000 - len(want)


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="'pair'"):
        Pair(ttl=0)


def as_tuple(r: PairRecord) -> tuple[Any, ...]:
    """A module-level converter (picklable): what ``emit`` may name."""
    if r.key[0] == "boom":
        raise ValueError("cannot convert")
    return (r.key, r.paired, r.duration_seconds)


def test_emit_converts_drained_records_and_counts_what_fails(caplog: pytest.LogCaptureFixture) -> None:
    for emit in (as_tuple, "test_pairing:as_tuple"):
        rt = pair(Clock(), emit=emit)
        rt([ev("start", "u1", "a", T0), ev("end", "u1", "a", T0 + 2), ev("start", "boom", "b", T0),
            ev("end", "boom", "b", T0)])
        with caplog.at_level("ERROR", "collector.pairing"):
            assert rt.drain() == [(("u1", "a"), True, 2.0)]
        assert rt.stats()["emit_errors"] == 1 and rt.stats()["emitted"] == 1
    assert "cannot convert" in caplog.text


def test_emit_must_be_picklable_and_the_store_known() -> None:
    with pytest.raises(ConfigError, match="cannot be pickled"):
        Pair(emit=lambda r: r)
    with pytest.raises(ConfigError, match="store must be one of memory, redis"):
        Pair(store="disk")
    with pytest.raises(ConfigError, match="tick > 0"):
        Pair(tick=0)
    with pytest.raises(ConfigError, match="has no attribute"):
        Pair(emit="test_pairing:nope").build()


def test_a_dead_workers_partial_keeps_its_counters_and_no_pending_halves() -> None:
    spec = Pair(key=("user_id", "data.page_view_id"), clock=Clock())
    rt = spec.build()
    rt([ev("start", "u1", "a", T0), ev("start", "u2", "b", T0), ev("end", "u3", "c", T0)])
    rt([ev("end", "u1", "a", T0 + 3)])
    live = spec.merge([rt.partial()])
    assert (live["paired"], live["pending"], live["pending_ends"]) == (1, 1, 1)
    # its halves died with it (its redelivered chunks bring them to the replacement)
    dead = spec.merge([spec.retired(rt.partial())])
    assert (dead["paired"], dead["pending"], dead["pending_ends"]) == (1, 0, 0)
