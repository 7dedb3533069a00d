"""Stages from configuration tables: the STAGES registry, ``build_stage``, ``[[stages]]``."""

from __future__ import annotations

import pytest

from collector.config import decode_config
from collector.errors import ConfigError
from collector.packs import build_pipeline
from collector.stages import STAGES, Dedup, Enrich, build_stage
from collector.stages.aggregates import Aggregate


def test_a_stage_is_built_from_its_kind_and_fields() -> None:
    assert build_stage({"kind": "dedup", "field": "id", "ttl": 5}) == Dedup(field="id", ttl=5.0)
    agg = build_stage({"kind": "aggregate", "name": "by_type", "fn": "count", "by": "type"})
    assert isinstance(agg, Aggregate) and (agg.name, agg.fn, agg.by) == ("by_type", "count", "type")
    assert isinstance(build_stage({"kind": "enrich"}), Enrich)
    assert isinstance(build_stage({"kind": "collector.stages.dedup:Dedup"}), Dedup)  # an import string
    shared = build_stage({"kind": "dedup", "store": "redis", "type_field": "type",
                          "key_by_type": {"attempt": "client_attempt_id"}, "ttl_by_type": {"attempt": 86400}})
    assert shared.key_by_type == {"attempt": "client_attempt_id"} and shared.ttl_by_type == {"attempt": 86400.0}
    assert set(STAGES) >= {"dedup", "filter", "rules", "enrich", "render", "aggregate", "pair"}


