"""Sink outages on real processes: standard output that goes away or stops being read,
and a SQLite database that another connection holds locked.

* stdout, reader closed (EPIPE): a helper process (``sink_helpers.py stdout-outage``)
  runs a collector whose stdout is a pipe to this test. The test reads a part, then
  stops the workers, drains the pipe, closes its end and lets them go on: every write
  fails with EPIPE, each chunk is retried per its budget and dead-lettered, counted;
  no worker dies. Every sent id was read or dead-lettered (the ledger), and the sink
  never counted as written more than was read.
* stdout, reader stalled: nobody reads the pipe for a while. The writes block, the
  operations do not complete, the in-flight bound fills (``Overloaded``); once the
  test reads, everything drains and every sent id is read (once: nothing failed).
* SQLite, ``BEGIN EXCLUSIVE`` held by another connection: "database is locked", retried
  with backoff, backpressure, then drained after the release (each id stored once);
  held past the retry budget: the chunks are dead-lettered, counted, and
  ``collector replay`` stores them once the lock is gone.

Every wait is bounded; the helpers of ``test_sinks`` are reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import sqlite3
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import wait_until
from test_sinks import DEC, TESTS, SqliteStore, _replay, check_store, expected_of, sent_by

from collector import Collector, Overloaded
from collector.playback import InMemoryClient, generate_events, playback_pipeline
from collector.sinks import DeadLetterConfig
from collector.sinks.files import read_deadletters

pytestmark = pytest.mark.usefixtures("no_leaks")


# ------------------------------------------------------------------ stdout
def _start_stdout_helper(tmp: Path, mode: str, n: int, timeout: float = 30.0) -> tuple[subprocess.Popen[bytes], Path]:
    summary = tmp / "summary.json"
    with open(tmp / "stderr.txt", "wb") as err:  # a file, not a pipe: nothing here reads it meanwhile
        proc = subprocess.Popen(
            [sys.executable, str(TESTS / "sink_helpers.py"), "stdout-outage", mode, str(n), str(summary), str(timeout)],
            stdout=subprocess.PIPE, stderr=err, cwd=TESTS,
        )
    return proc, summary


def _status(summary: Path, phase: str, timeout: float = 30.0) -> dict[str, Any]:
    path = Path(str(summary) + ".status")

    def ready() -> dict[str, Any] | None:
        if not path.exists():
            return None
        s: dict[str, Any] = msgspec.json.decode(path.read_bytes())
        return s if s["phase"] == phase else None

    return wait_until(ready, timeout, 0.01, f"helper phase {phase!r}")


def _read(fd: int, until: Any, timeout: float) -> bytes:
    """Read the pipe until ``until(data)`` or EOF; fails after ``timeout`` seconds."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while not until(buf):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out reading the helper's stdout ({len(buf)} bytes so far)"
        r, _, _ = select.select([fd], [], [], min(left, 0.5))
        if r:
            data = os.read(fd, 1 << 16)
            if not data:
                break
            buf += data
    return bytes(buf)


