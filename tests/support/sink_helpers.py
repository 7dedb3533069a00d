"""Helpers for tests/integration/test_sinks.py that other processes import (spawn keeps sys.path).

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


# ---------------------------------------------------------------- stdout outages (tests/integration/test_sink_outages.py)
def _put_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (the test polls the file)."""
    with open(path + ".tmp", "wb") as f:
        f.write(msgspec.json.encode(obj))
    os.replace(path + ".tmp", path)


def run_stdout_outage(mode: str, n: int, summary: str, timeout: float) -> None:
    """``python sink_helpers.py stdout-outage MODE N SUMMARY [TIMEOUT]``: the stdout sink
    writing to a pipe whose reader goes away (``epipe``) or stops reading (``stall``).

    SIGPIPE is set back to its default here, as CLI tools piped into ``head`` do: the
    supervisor must never write to standard output itself. The sink retries twice,
    then dead-letters to ``SUMMARY.dl.jsonl``. Progress goes to ``SUMMARY.status``:
    ``started`` (worker pids), and in ``stall`` mode ``full`` once ``handle(block=False)``
    raised ``Overloaded``; the helper then waits for the file ``SUMMARY.go``, notes what
    was done by then (``at_go``), sends the rest (blocking) and waits for everything.
    """
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sink = StdoutSinkConfig(retries=2, backoff=0.01, backoff_max=0.05, timeout=timeout)
    p = playback_pipeline(InMemoryClient(), sinks=(sink,), deadletter=DeadLetterConfig(path=summary + ".dl.jsonl"))
    events = generate_events(n, seed=11)
    with open(summary + ".sent", "wb") as f:
        f.write(msgspec.json.encode(events))
    batch = 1000
    status = summary + ".status"
    at_go: dict[str, Any] = {}
    overloaded = False
    with Collector(p, workers=2, chunk_size=500, max_inflight=8 * batch, window=4) as c:
        _put_json(status, {"phase": "started", "pids": c.worker_pids()})
        ops = []
        k = 0
        if mode == "stall":
            from collector import Overloaded

            while k < n // batch:
                try:
                    ops.append(c.handle(events[k * batch : (k + 1) * batch], block=False))
                except Overloaded:
                    overloaded = True
                    break
                k += 1
            _put_json(status, {"phase": "full", "accepted": len(ops), "overloaded": overloaded})
            deadline = time.monotonic() + 60
            while not os.path.exists(summary + ".go") and time.monotonic() < deadline:
                time.sleep(0.01)
            st = c.stats()
            s0 = st.sinks[0] if st.sinks else None
            at_go = {
                "done": sum(op.done() for op in ops),
                "inflight": c.inflight_events,
                "rows": s0.rows if s0 else 0,
                "errors": s0.errors if s0 else 0,
            }
        while k < n // batch:
            ops.append(c.handle(events[k * batch : (k + 1) * batch], timeout=60))
            k += 1
        results = [op.wait(timeout=90) for op in ops]
        st = c.stats()
        alive = c.workers_alive()
    sinks = {s.index: {"rows": s.rows, "errors": s.errors, "retries": s.retries} for s in st.sinks}
    _put_json(
        summary,
        {
            "handled": sum(r.handled_events for r in results),
            "failed": sum(r.failed_events for r in results),
            "deadlettered": st.deadlettered,
            "restarts": st.worker_restarts,
            "redelivered": st.redelivered_chunks,
            "alive": alive,
            "sink": sinks.get(0, {"rows": 0, "errors": 0, "retries": 0}),
            "overloaded": overloaded,
            "at_go": at_go,
        },
    )


if __name__ == "__main__" and sys.argv[1] == "stdout-outage":
    run_stdout_outage(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]) if len(sys.argv) > 5 else 30.0)


# ---------------------------------------------------------------- a pack with its own id field (tests/e2e/test_daemon.py)
class Reading(msgspec.Struct, forbid_unknown_fields=True):
    """An event whose id field is ``reading_id`` (text: the daemon makes one when absent)."""

    sensor: str
    value: float
    reading_id: str = ""


def reading_pipeline() -> Pipeline:
    """``[pipeline] pack = "sink_helpers:reading_pipeline"``: readings, deduplicated on their own id."""
    return Pipeline(name="readings", event_type=Reading, key="reading_id", id_field="reading_id")
