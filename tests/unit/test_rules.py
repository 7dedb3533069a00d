"""The Rules stage: every operator and combinator, missing fields, type mismatches,
actions and counters, and one config error per kind naming the rule's path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from collector.errors import ConfigError
from collector.packs.generic import GenericEvent
from collector.stages.rules import Cond, Filter, Rule, Rules, decode_rules

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def ev(user_id: str | None = "u1", **data: Any) -> GenericEvent:
    return GenericEvent(type="user_action", source="web", user_id=user_id, data=data)


def run_one(when: dict[str, Any], event: GenericEvent, **rule: Any) -> tuple[bool, dict[str, int]]:
    """Whether a block rule with ``when`` drops ``event``, and the rule's counters."""
    stage = decode_rules({"rules": [{"name": "r", "when": when, "action": "block", **rule}]})
    rt = stage.build()
    drops = rt([event])
    return bool(drops), stage.merge([rt.snapshot()])["r"]


E = ev(value=5, score=99.5, name="alice", tags=["a", "b"], ua="Mozilla Googlebot/2.1", flag=True)

# (condition, event, matches)
CASES: list[tuple[dict[str, Any], GenericEvent, bool]] = [
    ({"path": "data.value", "eq": 5}, E, True),
    ({"path": "data.value", "eq": 6}, E, False),
    ({"path": "data.value", "ne": 6}, E, True),
    ({"path": "data.value", "ne": 5}, E, False),
    ({"path": "data.value", "gt": 4}, E, True),
    ({"path": "data.value", "gt": 5}, E, False),
    ({"path": "data.value", "ge": 5}, E, True),
    ({"path": "data.value", "ge": 5.5}, E, False),
    ({"path": "data.value", "lt": 6}, E, True),
    ({"path": "data.value", "lt": 5}, E, False),
    ({"path": "data.value", "le": 5}, E, True),
    ({"path": "data.value", "le": 4}, E, False),
    ({"path": "data.name", "gt": "aaron"}, E, True),  # strings order too
    ({"path": "data.name", "contains": "lic"}, E, True),
    ({"path": "data.name", "contains": "bob"}, E, False),
    ({"path": "data.tags", "contains": "b"}, E, True),  # list membership
    ({"path": "data.tags", "contains": "c"}, E, False),
    ({"path": "data.ua", "regex": "(?i)bot"}, E, True),
    ({"path": "data.ua", "regex": "^bot"}, E, False),  # a search: anchor it to match from the start
    ({"path": "user_id", "in": ["u1", "u2"]}, E, True),
    ({"path": "user_id", "in": ["u3"]}, E, False),
    ({"path": "data.tags", "in": [["a", "b"]]}, E, True),  # unhashable values: compared in order
    ({"path": "data.score", "range": [90, 100]}, E, True),
    ({"path": "data.score", "range": [99.5, 99.5]}, E, True),  # inclusive at both ends
    ({"path": "data.score", "range": [0, 99]}, E, False),
    ({"path": "data.value", "exists": True}, E, True),
    ({"path": "data.nope", "exists": True}, E, False),
    ({"path": "data.nope", "exists": False}, E, True),
    ({"path": "data.flag", "eq": True}, E, True),
    ({"path": "source", "eq": "web"}, E, True),  # a Struct field
    ({"all": [{"path": "data.value", "eq": 5}, {"path": "source", "eq": "web"}]}, E, True),
    ({"all": [{"path": "data.value", "eq": 5}, {"path": "source", "eq": "app"}]}, E, False),
    ({"all": [{"path": "data.value", "eq": 5}, {"path": "source", "eq": "web"}, {"path": "data.flag", "eq": True}]},
     E, True),
    ({"all": [{"path": "data.value", "eq": 5}]}, E, True),
    ({"any": [{"path": "data.value", "eq": 1}, {"path": "source", "eq": "web"}]}, E, True),
    ({"any": [{"path": "data.value", "eq": 1}, {"path": "source", "eq": "app"}]}, E, False),
    ({"any": [{"path": "data.value", "eq": 1}, {"path": "data.value", "eq": 2}, {"path": "data.value", "eq": 5}]},
     E, True),
    ({"not": {"path": "data.value", "eq": 5}}, E, False),
    ({"not": {"path": "data.value", "eq": 6}}, E, True),
    ({"not": {"any": [{"path": "data.value", "eq": 1}, {"not": {"path": "source", "eq": "web"}}]}}, E, True),
    # a missing field (absent key, None field, a path through a non-dict) with missing = false
    ({"path": "data.nope", "eq": 1}, E, False),
    ({"path": "user_id", "eq": "u1"}, ev(None), False),
    ({"path": "data.value.deeper", "eq": 1}, E, False),
    ({"any": [{"path": "data.nope", "eq": 1}, {"path": "data.value", "eq": 5}]}, E, True),
]


