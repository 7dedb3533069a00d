"""``collector replay FILE``: send dead-lettered events back through the pipeline.

::

    FILE ──rename──► FILE.replayed-<UTC stamp>   (so new failures never append to what is read)
                          │ read DeadLetter lines (under the writers' lock)
                          ▼
    payloads as NDJSON ─► Collector(pipeline) ─► sinks
                                             └─► failures again ─► the pipeline's dead-letter file (FILE again, usually)

The file is moved aside first: events that fail again (still invalid, or a sink
that is still down past its retry budget) are written to the dead-letter sink again
rather than lost, and they never append to the file being read. The moved file is
kept; delete it once the replay's report satisfies you. Replaying the same records
twice is harmless for the idempotent sinks (sqlite, postgres, mysql store each id
once); the append-only sinks (stdout, jsonl) write them again.

Exit status: 0 when every record was stored, 1 when some failed again, 2 on errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import os
import sys
import time
from typing import Any

from collector.commands.migrate import add_pipeline_arguments, pipeline_from_args

__all__ = ["add_arguments", "run"]

SLICE = 50_000  # records per handle() call: memory stays flat on a large file


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``collector replay``."""
    p.add_argument("file", metavar="FILE", help="a dead-letter file (JSON lines)")
    add_pipeline_arguments(p)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the config's, or one per CPU)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the replay (default 600)")


def _move_aside(path: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = f"{path}.replayed-{stamp}"
    if os.path.exists(aside):
        aside = f"{aside}-{os.getpid()}"
    os.rename(path, aside)
    return aside


def _read_locked(path: str) -> list[Any]:
    """The records of ``path``, read under the lock its writers take for each append."""
    from collector.sinks.files import read_deadletters

    fd = os.open(path, os.O_RDONLY)
    try:
        # a worker that was appending when the file was renamed finishes under this
        # lock; the next append sees the rename and goes to a new file at the old path
        fcntl.flock(fd, fcntl.LOCK_EX)
        return read_deadletters(path)
    finally:
        os.close(fd)


def run(args: argparse.Namespace) -> int:
    """Replay the file; print what was stored and what failed again."""
    from collector.engine import Collector
    from collector.errors import CollectorError
    from collector.sinks import DeadLetterConfig
    from collector.sinks.base import DeadLetter
    from collector.sinks.files import LineFile

    path = os.path.abspath(args.file)
    if not os.path.isfile(path):
        raise CollectorError(f"no dead-letter file at {path}")
    pipeline, opts = pipeline_from_args(args)
    if os.path.getsize(path) == 0:
        print(f"{path} is empty: nothing to replay")
        return 0
    aside = _move_aside(path)
    print(f"moved {path} to {aside} (kept: delete it once this report satisfies you)")
    records = _read_locked(aside)
    print(f"read {len(records)} records")
    if not records:
        return 0
    if pipeline.deadletter is None:
        # failures must land somewhere: the file we replay from, as a fresh file
        pipeline = dataclasses.replace(pipeline, deadletter=DeadLetterConfig(path=path))
    dl_path = getattr(pipeline.deadletter, "path", str(pipeline.deadletter))
    if args.workers is not None:
        opts["workers"] = args.workers
    # JSON escapes newlines inside strings, so outside them they are whitespace: one line each
    lines = [r.payload.replace("\r", " ").replace("\n", " ").encode() for r in records]
    handled = invalid = 0
    lost: list[DeadLetter] = []
    with Collector(pipeline, **opts) as c:
        ops = []
        for lo in range(0, len(lines), SLICE):
            ops.append((lo, c.handle(b"\n".join(lines[lo : lo + SLICE]), timeout=args.timeout)))
        deadline = time.monotonic() + args.timeout
        for lo, op in ops:
            res = op.wait(timeout=max(0.1, deadline - time.monotonic()))
            handled += res.handled_events
            for e in res.errors:
                if e.kind == "invalid":
                    invalid += 1  # the worker wrote it to the dead-letter sink
                elif e.kind in ("lost", "error"):
                    # not dead-lettered by a worker (it died, or pipeline code raised)
                    r = records[lo + e.index]
                    lost.append(DeadLetter(r.payload, e.reason, e.path, "replay", time.time()))
        st = c.stats()
    if lost:
        import msgspec

        f = LineFile(path, fsync="always")
        try:
            f.write(msgspec.json.Encoder().encode_lines(lost))
        finally:
            f.close()
    by_sinks = max(0, st.deadlettered - invalid)
    failed = min(len(records), invalid + len(lost) + by_sinks)
    stored = len(records) - failed
    print(f"stored {stored} of {len(records)} records in every sink")
    if failed:
        print(
            f"dead-lettered again: {failed} ({invalid} still invalid, {by_sinks} refused by a sink past its "
            f"retry budget, {len(lost)} lost to a failing worker) -> {dl_path}"
            + (f" and {path}" if lost and dl_path != path else "")
        )
    sys.stdout.flush()
    return 0 if failed == 0 else 1
