"""Seed 002's event schemas: the tagged union, field paths in errors, a seventh type."""

from __future__ import annotations

import msgspec
import pytest

from collector.clickstream import ClickBase, ClickEvent, click_event_type, register
from collector.config import ServerConfig
from collector.http.openapi import document
from collector.packs import clickstream as cs

PV = "3f2b8c1e-6a4d-4d7e-9f10-2b3c4d5e6f70"
VALID = {
    "element_click": {"element_type": "movie", "page_type": "category"},
    "page_view_start": {"page_view_id": PV, "page_type": "movie"},
    "page_view_end": {"page_view_id": PV, "page_type": "movie"},
    "quality_change": {"video_id": "v1", "old_quality": 720, "new_quality": 1080},
    "video_complete": {"video_id": "v1", "duration_total": True},
    "search_filter": {"search_query": "space", "filters": "genre=drama"},
}
# one wrong field per type, and the path msgspec must name
INVALID = {
    "element_click": ({"element_type": 3, "page_type": "x"}, "$.data.element_type"),
    "page_view_start": ({"page_view_id": "not-a-uuid", "page_type": "movie"}, "$.data.page_view_id"),
    "page_view_end": ({"page_type": "movie"}, "$.data"),
    "quality_change": ({"video_id": "v1", "old_quality": "720p", "new_quality": 1080}, "$.data.old_quality"),
    "video_complete": ({"video_id": "v1", "duration_total": "yes"}, "$.data.duration_total"),
    "search_filter": ({"search_query": "x", "filters": "y", "extra": 1}, "$.data"),
}
dec = msgspec.json.Decoder(ClickEvent)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_each_type_decodes_and_encodes_with_its_tag(kind: str) -> None:
    ev = dec.decode(msgspec.json.encode({"event": kind, "token": None, "data": VALID[kind]}))
    assert ev.event == kind
    assert type(ev).__struct_config__.tag == kind
    out = msgspec.json.decode(msgspec.json.encode(ev))
    assert out["event"] == kind and out["data"] == VALID[kind]
    assert "token" not in out  # a null token is not written on


@pytest.mark.parametrize("kind", sorted(INVALID))
def test_wrong_field_is_an_error_with_its_path(kind: str) -> None:
    data, path = INVALID[kind]
    with pytest.raises(msgspec.ValidationError) as e:
        dec.decode(msgspec.json.encode({"event": kind, "data": data}))
    assert f"`{path}" in str(e.value), str(e.value)


def test_unknown_type_and_unknown_top_level_field() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.event"):
        dec.decode(b'{"event": "purchase", "data": {}}')
    with pytest.raises(msgspec.ValidationError, match="unknown field `tokn`"):
        dec.decode(msgspec.json.encode({"event": "video_complete", "tokn": None, "data": VALID["video_complete"]}))


class RatingData(msgspec.Struct, forbid_unknown_fields=True):
    video_id: str
    stars: int


class Rating(ClickBase, tag="rating"):
    data: RatingData


def test_a_seventh_type_is_one_struct_and_one_registration() -> None:
    before = list(cs.EVENT_TYPES)
    try:
        register(Rating)
        t = click_event_type()
        ev = msgspec.json.decode(b'{"event": "rating", "data": {"video_id": "v", "stars": 5}}', type=t)
        assert isinstance(ev, Rating) and ev.event == "rating"
        assert "rating" in cs.table_names()
        with pytest.raises(Exception, match="registered already"):
            class Again(ClickBase, tag="rating"):
                data: RatingData
            register(Again)
    finally:
        cs.EVENT_TYPES[:] = before


def test_openapi_documents_the_union() -> None:
    doc = document(ServerConfig(), click_event_type())
    schemas = doc["components"]["schemas"]
    ev = schemas["Event"]
    assert ev["discriminator"]["propertyName"] == "event"
    assert set(ev["discriminator"]["mapping"]) == set(VALID)
    assert schemas["QualityChangeData"]["properties"]["old_quality"]["type"] == "integer"
    body = doc["paths"]["/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/Event"}


def test_page_view_record_is_the_seed_shape() -> None:
    from collector.stages.pairing import PairRecord

    rec = PairRecord("page_view", ("u1", PV), True, 12.5, 1.0, 13.5, "paired",
                     {"timestamp": "2026-11-30T10:00:00.000Z", "data.page_type": "movie", "session_id": "s"})
    pv = msgspec.json.decode(msgspec.json.encode(cs.page_view_record(rec)))
    assert pv["event"] == "page_view" and pv["user_id"] == "u1"
    assert pv["data"] == {"duration_seconds": 12.5, "page_type": "movie", "paired": True, "page_view_id": PV}
    again = cs.page_view_record(rec)
    assert again.id == pv["id"]  # the same page view is the same row
    unpaired = cs.page_view_record(PairRecord("page_view", ("u1", PV), False, None, 1.0, None, "expired",
                                              {"timestamp": "t", "data.page_type": "movie"}))
    assert unpaired.data.paired is False and unpaired.data.duration_seconds is None