@pytest.mark.parametrize(("when", "event", "matches"), CASES, ids=[str(c[0]) for c in CASES])
def test_each_operator_and_combinator(when: dict[str, Any], event: GenericEvent, matches: bool) -> None:
    dropped, c = run_one(when, event)
    assert dropped is matches
    assert c["evaluated"] == 1 and c["matched"] == int(matches) and c["blocked"] == int(matches)
    assert c["errors"] == 0


@pytest.mark.parametrize(("missing", "dropped", "errors"), [(False, False, 0), (True, True, 0), ("error", False, 1)])
def test_a_missing_field_is_what_the_rule_says(missing: Any, dropped: bool, errors: int) -> None:
    got, c = run_one({"path": "data.nope", "gt": 1}, E, missing=missing)
    assert got is dropped
    assert c["missing"] == 1 and c["errors"] == errors and c["matched"] == int(dropped)


TYPE_MISMATCHES = [
    {"path": "data.name", "gt": 1},  # str > int
    {"path": "data.value", "contains": "x"},  # "x" in 5
    {"path": "data.value", "regex": "5"},  # not a string
    {"path": "data.tags", "range": [1, 2]},
]


@pytest.mark.parametrize("when", TYPE_MISMATCHES, ids=str)
@pytest.mark.parametrize(("on_error", "dropped"), [("allow", False), ("block", True)])
def test_a_type_mismatch_counts_an_error_and_follows_on_error(when: dict[str, Any], on_error: str, dropped: bool) -> None:
    got, c = run_one(when, E, on_error=on_error)
    assert got is dropped
    assert c["errors"] == 1 and c["matched"] == 0 and c["blocked"] == int(dropped)


def test_errors_on_some_events_leave_the_others_decided_normally() -> None:
    stage = decode_rules({"rules": [{"name": "big", "when": {"path": "data.value", "gt": 10}, "action": "block"}]})
    rt = stage.build()
    drops = rt([ev(value=1), ev(value="oops"), ev(value=50), ev(), ev(value=11)])
    assert [(d.pos, d.kind, d.reason) for d in drops] == [
        (2, "filtered", "blocked by rule 'big'"), (4, "filtered", "blocked by rule 'big'")]
    assert stage.merge([rt.snapshot()])["big"] == {
        "evaluated": 5, "matched": 2, "allowed": 0, "blocked": 2, "transformed": 0, "missing": 1, "errors": 1, "routed": 0}


def test_order_allow_decides_transform_goes_on_and_counters_sum() -> None:
    stage = Rules(name="f", rules=[
        Rule("vip", Cond(path="user_id", eq="vip"), action="allow", set={"data.mark": "vip"}),
        Rule("tag", Cond(path="data.value", ge=10), action="transform",
             set={"data.big": True, "segment": "big"}, rename={"data.value": "data.amount"}, remove=["data.junk"],
             render={"data.note": "user {user_id} spent {data.amount}"}),
        Rule("drop-big", Cond(path="data.big", eq=True), action="block", reason="too big"),
        Rule("rest", None, action="allow"),
    ])
    rt = stage.build()
    a, b, c = ev("vip", value=100), ev("u2", value=20, junk=1), ev("u3", value=1)
    drops = rt([a, b, c])
    assert [(d.pos, d.reason) for d in drops] == [(1, "too big")]
    assert a.data == {"value": 100, "mark": "vip"}  # allowed first: no later rule saw it
    assert b.data == {"big": True, "amount": 20, "note": "user u2 spent 20"} and b.segment == "big"
    assert c.data == {"value": 1}
    snap = rt.snapshot()
    assert rt.snapshot() is snap  # the same bytes while nothing changed
    rt([])
    assert rt.snapshot() is snap
    got = stage.merge([snap, snap])  # two workers
    assert got["vip"] == {"evaluated": 6, "matched": 2, "allowed": 2, "blocked": 0, "transformed": 2, "missing": 0,
                          "errors": 0, "routed": 0}
    assert got["tag"]["evaluated"] == 4 and got["tag"]["transformed"] == 2
    assert got["drop-big"] == {"evaluated": 4, "matched": 2, "allowed": 0, "blocked": 2, "transformed": 0,
                               "missing": 2, "errors": 0, "routed": 0}
    assert got["rest"]["allowed"] == 2
    assert stage.read(got, "rest")["evaluated"] == 2 and stage.read(got, "nope") is None
    assert stage.merge([]) == stage.read(stage.merge([]))  # no partial yet: zeros for every rule
    rt([ev("u9", value=1)])
    assert rt.snapshot() is not snap


