"""A small clickstream-like pack for the auth stage's tests (seed 002's event shape).

``[pipeline] pack = "auth_support:click_pipeline"`` in a daemon's config, with the
``TokenAuth`` stage added by ``[[stages]] kind = "auth"``; or ``click_pipeline(stage)``
in a test that builds a :class:`collector.Collector` itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from collector.pipeline import Pipeline


class Click(msgspec.Struct, omit_defaults=True):
    """A click: the token is removed (None, omitted on output) once resolved."""

    event: str
    id: str = ""
    token: str | None = None
    user_id: str = ""
    data: dict[str, Any] = msgspec.field(default_factory=dict)


def click_pipeline(*stages: Any) -> Pipeline:
    """Clicks, sharded by their id (the user is not known before the auth stage)."""
    return Pipeline(name="clicks", event_type=Click, key="id", id_field="id", stages=stages)


async def run_stage(rt: Any, events: list[Any]) -> list[Any]:
    """A stage runtime's drops for ``events`` (awaited when it returns a coroutine)."""
    out = rt(events)
    return out if isinstance(out, list) else await out


def run(coro: Any, timeout: float = 30.0) -> Any:
    """``coro`` on a fresh loop, bounded."""
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())
