"""What the failure-policy tests' worker processes import (spawn keeps sys.path): an event
type keyed by an integer player id, and readers of the JSONL sink and dead-letter files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec


class Order(msgspec.Struct):
    """An event with a player to look up in PostgreSQL (seed 001's shape, cut down)."""

    id: int
    player_id: int
    player: Any = None


def read_lines(tmp: Path, pattern: str) -> list[dict[str, Any]]:
    """Every JSON line of the files matching ``pattern`` in ``tmp`` (one file per worker)."""
    out = []
    for p in sorted(tmp.glob(pattern)):
        out += [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return out
