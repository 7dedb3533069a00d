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
    ({"kind": "aggregate", "name": "x", "fn": "median"}, r"`\$.stages\[0\]`: .*fn must be one of"),
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
