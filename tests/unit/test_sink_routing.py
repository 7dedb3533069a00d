"""Routing without processes: route rules hand each chunk's routes over (the union of
the rules an event matched, a later block still drops it), and the sink set commits
each event only to the sinks of its route, mapping every sink's dead-letter entries
back to the chunk's positions; a route to a sink the pipeline lacks is a config error."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from collector.errors import ConfigError
from collector.packs.generic import GenericEvent
from collector.pipeline import Pipeline
from collector.sinks import DeadLetterConfig, JsonlSinkConfig, build_sinkset
from collector.sinks.routing import check_routes, route_errors
from collector.stages.routing import routes_of
from collector.stages.rules import Cond, Rule, Rules


def ev(n: int, **data: Any) -> GenericEvent:
    return GenericEvent(id=f"e{n}", type="user_action", source="web", data={"n": n, **data})


def test_routes_are_the_union_of_matching_rules_and_a_block_still_drops() -> None:
    stage = Rules(name="r", rules=[
        Rule("a", Cond(path="data.a", eq=True), action="route", sinks=["x"]),
        Rule("b", Cond(path="data.b", eq=True), action="route", sinks=["y"], set={"data.hint": "b"}),
        Rule("drop", Cond(path="data.drop", eq=True), action="block"),
    ])
    rt = stage.build()
    assert rt.routing
    es = [ev(0), ev(1, a=True), ev(2, a=True, b=True), ev(3, b=True, drop=True)]
    drops = rt(es)
    routes = rt.take_routes()
    assert rt.take_routes() == {}  # taken once
    assert [d.pos for d in drops] == [3]
    kept = es[:3]
    assert routes_of(routes, kept) == [None, frozenset({"x"}), frozenset({"x", "y"})]
    assert es[2].data["hint"] == "b" and "hint" not in es[1].data
    got = stage.merge([rt.snapshot()])
    assert got["a"]["routed"] == 2 and got["b"]["routed"] == 2 and got["b"]["transformed"] == 2
    assert not Rules(rules=[Rule("t", None, action="transform", set={"data.x": 1})]).build().routing


def _read(path: Path) -> list[str]:
    return [json.loads(ln)["id"] for ln in path.read_text().splitlines()] if path.exists() else []


def test_the_sink_set_commits_each_event_to_its_route_and_maps_dead_positions(tmp_path: Path) -> None:
    cfgs = [
        JsonlSinkConfig(name="main", path=str(tmp_path / "main.jsonl"), fsync="never"),
        JsonlSinkConfig(name="side", path=str(tmp_path / "side.jsonl"), fsync="never", default=False),
        # a directory where the file should be: every write fails, dead-lettered after one retry
        JsonlSinkConfig(name="broken", path=str(tmp_path), default=False, retries=0, backoff=0.01),
    ]
    events = [ev(i) for i in range(10)]
    routes: list[frozenset[str] | None] = [None] * 10
    routes[2] = frozenset({"side"})
    routes[3] = frozenset({"side", "main"})
    routes[5] = frozenset({"broken"})
    routes[7] = frozenset({"broken", "side"})

    async def go() -> tuple[list[Any], list[Any]]:
        ss = build_sinkset(cfgs, deadletter=DeadLetterConfig(path=str(tmp_path / "dl.jsonl")),
                           event_type=GenericEvent, id_field="id")
        await ss.open()
        try:
            plain = await ss.commit(events[:2])  # no routes: the default sinks only
            return plain, await ss.commit(events, routes)
        finally:
            await ss.close()

    plain, dead = asyncio.run(go())
    assert plain == []
    assert [(p, s) for p, s, _ in dead] == [(5, "broken"), (7, "broken")]
    assert _read(tmp_path / "main.jsonl") == ["e0", "e1", "e0", "e1", "e3", "e4", "e6", "e8", "e9"]
    assert _read(tmp_path / "side.jsonl") == ["e2", "e3", "e7"]
    assert sorted(json.loads(json.loads(ln)["payload"])["id"] for ln in (tmp_path / "dl.jsonl").read_text().splitlines()) == ["e5", "e7"]


def test_unknown_sinks_and_no_default_sink_are_config_errors() -> None:
    sinks = (JsonlSinkConfig(name="main"), JsonlSinkConfig(name="side", default=False))
    rules = Rules(name="routing", rules=[Rule("r", None, action="route", sinks=["side", "nope"])])
    p = Pipeline(name="t", event_type=GenericEvent, key="id", stages=(rules,), sinks=sinks)
    with pytest.raises(ConfigError, match=r"^stage 'routing': rules\[0\]\.sinks\[1\]: unknown sink 'nope' "
                                          r"\(the pipeline's sinks: main, side;"):
        check_routes(p)
    ok = dataclasses.replace(p, stages=(Rules(name="routing", rules=[Rule("r", None, action="route", sinks=["side"])]),))
    assert route_errors(ok) == []
    none_default = dataclasses.replace(ok, sinks=(JsonlSinkConfig(name="side", default=False),))
    with pytest.raises(ConfigError, match="every sink has default = false"):
        check_routes(none_default)


def test_a_sink_when_selects_unrouted_events_and_an_event_no_sink_takes_is_deadlettered(tmp_path: Path) -> None:
    cfgs = [
        JsonlSinkConfig(name="premium", path=str(tmp_path / "premium.jsonl"), fsync="never",
                        when={"path": "data.tier", "eq": "premium"}),
        JsonlSinkConfig(name="free", path=str(tmp_path / "free.jsonl"), fsync="never",
                        when={"any": [{"path": "data.tier", "eq": "free"}, {"path": "data.n", "gt": 7}]}),
        JsonlSinkConfig(name="audit", path=str(tmp_path / "audit.jsonl"), fsync="never", default=False),
    ]
    tiers = ["premium", "free", None, "free", 5, "premium", None, None, "x", "premium"]
    events = [ev(i, tier=t) for i, t in enumerate(tiers)]  # e4: tier 5 (eq is false, no error)
    routes: list[frozenset[str] | None] = [None] * 10
    routes[1] = frozenset({"audit"})  # a route wins over the selectors

    async def go() -> list[Any]:
        ss = build_sinkset(cfgs, deadletter=DeadLetterConfig(path=str(tmp_path / "dl.jsonl")),
                           event_type=GenericEvent, id_field="id")
        await ss.open()
        try:
            return [await ss.commit(events), await ss.commit(events, routes)]
        finally:
            await ss.close()

    plain, routed = asyncio.run(go())
    # e2, e4, e6, e7 go nowhere: dead-lettered (once per commit), never silently dropped
    for dead in (plain, routed):
        assert [(p, s) for p, s, _ in dead] == [(2, "routing"), (4, "routing"), (6, "routing"), (7, "routing")]
        assert all("no sink takes it" in why for _, _, why in dead)
    assert _read(tmp_path / "premium.jsonl") == ["e0", "e5", "e9"] * 2
    assert _read(tmp_path / "free.jsonl") == ["e1", "e3", "e8", "e9", "e3", "e8", "e9"]
    assert _read(tmp_path / "audit.jsonl") == ["e1"]
    assert len((tmp_path / "dl.jsonl").read_text().splitlines()) == 8


def test_a_bad_when_is_a_config_error_naming_the_sink() -> None:
    p = Pipeline(name="t", event_type=GenericEvent, key="id",
                 sinks=(JsonlSinkConfig(name="a"), JsonlSinkConfig(name="b", when={"path": "x", "regexp": "y"})))
    with pytest.raises(ConfigError, match=r"^sinks\[1\]\.when\.regexp: unknown operator 'regexp'"):
        check_routes(p)
    with pytest.raises(ConfigError, match=r"^sinks\[1\]\.when\.regex: bad regular expression"):
        build_sinkset([JsonlSinkConfig(name="a"), JsonlSinkConfig(name="b", when={"path": "x", "regex": "("})],
                      event_type=GenericEvent)
