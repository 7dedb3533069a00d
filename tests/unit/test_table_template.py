"""``collector.sinks.tables``: table-name templates of the sqlite and clickhouse sinks."""

from __future__ import annotations

import msgspec
import pytest

from collector.errors import ConfigError
from collector.sinks import ClickhouseSinkConfig, SqliteSinkConfig, decode_sink_config
from collector.sinks.tables import TableTemplate, table_names


class Base(msgspec.Struct, tag_field="event"):
    id: str

    @property
    def event(self) -> str:  # a tagged union's tag, exposed as a read-only property
        tag = self.__struct_config__.tag
        assert isinstance(tag, str)
        return tag


class PageView(Base, tag="page_view"):
    url: str = ""


class Click(Base, tag="click"):
    target: str = ""


def test_routes_tagged_union_structs_dicts_and_refuses_bad_names() -> None:
    t = TableTemplate("cs_{event}")
    events = [PageView("1"), Click("2"), {"event": "click", "id": "3"}, {"event": "no way"}, {"id": "5"}, PageView("6")]
    by_table, refused = t.route(events)
    assert by_table == {"cs_page_view": [0, 5], "cs_click": [1, 2]}
    assert [(i, p) for i, p, _ in refused] == [(3, "$.event"), (4, "$.event")]
    assert "'cs_no way' is not a plain SQL identifier" in refused[0][2]
    assert "missing or empty" in refused[1][2]


def test_constant_and_invalid_templates() -> None:
    assert TableTemplate("events").route([1, 2]) == ({"events": [0, 1]}, [])
    for bad in ("9events", "a{b.c}", "a{b!r}", "a{", "x" * 64):
        with pytest.raises(ConfigError):
            TableTemplate(bad)
    assert table_names("cs_{event}", ["click", "scroll"]) == ["cs_click", "cs_scroll"]
    assert table_names("events", ["ignored"]) == ["events"]
    with pytest.raises(ConfigError, match="not a plain SQL identifier"):
        table_names("cs_{event}", ["a-b"])


def test_config_table_pattern_accepts_templates_only_of_top_level_fields() -> None:
    assert SqliteSinkConfig(table="{event}").table == "{event}"
    assert decode_sink_config({"kind": "clickhouse", "table": "cs_{event}"}).table == "cs_{event}"  # type: ignore[union-attr]
    for bad in ("cs-{event}", "cs_{a.b}", "1abc", ""):
        with pytest.raises(ConfigError):
            decode_sink_config({"kind": "sqlite", "table": bad})
    c = ClickhouseSinkConfig()
    assert (c.url, c.database, c.table, c.create_table) == ("http://127.0.0.1:8123", "default", "events", True)
