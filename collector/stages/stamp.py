"""Stamp: set a time field to the moment the worker handled the event."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..errors import ConfigError
from ..protocol import ErrorRecord
from .base import Stage

__all__ = ["Stamp"]


@dataclass(frozen=True)
class Stamp(Stage):
    """Set ``target`` to the handling time: ``format="iso"`` (RFC 3339, UTC, milliseconds,
    ``2026-11-30T17:00:00.123Z``) or ``"unix"`` (float seconds). An event that already
    has a value keeps it unless ``overwrite`` (a client's clock is not trusted then).

    One clock reading per chunk: every event of a chunk gets the same stamp, which
    costs one attribute write per event.
    """

    target: str = "timestamp"
    format: str = "iso"
    overwrite: bool = True
    name: str = "stamp"

    def __post_init__(self) -> None:
        if self.format not in ("iso", "unix"):
            raise ConfigError(f"stamp {self.name!r}: format must be 'iso' or 'unix' (got {self.format!r})")

    def build(self) -> Callable[[list[Any]], list[ErrorRecord]]:
        """The stamping function of one worker."""
        target, iso, overwrite = self.target, self.format == "iso", self.overwrite

        def run(events: list[Any]) -> list[ErrorRecord]:
            now = time.time()
            value: Any = now
            if iso:
                value = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            for e in events:
                if overwrite or not getattr(e, target, None):
                    setattr(e, target, value)
            return []

        return run
