"""Shared parts of the harness: input data, CPU and memory accounting, progress, medians.

Every scenario and every peer gets the same input: the playback events of
:func:`collector.playback.generate_events`, encoded once as a JSON array (the bytes a
producer would send), plus the ``user_id → region`` and ``device_type → model`` dicts
the enrichment reads. Peers and the collector therefore do the same job on the same
bytes: decode JSON → enrich from a dict → count per region and device type.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psutil

from ..playback import generate_events, model_of, region_of

__all__ = [
    "FORMATS",
    "Input",
    "ProcSample",
    "Progress",
    "attribute_read_ns",
    "clear_peak_rss",
    "make_input",
    "median",
    "ncpu",
    "peak_rss",
    "percentile",
    "spread",
]


FORMATS = ("json", "ndjson")
"""Input formats: the events as one JSON array, or as NDJSON (one event per line)."""


@dataclass
class Input:
    """One generated workload: the payload and the dicts enrichment reads from."""

    n: int
    users: int
    device_types: int
    payload: bytes
    regions: dict[str, str]
    models: dict[str, str]
    parts: dict[tuple[int, str], list[bytes]] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)

    def body(self, fmt: str = "json") -> bytes:
        """The events as ``fmt`` (``json``: the payload; ``ndjson``: the same events, one per line)."""
        if fmt == "json":
            return self.payload
        if fmt != "ndjson":
            raise ValueError(f"input format must be one of {FORMATS} (got {fmt!r})")
        if fmt not in self.bodies:
            # no newline after the last line: a producer's body need not end with one
            self.bodies[fmt] = msgspec.json.Encoder().encode_lines(msgspec.json.decode(self.payload)).rstrip(b"\n")
        return self.bodies[fmt]

    def split(self, k: int, fmt: str = "json") -> list[bytes]:
        """The events cut into ``k`` parts of consecutive events, each in ``fmt`` (cached)."""
        if (k, fmt) not in self.parts:
            events = msgspec.json.decode(self.payload)
            step = -(-len(events) // k)
            enc = msgspec.json.Encoder()
            chunks = [events[i * step : (i + 1) * step] for i in range(k)]
            self.parts[k, fmt] = ([enc.encode_lines(c).rstrip(b"\n") for c in chunks] if fmt == "ndjson"
                                  else [enc.encode(c) for c in chunks])
        return self.parts[k, fmt]


def make_input(n: int, users: int = 2000, device_types: int = 20, seed: int = 0) -> Input:
    """Generate ``n`` playback events over ``users`` users and ``device_types`` types."""
    events = generate_events(n, users=users, device_types=device_types, seed=seed)
    payload = msgspec.json.encode(events)
    regions = {f"user-{i}": region_of(f"user-{i}") for i in range(users)}
    models = {f"device-{i}": model_of(f"device-{i}") for i in range(device_types)}
    return Input(n, users, device_types, payload, regions, models)


def attribute_read_ns(chunks: Sequence[Sequence[Any]], field: str, rounds: int) -> float:
    """Median ns per event of a Python loop reading one attribute of each event: the unit
    per-event stage costs are quoted in, so figures compare across loaded and idle machines."""
    assert field.isidentifier()
    ns: dict[str, Any] = {}
    # the attribute read inline, as a stage's loop has it (not a getter call)
    exec(f"def loop(chunks):\n    for ch in chunks:\n        for e in ch:\n            e.{field}\n", ns)
    loop = ns["loop"]
    n = sum(map(len, chunks)) or 1
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        loop(chunks)
        times.append((time.process_time() - t0) / n * 1e9)
    return median(times)


def ncpu() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def median(xs: Sequence[float]) -> float:
    """Median, 0.0 for no data."""
    return statistics.median(xs) if xs else 0.0


def spread(xs: Sequence[float]) -> float:
    """Relative spread (max - min) / median: how noisy the repeated runs were."""
    if len(xs) < 2:
        return 0.0
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m if m else 0.0


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted data, nearest rank."""
    if not sorted_xs:
        return 0.0
    i = min(len(sorted_xs) - 1, max(0, round(q * (len(sorted_xs) - 1))))
    return sorted_xs[i]


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_rss(pid: int | None = None) -> int:
    """Peak resident set size of ``pid`` in bytes (Linux ``VmHWM``; 0 if unknown)."""
    return _status_kb(os.getpid() if pid is None else pid, "VmHWM:") * 1024


def clear_peak_rss(pid: int | None = None) -> None:
    """Reset ``pid``'s peak RSS to its current RSS, so a peak belongs to one run.

    Writing 5 to ``/proc/PID/clear_refs`` does that (Linux >= 4.0); the harness
    process holds the payload and the peers' data, and without the reset every
    collector run would report the largest peer's peak.
    """
    try:
        with open(f"/proc/{os.getpid() if pid is None else pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class ProcSample:
    """CPU seconds and peak RSS of a set of processes between ``start()`` and ``stop()``.

    CPU is user + system time from psutil; a process that exits in between loses its
    last figures (workers outlive every measured run, so this does not happen here).
    """

    def __init__(self, pids: Iterable[int]) -> None:
        self.procs = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):  # a worker that just died is not measured
                self.procs.append(psutil.Process(pid))
        self.cpu0: dict[int, float] = {}
        self.cpu: dict[int, float] = {}
        self.peak: dict[int, int] = {}
        self.rss0: dict[int, int] = {}

    def _cpu(self, p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    def start(self) -> ProcSample:
        """Reset peaks and take the CPU baseline."""
        for p in self.procs:
            clear_peak_rss(p.pid)
            self.rss0[p.pid] = peak_rss(p.pid)  # just reset: the RSS at the start
            self.cpu0[p.pid] = self._cpu(p)
        return self

    def stop(self) -> ProcSample:
        """Take the CPU deltas and the peaks."""
        for p in self.procs:
            self.cpu[p.pid] = self._cpu(p) - self.cpu0.get(p.pid, 0.0)
            self.peak[p.pid] = peak_rss(p.pid)
        return self

    def total_cpu(self) -> float:
        """CPU seconds of all the processes."""
        return sum(self.cpu.values())


class Progress:
    """A one-line progress bar on stderr (``\\r``), quiet when stderr is not a terminal
    unless ``force``; long scenarios call :meth:`step` after each unit of work."""

    def __init__(self, total: int, what: str, *, force: bool | None = None) -> None:
        self.total = max(1, total)
        self.done = 0
        self.what = what
        self.t0 = time.monotonic()
        self.enabled = sys.stderr.isatty() if force is None else force
        self._width = 0

    def step(self, note: str = "", n: int = 1) -> None:
        """Count ``n`` units done and redraw with ``note``."""
        self.done += n
        self.show(note)

    def show(self, note: str = "") -> None:
        """Redraw the line."""
        if not self.enabled:
            return
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(frac * 24)
        line = f"{self.what} [{bar:<24}] {self.done}/{self.total} {time.monotonic() - self.t0:5.0f}s {note}"
        pad = max(0, self._width - len(line))
        self._width = len(line)
        print("\r" + line + " " * pad, end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the line."""
        if self.enabled:
            print(file=sys.stderr, flush=True)


def mb(n: float) -> str:
    """Bytes as MiB text."""
    return f"{n / 2**20:,.0f} MiB"


def fmt_rate(x: float) -> str:
    """Events per second as text."""
    return f"{x:,.0f}"


def as_jsonable(obj: Any) -> Any:
    """msgspec Structs and dataclasses in results → plain JSON values."""
    return msgspec.to_builtins(obj)