def test_a_transform_that_fails_counts_an_error_and_passes_the_event() -> None:
    stage = Rules(rules=[Rule("t", None, action="transform", set={"no_such_field": 1})])
    rt = stage.build()
    assert rt([ev()]) == []
    assert stage.merge([rt.snapshot()])["t"]["errors"] == 1


def test_the_stage_is_picklable_and_filter_still_works() -> None:
    import pickle

    stage = decode_rules({"rules": [{"name": "r", "when": {"path": "data.ua", "regex": "bot"}, "action": "block"}]})
    again = pickle.loads(pickle.dumps(stage))
    assert again.rules == stage.rules
    assert [d.pos for d in again.build()([ev(ua="x"), ev(ua="a bot")])] == [1]
    f = Filter(lambda e: e.user_id != "x", reason="no x").build()
    assert [(d.pos, d.reason, d.kind) for d in f([ev("x"), ev("y")])] == [(0, "no x", "filtered")]


# one test per kind of config error: (rules, the message's start)
BAD: list[tuple[list[Any], str]] = [
    ([{"name": "a", "when": {"path": "x", "eq": 1}}, {"name": "b", "when": {"path": "x", "regexp": "y"}}],
     "rules[1].when.regexp: unknown operator 'regexp'"),
    ([{"name": "a"}, {"name": "b"}, {"name": "c", "when": {"all": [{"path": "x", "regex": "("}]}}],
     "rules[2].when.all[0].regex: bad regular expression"),
    ([{"name": "a", "when": {"path": "x", "gt": [1]}}], "rules[0].when.gt: Expected"),
    ([{"name": "a", "when": {"path": "x", "regex": 5}}], "rules[0].when.regex: Expected `str`"),
    ([{"name": "a", "when": {"path": "x", "in": "abc"}}], "rules[0].when.in: Expected `array`"),
    ([{"name": "a", "when": {"path": "x", "range": [1, 2, 3]}}], "rules[0].when.range: Expected `array` of length 2"),
    ([{"name": "a", "when": {"path": "x", "range": [5, 1]}}], "rules[0].when.range: low 5 is above high 1"),
    ([{"name": "a", "when": {"path": "x", "exists": "yes"}}], "rules[0].when.exists: Expected `bool`"),
    ([{"name": "a", "when": {"any": [{"path": "x", "eq": 1}, {"all": []}]}}],
     "rules[0].when.any[1].all: needs a non-empty list"),
    ([{"name": "a", "when": {"path": "x"}}], "rules[0].when: a condition needs exactly one operator, got no operator"),
    ([{"name": "a", "when": {"path": "x", "eq": 1, "ne": 2}}], "rules[0].when: a condition needs exactly one operator, got several"),
    ([{"name": "a", "when": {"eq": 1}}], "rules[0].when.path: eq needs the path"),
    ([{"name": "a", "when": {"path": "x..y", "eq": 1}}], "rules[0].when.path: 'x..y' is not a field path"),
    ([{"name": "a", "when": {"path": "x", "all": [{"path": "x", "eq": 1}]}}], "rules[0].when.path: all combines"),
    ([{"name": "a", "action": "route"}], "rules[0]: a route rule needs sinks"),
    ([{"name": "a", "action": "route", "sinks": [""]}], "rules[0].sinks[0]: expected a sink name"),
    ([{"name": "a", "action": "allow", "sinks": ["x"]}], "rules[0].sinks: only a route rule names sinks"),
    ([{"name": "a", "action": "rout"}], "rules[0].action: unknown action 'rout'; known: allow, block, transform, route"),
    ([{"name": "a", "action": "transform"}], "rules[0]: a transform rule needs set"),
    ([{"name": "a", "action": "block", "set": {"x": 1}}], "rules[0]: a block rule drops the event"),
    ([{"name": "a", "missing": "maybe"}], "rules[0].missing: Invalid enum value 'maybe'"),
    ([{"name": "a", "render": {"x": "{nope:fmt}"}}], "rules[0].render.x: unknown formatter"),
    ([{"name": "a", "wen": {}}], "rules[0].wen: unknown key 'wen'"),
    ([{"name": "a"}, {"name": "a"}], "rules[1].name: 'a' is the name of an earlier rule"),
]