def _stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (SIGSTOP is asynchronous: kill() returns before)."""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            states.append(stat.rpartition(")")[2].split()[0])
    return bool(states) and all(s in "tTZX" for s in states)  # stopped (or exiting: writes nothing)


def _drain_nonblocking(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = bytearray()
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


def _cleanup(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()  # its workers follow (parent-death signal)
        proc.wait(10)
    if proc.stdout is not None and not proc.stdout.closed:
        proc.stdout.close()


def _finish(proc: subprocess.Popen[bytes], tmp: Path, timeout: float = 60.0) -> None:
    try:
        proc.wait(timeout=timeout)
    finally:
        _cleanup(proc)
    err = (tmp / "stderr.txt").read_text(errors="replace")
    assert proc.returncode == 0, f"helper exited with {proc.returncode}: {err[-3000:]}"


def test_stdout_reader_closed_epipe_deadletters_without_crash_loop(tmp_path: Path) -> None:
    """The reader of the collector's stdout goes away mid-run (EPIPE; SIGPIPE at default in the parent)."""
    n = 40_000
    proc, summary = _start_stdout_helper(tmp_path, "epipe", n)
    stopped: list[int] = []
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        pids = _status(summary, "started")["pids"]
        read = _read(fd, lambda b: b.count(b"\n") >= n // 4, 60)
        # freeze the writers so that the pipe can be emptied completely before it is
        # closed: what they wrote is then either read here or fails with EPIPE
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        for pid in pids:
            wait_until(lambda pid=pid: _stopped(pid), 10, 0.001, f"worker {pid} stopped")
        read += _drain_nonblocking(fd)
        proc.stdout.close()
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped.clear()
        _finish(proc, tmp_path)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        _cleanup(proc)
    s = msgspec.json.decode(summary.read_bytes())
    sent = sent_by(summary)
    # no crash loop: no worker died, both still up at the end; nothing failed or was lost
    assert s["restarts"] == 0 and s["redelivered"] == 0 and s["alive"] == [True, True]
    assert s["handled"] == n and s["failed"] == 0
    assert read.endswith(b"\n"), "a torn line on the reader's side"
    lines = [(DEC.decode(t).id, t.decode()) for t in read.splitlines()]
    assert n // 4 <= len(lines) < n, "the reader did not close mid-run"
    recs = read_deadletters(str(summary) + ".dl.jsonl")
    assert recs, "nothing was dead-lettered after the reader closed"
    assert {r.stage for r in recs} == {"sink:stdout[0]"}
    assert all("failed 3 times" in r.reason and "BrokenPipeError" in r.reason for r in recs), recs[0].reason
    # the ledger: every sent event was read or dead-lettered, intact, and nothing else
    dl_rows = [(DEC.decode(r.payload).id, r.payload) for r in recs]
    check_store(lines + dl_rows, expected_of(sent), once=False)
    assert s["deadlettered"] == len(recs) == len({i for i, _ in dl_rows})
    # every chunk counted as written was written whole before the close, so it was read
    sink = s["sink"]
    assert sink["rows"] + s["deadlettered"] == n
    assert sink["rows"] <= len({i for i, _ in lines})
    # each dead-lettered chunk: 3 failed attempts, 2 retries (chunks are at most 500 events)
    assert sink["errors"] == 3 * sink["retries"] / 2 and sink["retries"] >= 2 * (len(recs) // 500)


def test_stdout_reader_stalled_backpressure_then_drain(tmp_path: Path) -> None:
    """Nobody reads the pipe for a while: writes block, the in-flight bound fills, then all drains."""
    n = 20_000
    stall = 1.5
    proc, summary = _start_stdout_helper(tmp_path, "stall", n)
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        full = _status(summary, "full")
        time.sleep(stall)  # the reader is away: nothing may complete meanwhile
        queued = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)
        Path(str(summary) + ".go").touch()
        time.sleep(0.3)  # the helper notes what was done while nobody read
        read = _read(fd, lambda b: False, 60)  # to EOF: the helper exits when all is done
        _finish(proc, tmp_path)
    finally:
        _cleanup(proc)
    s = msgspec.json.decode(summary.read_bytes())
    assert full["overloaded"] and s["overloaded"], "the in-flight bound never filled"
    assert 0 < full["accepted"] <= 8
    at_go = s["at_go"]
    # while nobody read: the writes were blocked on a full pipe, no operation completed,
    # and a blocked write is not a failed one
    assert queued > 16 << 10, f"only {queued} bytes waited in the pipe"
    assert at_go["done"] == 0 and at_go["inflight"] == full["accepted"] * 1000
    assert at_go["rows"] < 1000 and at_go["errors"] == 0
    # after the reader came: everything handled, nothing failed, retried or dead-lettered
    assert s["handled"] == n and s["failed"] == 0
    assert s["restarts"] == 0 and s["deadlettered"] == 0
    assert s["sink"] == {"rows": n, "errors": 0, "retries": 0}
    assert not Path(str(summary) + ".dl.jsonl").exists() or not read_deadletters(str(summary) + ".dl.jsonl")
    assert read.endswith(b"\n")
    lines = [(DEC.decode(t).id, t.decode()) for t in read.splitlines()]
    dups = check_store(lines, expected_of(sent_by(summary)), once=False)
    assert dups == 0, "lines repeated although no write failed"


def test_stdout_reader_stalled_past_the_timeout_deadletters_without_piling_up_copies(tmp_path: Path) -> None:
    """The reader stalls longer than the sink's ``timeout``: the attempts time out.

    A write blocked on the pipe cannot be taken back, so the chunks it holds may be
    both dead-lettered and read later. But the retries of a chunk must not queue copy
    after copy of it behind the blocked write (each copy held in memory, then written:
    every line up to ``retries + 1`` times, even for chunks already dead-lettered).
    At most what the blocked rounds hold, one window of chunks per worker, is both.
    """
    n = 20_000
    proc, summary = _start_stdout_helper(tmp_path, "stall", n, timeout=0.3)
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        _status(summary, "full")
        time.sleep(2.5)  # > 3 attempts of 0.3 s: the chunks in flight spend their budget
        Path(str(summary) + ".go").touch()
        time.sleep(0.3)
        read = _read(fd, lambda b: False, 60)
        _finish(proc, tmp_path)
    finally:
        _cleanup(proc)
    s = msgspec.json.decode(summary.read_bytes())
    assert s["handled"] == n and s["failed"] == 0 and s["restarts"] == 0
    assert s["at_go"]["errors"] > 0, "no attempt timed out during the stall"
    recs = read_deadletters(str(summary) + ".dl.jsonl")
    assert recs and s["deadlettered"] == len(recs)
    assert all("failed 3 times" in r.reason and "TimeoutError" in r.reason for r in recs), recs[0].reason
    lines = [(DEC.decode(t).id, t.decode()) for t in read.splitlines()]
    dl_rows = [(DEC.decode(r.payload).id, r.payload) for r in recs]
    check_store(lines + dl_rows, expected_of(sent_by(summary)), once=False)  # nothing lost
    assert s["sink"]["rows"] + s["deadlettered"] == n
    one_window = 2 * 4 * 500  # workers x window x chunk_size
    read_ids = [i for i, _ in lines]
    repeated = len(read_ids) - len(set(read_ids))
    both = len(set(read_ids) & {i for i, _ in dl_rows})
    assert repeated <= one_window, f"{repeated} lines repeated on the reader's side"
    assert both <= one_window, f"{both} events dead-lettered and written anyway"


# ------------------------------------------------------------------ SQLite locked by another connection
@contextlib.contextmanager
def _exclusive(path: Path) -> Any:
    """Hold ``BEGIN EXCLUSIVE`` on the database (waits up to 10 s for the sink's transaction)."""
    db = sqlite3.connect(path, timeout=10, isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")
        yield db
    finally:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        db.close()


def test_sqlite_locked_within_the_budget_backpressure_then_drain(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Another connection holds the write lock for ~2 s, well within the retry budget."""
    sq = SqliteStore(tmp_path)
    dl = tmp_path / "dl.jsonl"
    # budget: 60 retries, each after >= busy_timeout + half its backoff: more than 10 s
    cfg = sq.config(busy_timeout=0.1, retries=60, backoff=0.05, backoff_max=0.25, timeout=5.0)
    p = playback_pipeline(InMemoryClient(), sinks=(cfg,), deadletter=DeadLetterConfig(path=str(dl)))
    batch, limit = 1000, 8000
    sent = generate_events(40_000, seed=12)
    with Collector(p, workers=2, max_inflight=limit, chunk_size=250, window=4) as c:
        ops = [c.handle(sent[:4 * batch])]
        wait_until(lambda: c.stats().sinks and c.stats().sinks[0].rows >= 500, 30, 0.002, "first commits")
        with _exclusive(sq.path):
            t0 = time.monotonic()
            held_at_lock = {i for i, _ in sq.rows()}  # WAL: readers are not blocked
            k = 4
            with pytest.raises(Overloaded):  # nothing commits: the in-flight bound fills
                while k < 40:
                    ops.append(c.handle(sent[k * batch : (k + 1) * batch], block=False))
                    k += 1
            wait_until(lambda: c.stats().sinks[0].retries >= 6, 30, what="retries while the database is locked")
            time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))
            st = c.stats()
            done = [i for i, op in enumerate(ops) if op.done()]
            held = {i for i, _ in sq.rows()}
            assert held == held_at_lock, "rows were committed through an exclusive lock"
            # ops[0] (sent before the lock) may be done; none of those sent while locked is
            assert len(ops) > 1 and done in ([], [0]), f"operations sent while locked completed: {done}"
            if done:
                acked = {e.id for e in sent[: 4 * batch]}
                assert acked <= held, f"{len(acked - held)} events acknowledged but not stored"
            assert st.deadlettered == 0 and st.sinks[0].errors >= 6
            assert c.inflight_events > limit - batch
        results = [op.wait(timeout=60) for op in ops]
        assert [r.handled_events for r in results] == [4 * batch] + [batch] * (len(ops) - 1)
        assert all(r.failed_events == 0 for r in results)
        last = c.handle(sent[-batch:], timeout=30).wait(timeout=60)  # capacity is back
        assert last.handled_events == batch
        st = c.stats()
    stored = sent[: (len(ops) + 3) * batch] + sent[-batch:]
    check_store(sq.rows(), expected_of(stored), once=True)
    assert st.deadlettered == 0 and (not dl.exists() or read_deadletters(str(dl)) == [])
    s0 = st.sinks[0]
    assert s0.rows == len(stored) and s0.errors >= 6 and s0.retries == s0.errors
    assert st.worker_restarts == 0
    assert "database is locked" in capfd.readouterr().err


def test_sqlite_locked_past_the_budget_deadletters_then_replay_stores_once(tmp_path: Path) -> None:
    """The lock outlasts the retry budget: the chunks go to the dead-letter file; replay brings them back."""
    sq = SqliteStore(tmp_path)
    dl = tmp_path / "deadletter.jsonl"
    n = 8000
    events = generate_events(n, seed=13)
    cfg = sq.config(busy_timeout=0.05, retries=2, backoff=0.02, backoff_max=0.05, timeout=5.0)
    p = playback_pipeline(InMemoryClient(), sinks=(cfg,), deadletter=DeadLetterConfig(path=str(dl)))
    with Collector(p, workers=2, chunk_size=500) as c:
        first = c.handle(events[:4000])
        wait_until(lambda: c.stats().sinks and c.stats().sinks[0].rows >= 500, 30, 0.002, "first commits")
        with _exclusive(sq.path):
            second = c.handle(events[4000:])  # sent while locked: all of it must be dead-lettered
            r1, r2 = first.wait(timeout=60), second.wait(timeout=60)
            st = c.stats()
            stored = {i for i, _ in sq.rows()}
    assert r1.handled_events == 4000 and r2.handled_events == 4000 and r1.failed_events == r2.failed_events == 0
    assert st.worker_restarts == 0
    recs = read_deadletters(str(dl))
    dead = [DEC.decode(r.payload).id for r in recs]
    assert {r.stage for r in recs} == {"sink:sqlite[0]"}
    assert all("failed 3 times" in r.reason and "database is locked" in r.reason for r in recs), recs[0].reason
    # every event is either stored or dead-lettered, never both, never twice
    assert len(dead) == len(set(dead)) and not stored & set(dead)
    assert stored | set(dead) == {e.id for e in events}
    assert set(range(4000, n)) <= set(dead)
    s0 = st.sinks[0]
    assert st.deadlettered == len(recs) and s0.rows == len(stored) and s0.rows + st.deadlettered == n
    assert s0.errors == 3 * s0.retries / 2 and s0.retries >= 2 * (len(recs) // 500)

    proc = _replay(dl, sq.config())  # the lock is gone
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"read {len(recs)} records" in proc.stdout and f"stored {len(recs)}" in proc.stdout
    check_store(sq.rows(), expected_of(events), once=True)
    assert not dl.exists() or read_deadletters(str(dl)) == []
