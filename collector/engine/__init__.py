"""The engine: the supervisor side of a collector, split by job.

::

    Collector (collector.py) ── the facade: lifecycle, handle/ahandle, stats; wires:
      Planner (plan.py) ────── input → keys → shards → Plan; cut into chunk Entries
      Admission (admission.py) the max_inflight bound: block, await or Overloaded
      Ledger (ledger.py) ───── per-worker queues and windows, acks → Operations,
                               a dead worker's chunks back to its replacement
      WorkerPool (pool.py) ─── processes: spawn, read channels, judge deaths, respawn,
                               heartbeat watch
      Operation (operation.py) one handle() call's progress and result, thread-safe

Only :class:`Collector` and :class:`Operation` are public (re-exported by ``collector``).
The engine imports the worker package only for its spawn target.
"""

from .collector import Collector
from .operation import Operation
from .pool import describe_exit

__all__ = ["Collector", "Operation", "describe_exit"]