@pytest.mark.parametrize(("rules", "message"), BAD, ids=[m for _, m in BAD])
def test_config_errors_name_the_path(rules: list[Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        decode_rules({"rules": rules})
    assert str(info.value).startswith(message), str(info.value)


def test_python_form_is_checked_when_constructed() -> None:
    with pytest.raises(ConfigError, match=r"^rules\[0\]\.when\.all\[1\]\.regex: bad regular expression"):
        Rules(rules=[Rule("a", Cond(all=[Cond(path="x", eq=1), Cond(path="x", regex="[")]))])
    with pytest.raises(ConfigError, match=r"^rules\[0\]\.when\.gt: expected a number or a string, got list"):
        Rules(rules=[Rule("a", Cond(path="x", gt=[1]))])
    with pytest.raises(ConfigError, match=r"^rules\[0\]: a route rule needs sinks"):
        Rules(rules=[Rule("a", None, action="route")])
    # dicts are accepted in the Python form too
    assert Rules(rules=[{"name": "a", "when": {"path": "x", "eq": 1}}]).rules[0] == Rule("a", Cond(path="x", eq=1))


def test_seed003_example_config_runs() -> None:
    import tomllib

    stage = decode_rules(tomllib.loads((EXAMPLES / "seed003-rules.toml").read_text()))
    assert stage.name == "seed003"
    rt = stage.build()
    events = [
        ev(user_agent="Mozilla/5.0 (compatible; Googlebot/2.1)"),
        ev(user_agent="Mozilla/5.0 (X11)", user_type="premium"),
        ev(lifetime_value=5000),
        ev(score=100, items_attempted=10),
        ev(score=100, items_attempted=2),
        ev(first_session=True),
        ev(total_sessions=1, user_agent="curl/8.0"),
        ev(user_agent=42),  # not a string: an error, let through
        ev(),
    ]
    drops = rt(events)
    assert [(d.pos, d.reason) for d in drops] == [
        (0, "blocked by rule 'bot-user-agents'"), (6, "blocked by rule 'bot-user-agents'")]
    assert events[1].data["route"] == "high_value" and events[2].data["route"] == "high_value"
    assert events[3].data["flag"] == "perfect_score" and "flag" not in events[4].data
    assert events[5].data["cohort"] == "onboarding"
    c = stage.merge([rt.snapshot()])
    assert c["bot-user-agents"]["blocked"] == 2 and c["bot-user-agents"]["errors"] == 1
    assert c["high-value-users"]["transformed"] == 2
    assert c["new-users"] == {**c["new-users"], "evaluated": 7, "matched": 1, "transformed": 1}


def test_config_struct_forbids_unknown_fields() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"name": "a", "extra": 1}, Rule)


MIXED = [E, ev(None), ev(value="x", name=3, tags="ab", ua=None, score="s"), ev(value=7.5, ua="plain"),
         GenericEvent(type="system_log", source="iot_device", data={"value": {"deeper": 1}})]


@pytest.mark.parametrize("when", [c[0] for c in CASES] + TYPE_MISMATCHES, ids=str)
@pytest.mark.parametrize("missing", [False, True, "error"])
def test_a_chunk_decides_each_event_as_it_would_alone(when: dict[str, Any], missing: Any) -> None:
    """The fast path over a chunk (and its fallbacks) agrees with one event at a time."""
    stage = decode_rules({"rules": [{"name": "r", "when": when, "action": "block", "missing": missing}]})
    together = stage.build()
    drops = [d.pos for d in together(MIXED)]
    alone = [stage.build() for _ in MIXED]
    assert drops == [i for i, (rt, e) in enumerate(zip(alone, MIXED, strict=True)) if rt([e])]
    assert stage.merge([together.snapshot()]) == stage.merge([rt.snapshot() for rt in alone])
    healthy = stage.build()  # a chunk with no gap takes the fast path and agrees too
    assert [d.pos for d in healthy([E, E])] == ([0, 1] if run_one(when, E, missing=missing)[0] else [])
