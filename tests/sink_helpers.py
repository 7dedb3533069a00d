"""Helpers for tests/test_sinks.py that other processes import (spawn keeps sys.path).

* :func:`replay_pipeline` is the ``--pipeline`` of ``collector replay`` and
  ``collector migrate`` in the tests: the playback pipeline writing to the sink whose
  config (JSON) is in ``COLLECTOR_TEST_SINK`` and dead-lettering to
  ``COLLECTOR_TEST_DEADLETTER``.
* ``python sink_helpers.py stdout N SUMMARY [kill]`` runs a collector with the stdout
  sink: the events go to this process's standard output (the workers inherit it) and
  nothing else does; a JSON summary is written to the file ``SUMMARY`` and the events
  sent (the ledger) to ``SUMMARY.sent``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import msgspec

from collector import Collector, Pipeline
from collector.playback import InMemoryClient, generate_events, playback_pipeline
from collector.sinks import DeadLetterConfig, StdoutSinkConfig, decode_sink_config


class Seed004Event(msgspec.Struct):
    """Seed 004's event model: string ids, ``type``/``source`` columns, nested ``data``."""

    id: str
    type: str
    source: str
    timestamp: str
    user_id: str | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    processing_time_ms: int | None = None


def seed004_pipeline(sinks: tuple[Any, ...], deadletter: Any = None) -> Pipeline:
    """Seed-004 events straight to ``sinks`` (no enrichment)."""
    return Pipeline(name="seed004", event_type=Seed004Event, key="id", id_field="id", sinks=sinks, deadletter=deadletter)


def replay_pipeline() -> Pipeline:
    """The playback pipeline with the sink and dead-letter file named in the environment."""
    sink = decode_sink_config(msgspec.json.decode(os.environ["COLLECTOR_TEST_SINK"]))
    dl = os.environ.get("COLLECTOR_TEST_DEADLETTER")
    return playback_pipeline(
        InMemoryClient(), sinks=(sink,), deadletter=DeadLetterConfig(path=dl) if dl else None
    )


def run_stdout(n: int, summary: str, kill: bool) -> None:
    """Send ``n`` events to the stdout sink from 2 workers; SIGKILL worker 0 mid-write if asked."""
    p = playback_pipeline(InMemoryClient(), sinks=(StdoutSinkConfig(),))
    events = generate_events(n, seed=3)
    with open(summary + ".sent", "wb") as f:
        f.write(msgspec.json.encode(events))
    with Collector(p, workers=2) as c:
        op = c.handle(events)
        killed = 0
        if kill:
            deadline = time.monotonic() + 60
            while not op.done() and time.monotonic() < deadline:
                st = c.stats()
                if st.sinks and st.sinks[0].rows >= n // 5:
                    killed = c.worker_pids()[0]
                    os.kill(killed, signal.SIGKILL)
                    break
                time.sleep(0.002)
        res = op.wait(timeout=120)
        st = c.stats()
    with open(summary, "wb") as f:
        f.write(
            msgspec.json.encode(
                {
                    "handled": res.handled_events,
                    "failed": res.failed_events,
                    "killed": killed,
                    "redelivered": st.redelivered_chunks,
                    "restarts": st.worker_restarts,
                }
            )
        )


if __name__ == "__main__":
    if sys.argv[1] == "stdout":
        run_stdout(int(sys.argv[2]), sys.argv[3], len(sys.argv) > 4 and sys.argv[4] == "kill")
