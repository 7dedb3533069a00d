"""Pipeline parts for the NATS tests; workers import this module (spawn keeps sys.path)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collector.protocol import ErrorRecord
from collector.stages import Stage


@dataclass(frozen=True)
class Explode(Stage):
    """Pipeline code that raises on every chunk holding an event of user ``user``."""

    user: str = "poison"
    name: str = "explode"

    def build(self) -> Callable[[list[Any]], list[ErrorRecord]]:
        """The stage for one worker."""
        user = self.user

        def run(events: list[Any]) -> list[ErrorRecord]:
            for e in events:
                if e.user_id == user:
                    raise RuntimeError(f"stage blew up on user {user}")
            return []

        return run


def jsonl_pipeline() -> Any:
    """The generic pipeline (no dedup, ``$NATS_TEST_LATENCY`` s per uncached lookup) into ``$NATS_TEST_SINK``."""
    import os

    from collector.generic import generic_pipeline
    from collector.sinks import JsonlSinkConfig

    return generic_pipeline(
        enrich_latency=float(os.environ.get("NATS_TEST_LATENCY", "0")),
        cache_ttl=0,
        dedup_ttl=0,
        sinks=(JsonlSinkConfig(path=os.environ["NATS_TEST_SINK"], fsync="never"),)
    )
