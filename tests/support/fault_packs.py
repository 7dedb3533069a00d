"""Pipelines the fault tests serve with ``[pipeline] pack = "fault_packs:..."``.

``poison_pipeline``: the generic pack plus a stage that SIGKILLs its own worker when a
chunk holds an event whose ``data`` has ``"poison": true``, so every worker that is
handed that event dies (a crash in a C extension, an OOM on one huge event).
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collector import Pipeline
from collector.generic import generic_pipeline
from collector.stages import Stage


@dataclass(frozen=True)
class Poison(Stage):
    """Kill this worker (SIGKILL, no cleanup) on a poisoned event."""

    name: str = "poison"

    def build(self) -> Callable[[list[Any]], list[Any]]:
        """The stage: look at every event of the chunk."""

        def stage(events: list[Any]) -> list[Any]:
            for e in events:
                if e.data.get("poison"):
                    os.kill(os.getpid(), signal.SIGKILL)
            return []

        return stage


def poison_pipeline() -> Pipeline:
    """The generic pack (1 ms simulated lookups) with :class:`Poison` after its stages."""
    p = generic_pipeline(enrich_latency=0.001)
    return dataclasses.replace(p, stages=(*p.stages, Poison()))
