"""Clickstream-like events for ``bench/clickhouse.py`` (a module of its own: the workers import it)."""

from __future__ import annotations

import msgspec

from collector import Pipeline

TYPES = ("page_view", "click", "scroll", "form_submit", "search", "add_to_cart", "session_start")


class Click(msgspec.Struct, gc=False):
    id: str
    event: str
    user_id: str
    session_id: str
    url: str
    ts: int
    value: float = 0.0


def make_clicks(n: int, start: int = 0) -> list[Click]:
    return [
        Click(f"e{k}", TYPES[k % 7], f"u{k % 5000}", f"s{k % 20000}", f"https://shop.example/p/{k % 977}",
              1_764_500_000_000 + k, (k % 100) / 4)
        for k in range(start, start + n)
    ]


def click_pipeline(sinks: tuple[object, ...]) -> Pipeline:
    return Pipeline(name="clicks", event_type=Click, key="id", id_field="id", sinks=sinks, shard="chunk")
