"""The ``Gaps`` stage: sequence gaps, late fillers and repeats per session, merged over workers.

The runtime is driven as the worker drives it: ``rt(events)`` (never drops), then
``rt.settle(events, True)`` once the sinks committed the chunk.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from collector.errors import ConfigError
from collector.stages import STAGES, Gaps, build_stage
from collector.stages.integrity import GapsRuntime


class Ev(msgspec.Struct, tag_field="event"):
    """A tagged-union member whose tag is readable as the property ``event``."""

    session_id: str
    seq: int | None = None

    @property
    def event(self) -> str:
        return str(self.__struct_config__.tag)


class Start(Ev, tag="page_view_start"):
    pass


class End(Ev, tag="page_view_end"):
    pass


class Nested(msgspec.Struct):
    data: Any


def feed(rt: GapsRuntime, *chunks: list[Any]) -> None:
    for evs in chunks:
        assert rt(evs) == []  # never drops
        rt.settle(evs, True)


def counts(spec: Gaps, *runtimes: GapsRuntime, key: Any = None) -> Any:
    return spec.read(spec.merge([rt.snapshot() for rt in runtimes]), key)


def test_a_gap_is_counted_then_filled_late_and_a_repeat_is_counted() -> None:
    spec = Gaps()
    rt = spec.build()
    feed(rt, [Start("s", 1), Start("s", 2)], [Start("s", 4), Start("s", 5)])
    assert counts(spec, rt) == {"gaps": 1, "skipped": 1, "late": 0, "repeated": 0, "untracked": 0,
                                "sessions": 1, "evicted_sessions": 0}
    feed(rt, [Start("s", 3)])
    assert counts(spec, rt) == {"gaps": 0, "skipped": 1, "late": 1, "repeated": 0, "untracked": 0,
                                "sessions": 1, "evicted_sessions": 0}
    feed(rt, [Start("s", 3), Start("s", 5), Start("s", 6)])  # 3 and 5 again: repeats
    c = counts(spec, rt)
    assert (c["gaps"], c["late"], c["repeated"]) == (0, 1, 2)


def test_counts_split_by_type_a_gap_under_the_event_that_revealed_it() -> None:
    spec = Gaps(by="event")
    rt = spec.build()
    feed(rt, [Start("s", 1), End("s", 2), End("s", 5)])  # 3, 4 missing: revealed by an end
    assert counts(spec, rt, key="page_view_end")["gaps"] == 2
    feed(rt, [Start("s", 3), Start("s", 1)])  # 3 arrives late (a start), 1 repeated
    c = counts(spec, rt)
    assert c["gaps"] == 1 and c["late"] == 1 and c["repeated"] == 1
    assert c["by"] == {
        "page_view_end": {"gaps": 1, "skipped": 2, "late": 0, "repeated": 0, "untracked": 0},
        "page_view_start": {"gaps": 0, "skipped": 0, "late": 1, "repeated": 1, "untracked": 0},
    }
    assert counts(spec, rt, key="other") == {"gaps": 0, "skipped": 0, "late": 0, "repeated": 0, "untracked": 0}


def test_two_workers_sharded_by_session_merge_into_one_count() -> None:
    spec = Gaps(by="event")
    w0, w1 = spec.build(), spec.build()
    feed(w0, [Start("a", 1), Start("a", 3)], [Start("a", 2)])  # gap then late
    feed(w1, [End("b", 10), End("b", 13), End("b", 13)])  # 2 missing, 1 repeat
    c = counts(spec, w0, w1)
    assert (c["gaps"], c["late"], c["repeated"], c["sessions"]) == (2, 1, 1, 2)
    assert c["by"]["page_view_end"]["gaps"] == 2 and c["by"]["page_view_start"]["late"] == 1
    empty = spec.merge([])
    assert spec.read(empty)["gaps"] == 0 and spec.read(empty)["by"] == {}


def test_events_without_seq_or_session_are_skipped_and_dotted_paths_work() -> None:
    spec = Gaps(session="data.sid", seq="data.n")
    rt = spec.build()
    feed(rt, [Nested({"x": 1}), Nested(None), Nested(msgspec.Struct)])  # no attributes at all
    assert rt.sessions == {}

    class D(msgspec.Struct):
        sid: str | None
        n: Any

    feed(rt, [Nested(D("s", 1)), Nested(D("s", None)), Nested(D(None, 5)), Nested(D("s", "7")), Nested(D("s", 3))])
    c = counts(spec, rt)
    assert (c["gaps"], c["sessions"]) == (1, 1) and "by" not in c


def test_only_committed_events_count() -> None:
    rt = Gaps().build()
    evs = [Start("s", 1), Start("s", 5)]
    assert rt(evs) == []
    rt.settle(evs, False)  # the chunk failed: its retry is not a repeat
    feed(rt, [Start("s", 1), Start("s", 2)])
    dead = Start("s", 3)
    batch = [dead, Start("s", 4)]
    rt.settle(batch, True, [dead])  # a sink dead-lettered seq 3: it did not arrive
    c = counts(Gaps(), rt)
    assert (c["gaps"], c["repeated"]) == (1, 0)


def test_bounds_forget_sessions_and_missing_numbers_but_keep_them_counted() -> None:
    spec = Gaps(max_sessions=2, max_missing=3)
    rt = spec.build()
    feed(rt, [Start("a", 1), Start("b", 1), Start("a", 2), Start("c", 1)])  # b is the least recent
    assert list(rt.sessions) == ["a", "c"] and rt.evicted == 1
    feed(rt, [Start("a", 8)])  # 3..7 missing: only 5, 6, 7 remembered
    assert list(rt.sessions["a"].missing) == [5, 6, 7]
    feed(rt, [Start("a", 6), Start("a", 4), Start("a", 2)])  # late; below the tracked range twice
    c = counts(spec, rt)
    assert (c["gaps"], c["late"], c["untracked"], c["repeated"]) == (4, 1, 2, 0)
    assert c["evicted_sessions"] == 1 and c["sessions"] == 2
    feed(rt, [Start("a", 10_000_000)])  # a huge jump stays bounded
    assert len(rt.sessions["a"].missing) == 3 and counts(spec, rt)["gaps"] == 4 + 10_000_000 - 9


def test_snapshot_bytes_are_reused_while_nothing_changed() -> None:
    rt = Gaps().build()
    idle = rt.snapshot()
    assert rt.snapshot() is idle
    feed(rt, [Start("s", 1)])
    assert rt.snapshot() is not idle


def test_registered_and_checked_from_a_config_table() -> None:
    assert STAGES["gaps"] == "collector.stages.integrity:Gaps"
    st = build_stage({"kind": "gaps", "session": "session_id", "by": "event", "max_sessions": 10})
    assert isinstance(st, Gaps) and st.integrity == "sequence" and st.max_sessions == 10
    with pytest.raises(ConfigError, match="max_sessions"):
        build_stage({"kind": "gaps", "max_sessions": 0}, "$.stages[0]")
    with pytest.raises(ConfigError, match=r"\$\.stages\[0\]\.sequence"):
        build_stage({"kind": "gaps", "sequence": "n"}, "$.stages[0]")


def test_dotted_paths_read_dict_keys_of_a_free_form_payload() -> None:
    spec = Gaps(session="data.session_id", seq="data.seq", by="data.kind")
    rt = spec.build()
    feed(rt, [Nested({"session_id": "s", "seq": 1, "kind": "click"}), Nested({"session_id": "s", "seq": 4}),
              Nested({"session_id": "s", "seq": 1.0}), Nested({"seq": 9})])  # a float seq, no session: skipped
    c = counts(spec, rt)
    assert c["gaps"] == 2 and c["by"] == {"": {"gaps": 2, "skipped": 2, "late": 0, "repeated": 0, "untracked": 0}}


def test_an_unhashable_session_is_skipped() -> None:
    rt = Gaps(session="data.s", seq="data.seq").build()
    feed(rt, [Nested({"s": {"a": 1}, "seq": 1}), Nested({"s": ["x"], "seq": 2})])
    assert rt.sessions == {}


def test_a_dead_workers_partial_keeps_its_counts_and_tracks_no_session() -> None:
    spec = Gaps()
    rt = spec.build()
    feed(rt, [Start("a", 1), Start("a", 3), Start("b", 1)])
    c = spec.read(spec.merge([spec.retired(rt.snapshot())]))
    assert (c["gaps"], c["sessions"]) == (1, 0)
