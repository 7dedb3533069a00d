"""Render: set a string field from a template chosen by a field's value (descriptions)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from ..protocol import ErrorRecord
from .base import Stage

__all__ = ["Render"]


@dataclass(frozen=True)
class Render(Stage):
    """Set ``target`` to a string rendered from each event by a template.

    ``templates`` maps a value of the field ``by`` to its template (``"*"``: any other
    value); with ``by=None`` the single template under ``"*"`` is used. ``maps`` are
    the static mappings ``{field:map:NAME}`` reads (game titles). Templates are
    compiled once per worker (:mod:`collector.template`); an event whose template is
    missing, or whose rendering fails (a date that does not parse), keeps ``target``
    as it was and is counted, never dropped.
    """

    target: str = "description"
    templates: dict[str, str] = dc_field(default_factory=dict)
    by: str | None = None
    maps: dict[str, dict[Any, Any]] = dc_field(default_factory=dict)
    name: str = "render"

    def build(self) -> Callable[[list[Any]], list[ErrorRecord]]:
        """The compiled templates for one worker."""
        from ..template import compile_template

        compiled = {
            k: compile_template(t, self.maps, name=f"render {self.target!r} template {k!r}")
            for k, t in self.templates.items()
        }
        default = compiled.get("*")
        by, target = self.by, self.target
        log = logging.getLogger("collector.stages")

        def run(events: list[Any]) -> list[ErrorRecord]:
            for e in events:
                tpl = compiled.get(getattr(e, by), default) if by else default
                if tpl is None:
                    continue
                try:
                    setattr(e, target, tpl(e))
                except (ValueError, TypeError, KeyError, ArithmeticError) as ex:
                    log.warning("render %s: %s: %s", target, type(ex).__name__, ex)
            return []

        return run
