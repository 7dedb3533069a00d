"""Domain packs: an event Struct, a pipeline built from the generic parts, a generator.

::

    [pipeline] pack = "generic"  ──PACKS──► collector.packs.generic:pack_pipeline(cfg, sinks, dl)
    collector serve --pack NAME  ──┘                        │
    [pipeline] pack = "mod:attr" ──► a Pipeline or factory ─┴──► Pipeline (+ the config's sinks)

A new pack is one module here with a ``pack_pipeline(cfg: PipelineConfig, sinks,
deadletter) -> Pipeline`` and one ``PACKS`` line; the config loader never imports a pack.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import registry
from ..config import DaemonConfig, resolved_sinks
from ..errors import ConfigError
from ..pipeline import Pipeline, resolve_pipeline

__all__ = ["PACKS", "build_pipeline"]

PACKS = {
    "generic": "collector.packs.generic:pack_pipeline",
    "playback": "collector.packs.playback:pack_pipeline",
    "casino": "collector.packs.casino:pack_pipeline",
}


def build_pipeline(cfg: DaemonConfig) -> Pipeline:
    """The configured :class:`~collector.Pipeline`, with its sinks and dead-letter sink."""
    sinks, dl = resolved_sinks(cfg)
    pc = cfg.pipeline
    if ":" not in pc.pack:
        try:
            factory: Any = registry.load(PACKS, pc.pack, "pack")
        except ConfigError as e:
            raise ConfigError(f"`$.pipeline.pack`: {e}") from None
        p: Pipeline = factory(pc, sinks, dl)
        return p
    p = resolve_pipeline(pc.pack)
    # the config's sinks and dead-letter sink win; the pack's own stay when none is given
    changes: dict[str, Any] = {}
    if cfg.sinks or not p.sinks:
        changes["sinks"] = sinks
    if cfg.deadletter is not None or p.deadletter is None:
        changes["deadletter"] = dl
    return dataclasses.replace(p, **changes)