@pytest.mark.parametrize(("table", "why"), [
    ({"field": "id"}, r"`\$.stages\[0\].kind`: name the stage kind"),
    ({"kind": "dedupe"}, r"`\$.stages\[0\].kind`: .*dedupe.*dedup"),
    ({"kind": "dedup", "tll": 5}, r"`\$.stages\[0\].tll`: unknown field of a 'dedup' stage \(its fields: .*ttl"),
    ({"kind": "dedup", "ttl": "long"}, r"`\$.stages\[0\].ttl`: Expected `float`"),
    ({"kind": "aggregate", "name": "x", "fn": "median"}, r"`\$.stages\[0\].fn`: Invalid enum value .median. \(one of"),
    ({"kind": "dedup", "store": "redis", "on_unavailable": "open"}, r"`\$.stages\[0\]`: .*on_unavailable must be"),
    ({"kind": "dedup", "key_by_type": {"attempt": "client_attempt_id"}}, r"`\$.stages\[0\]`: .*need type_field"),
    ({"kind": "dedup", "type_field": "t", "key_by_type": {"a": ""}}, r"`\$.stages\[0\]`: .*key_by_type maps"),
    ({"kind": "dedup", "store": "redis", "redis_url": "127.0.0.1:6379"}, r"`\$.stages\[0\]`: .*redis_url must be"),
])
def test_bad_stage_tables_name_the_path(table: dict[str, object], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        build_stage(table, "$.stages[0]")


def test_stages_from_the_daemon_config_go_after_the_packs(tmp_path: object) -> None:
    cfg = decode_config({"data_dir": str(tmp_path), "stages": [
        {"kind": "aggregate", "name": "by_type", "fn": "count", "by": "type"}]})
    p = build_pipeline(cfg)
    assert [getattr(s, "name", None) for s in p.stages][-1] == "by_type"
    with pytest.raises(ConfigError, match=r"stages\[0\]"):
        build_pipeline(decode_config({"data_dir": str(tmp_path), "stages": [{"kind": "nope"}]}))


# ------------------------------------------------------------- aggregate and pair from TOML
AGG_TOML = """
[[stages]]
kind = "aggregate"
name = "per_minute"
fn = "sum"
value = "amount_eur"
by = ["type", "currency"]
where = { type = "bet" }
max_series = 20
window = { kind = "tumbling", size = 60, time_field = "created_at", lateness = 10, retention = 7200 }

[[stages]]
kind = "aggregate"
name = "rate_1m"
fn = "rate"
prometheus = false
window = { kind = "sliding", size = 60, step = 2 }

[[stages]]
kind = "aggregate"
name = "top"
fn = "top_k"
by = "player_id"
k = 5
window = { kind = "hopping", size = 300, hop = 60 }

[[stages]]
kind = "aggregate"
name = "players"
fn = "distinct"
value = "player_id"
exact_distinct = 100

[[stages]]
kind = "pair"
name = "views"
start_type = "open"
end_type = "close"
type_field = "type"
key = ["user", "data.view"]
time_field = "at"
carry = ["data.page"]
ttl = 3600
orphan_ttl = 60
replay_ttl = 120
max_pending = 500
emit = "pair_support:page_view"
tick = 0.5
store = "redis"
redis_url = "redis://127.0.0.1:6379/3"
prefix = "views:"
redis_grace = 60
sweep_limit = 50
"""


def test_aggregates_and_pairs_from_toml_are_the_python_ones() -> None:
    import tomllib

    from collector.stages.pairing import Pair
    from collector.stages.windows import Global, Hopping, Sliding, Tumbling

    tables = tomllib.loads(AGG_TOML)["stages"]
    built = [build_stage(t, f"$.stages[{i}]") for i, t in enumerate(tables)]
    assert built == [
        Aggregate("per_minute", "sum", by=("type", "currency"), value="amount_eur", where={"type": "bet"},
                  max_series=20, window=Tumbling(60, time_field="created_at", lateness=10, retention=7200)),
        Aggregate("rate_1m", "rate", prometheus=False, window=Sliding(60, step=2)),
        Aggregate("top", "top_k", by="player_id", k=5, window=Hopping(300, hop=60)),
        Aggregate("players", "distinct", value="player_id", exact_distinct=100, window=Global()),
        Pair("open", "close", type_field="type", key=("user", "data.view"), time_field="at", carry=("data.page",),
             ttl=3600, orphan_ttl=60, replay_ttl=120, max_pending=500, emit="pair_support:page_view", tick=0.5,
             store="redis", redis_url="redis://127.0.0.1:6379/3", prefix="views:", redis_grace=60, sweep_limit=50,
             name="views"),
    ]
    # a kind given as an import string decodes through the same Struct
    assert build_stage({"kind": "collector.stages.aggregates:Aggregate", **tables[1]}) == built[1]
    with pytest.raises(ConfigError, match=r"`\$.stages\[3\].window.step`: Expected `float` > 0"):
        build_stage({"kind": "collector.stages.aggregates:Aggregate", "name": "r",
                     "window": {"kind": "sliding", "step": 0}}, "$.stages[3]")
    # the defaults of a bare table are the Python defaults
    assert build_stage({"kind": "pair"}) == Pair()
    assert build_stage({"kind": "aggregate", "name": "n"}) == Aggregate("n")


@pytest.mark.parametrize(("table", "why"), [
    ({"name": "x", "window": {"kind": "tumbling", "size": -1}}, r"`\$.stages\[0\].window.size`: Expected `float` > 0"),
    ({"name": "x", "window": {"kind": "weekly"}}, r"`\$.stages\[0\].window.kind`: .*'weekly'.*global, tumbling, hopping"),
    ({"name": "x", "window": {"size": 60}}, r"`\$.stages\[0\].window`: .*`kind`.*sliding"),
    ({"name": "x", "window": {"kind": "sliding", "sise": 6}},
     r"`\$.stages\[0\].window.sise`: unknown field \(its fields: lateness, retention, size, step, time_field\)"),
    ({"name": "x", "window": {"kind": "hopping", "hop": 0}}, r"`\$.stages\[0\].window.hop`: Expected `float` > 0"),
    ({"name": "x", "window": {"kind": "tumbling", "lateness": -1}}, r"`\$.stages\[0\].window.lateness`: .*>= 0"),
    ({"name": "x", "fn": "median"}, r"`\$.stages\[0\].fn`: .*'median' \(one of: count, sum"),
    ({"name": "x", "by": 3}, r"`\$.stages\[0\].by`: Expected `str \| array \| null`"),
    ({"name": "x", "max_series": 0}, r"`\$.stages\[0\].max_series`: Expected `int` >= 1"),
    ({"name": "x", "fn": "sum"}, r"`\$.stages\[0\]`: aggregate 'x': fn 'sum' needs a value field"),
    ({"fn": "count"}, r"`\$.stages\[0\]`: Object missing required field `name`"),
    ({"name": "x", "windw": {}}, r"`\$.stages\[0\].windw`: unknown field of a 'aggregate' stage \(its fields: .*window"),
])
def test_bad_aggregate_tables_name_the_path(table: dict[str, object], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        build_stage({"kind": "aggregate", **table}, "$.stages[0]")


@pytest.mark.parametrize(("table", "why"), [
    ({"ttl": 0}, r"`\$.stages\[0\].ttl`: Expected `float` > 0"),
    ({"key": []}, r"`\$.stages\[0\].key`: Expected `array` of length >= 1"),
    ({"key": "user"}, r"`\$.stages\[0\].key`: Expected `array`, got `str`"),
    ({"tll": 5}, r"`\$.stages\[0\].tll`: unknown field of a 'pair' stage \(its fields: .*ttl"),
    ({"store": "disk"}, r"`\$.stages\[0\]`: .*store must be one of memory, redis"),
    ({"max_pending": 0}, r"`\$.stages\[0\].max_pending`: Expected `int` >= 1"),
])
def test_bad_pair_tables_name_the_path(table: dict[str, object], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        build_stage({"kind": "pair", **table}, "$.stages[0]")


def test_the_stage_options_table_is_in_the_daemon_docs() -> None:
    from pathlib import Path

    from collector.stages.config import options_table

    doc = (Path(__file__).resolve().parents[2] / "docs" / "daemon.md").read_text()
    table = options_table()
    assert "| `window` `sliding` | `step` |" in table and "| `pair` | `orphan_ttl` |" in table
    assert table in doc, "docs/daemon.md's stage options table is stale: paste collector.stages.config.options_table()"


def test_a_sqlite_pairing_store_lives_in_the_data_directory(tmp_path: object) -> None:
    import os

    from collector.stages.pairing import Pair

    cfg = decode_config({"data_dir": str(tmp_path), "pipeline": {"pack": "clickstream", "options": {"role": "etl"}},
                         "stages": [{"kind": "pair", "name": "views", "store": "sqlite"},
                                    {"kind": "pair", "name": "abs", "store": "sqlite", "state_path": "/srv/p.db"}]})
    pairs = [st for st in build_pipeline(cfg).stages if isinstance(st, Pair)]
    assert [(p.name, p.store, p.state_path) for p in pairs] == [
        ("pair", "sqlite", os.path.join(str(tmp_path), "pairs.sqlite3")),  # the pack's: seed 002's default
        ("views", "sqlite", os.path.join(str(tmp_path), "pairs-views.sqlite3")),
        ("abs", "sqlite", "/srv/p.db"),
    ]
