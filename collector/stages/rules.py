"""Filters: keep the events a predicate accepts; the rest are dropped as ``filtered``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from ..protocol import ErrorRecord
from .base import Stage

__all__ = ["Filter"]


@dataclass(frozen=True)
class Filter(Stage):
    """Keep events for which ``predicate(event)`` is true; drop the rest as ``filtered``.

    ``predicate`` is a picklable callable or a ``"module:function"`` import string.
    """

    predicate: Any = None
    reason: str = "filtered out"
    name: str = "filter"
    options: dict[str, Any] = dc_field(default_factory=dict)

    def build(self) -> Callable[[list[Any]], list[ErrorRecord]]:
        """The filter function for one worker."""
        from ..registry import import_string

        pred = self.predicate
        if isinstance(pred, str):
            pred = import_string(pred, "filter predicate")
        reason = self.reason

        def run(events: list[Any]) -> list[ErrorRecord]:
            return [ErrorRecord(i, "$", reason, "filtered") for i, e in enumerate(events) if not pred(e)]

        return run
