"""Line sinks: ``stdout``, ``jsonl`` and the dead-letter file.

::

    commit(chunk A) ─┐                       one thread per file (blocking I/O off the loop)
    commit(chunk B) ─┼─► GroupWriter ──► b"".join ─► lock ─► rotate? ─► os.write ─► fsync? ─► unlock
    commit(chunk C) ─┘   (chunks that arrive while a write runs share the next one)

Every write is whole lines in one ``os.write`` call under an exclusive ``flock``, so
workers that share one file never interleave lines. A write that fails part-way is
truncated back to where it started before the error is raised, and a file opened
after a crash loses its torn last line (truncated at the last newline), so the last
line of the file is always complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import sys
import threading
import time

import msgspec

from .base import Batch, DeadLetter, EventCodec, Sink
from .batching import GroupWriter
from .config import DeadLetterConfig, JsonlSinkConfig, StdoutSinkConfig

__all__ = ["DeadLetterSink", "JsonlSink", "LineFile", "StdoutSink"]

log = logging.getLogger("collector.sinks")

PIPE_BUF = 4096  # writes up to this size are atomic on a pipe (POSIX)
# fsync = "batch": fdatasync runs on the worker's loop while it takes no longer than this
# (a moving average, over about the last five). Handed to the sink's thread, a 0.25 ms
# fdatasync cost more than itself: the thread waits for the GIL the loop holds to hand
# the result back (up to the 5 ms switch interval) and the loop takes a turn to resume
# the chunk (on the daemon, batched: 1.08x the events/s; single events' p99 at half load
# 15/9.6 -> 5.1/4.8 ms). Timed from the loop under load, on a 2-vCPU VM whose disk does
# it in 0.25 ms, they average 2-4 ms at times (the journal, and the CPU the loop waits
# for once the disk is done; the thread's way waits as long): the limit sits above that.
# A slow disk (a busy or network one) sends them to the thread, where they do not hold
# the loop and the chunks written meanwhile share one, and the loop tries one again
# INLINE_SYNC_RETRY seconds later.
INLINE_SYNC_MAX = 0.010
INLINE_SYNC_RETRY = 1.0
SYNC_AVERAGE = 0.2  # the weight of the latest fdatasync in the moving average


class LineFile:
    """An append-only file of lines with rotation and an fsync policy (blocking API)."""

    def __init__(self, path: str, *, fsync: str, max_bytes: int = 0, max_age: float = 0.0) -> None:
        self.path = os.path.abspath(path)
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.fd = -1
        self.opened_at = 0.0
        self.ino = -1
        # sync() runs on the sink's thread while writes may run on the worker's loop:
        # the descriptor is never swapped (rotation) under a running fdatasync
        self._fd_lock = threading.RLock()

    def open(self) -> None:
        """Open (creating it and its directory) and drop a torn last line."""
        d = os.path.dirname(self.path)
        os.makedirs(d, exist_ok=True)
        created = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)  # read: see write()
        self.fd = fd
        self.ino = os.fstat(fd).st_ino
        self.opened_at = time.monotonic()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            self._repair()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if created and self.fsync == "always":
            _fsync_dir(d)

    def _repair(self) -> None:
        """Truncate an incomplete last line (left by a crash mid-write)."""
        size = os.fstat(self.fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as r:
            r.seek(size - 1)
            if r.read(1) == b"\n":
                return
            pos = size
            block = 1 << 16
            cut = 0
            while pos > 0:
                start = max(0, pos - block)
                r.seek(start)
                buf = r.read(pos - start)
                i = buf.rfind(b"\n")
                if i >= 0:
                    cut = start + i + 1
                    break
                pos = start
        os.ftruncate(self.fd, cut)
        os.fsync(self.fd)
        log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted write", self.path, size - cut)

    def _rotated_name(self) -> str:
        root, ext = os.path.splitext(self.path)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return f"{root}.{stamp}.{os.getpid()}.{time.monotonic_ns() % 1_000_000:06d}{ext}"

    def _reopen(self) -> None:
        with self._fd_lock:
            if self.fsync != "never":
                # lines written without a sync yet (sync=False) must not lose theirs
                with contextlib.suppress(OSError):
                    os.fdatasync(self.fd)
            self._reopen_locked()

    def _reopen_locked(self) -> None:
        os.close(self.fd)
        self.fd = -1
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)  # read: see write()
        self.fd = fd
        self.ino = os.fstat(fd).st_ino
        self.opened_at = time.monotonic()

    def _locked_current(self) -> int:
        """Lock the file at ``path``; follow a rotation another process did. Its size."""
        while True:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_ino == self.ino:
                return os.fstat(self.fd).st_size
            # someone renamed the file away (rotation by another worker, logrotate)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self._reopen()

    def sync(self) -> None:
        """Make what was written durable, as the policy says (``fdatasync``/``fsync``)."""
        with self._fd_lock:
            if self.fd >= 0 and self.fsync != "never":
                (os.fsync if self.fsync == "always" else os.fdatasync)(self.fd)

    def write(self, blob: bytes, sync: bool = True) -> None:
        """Append ``blob`` (whole lines) in one write; all of it or none of it.

        ``sync=False`` leaves the fsync policy to a later :meth:`sync`.
        """
        if self.fd < 0:
            self.open()
        size = self._locked_current()
        try:
            if size > 0 and os.pread(self.fd, 1, size - 1) != b"\n":
                # another process sharing the file died mid-write (its lock went with
                # it): cut its torn line off rather than glue ours onto it
                self._repair()
                size = os.fstat(self.fd).st_size
            now = time.monotonic()
            if size > 0 and (
                (self.max_bytes and size + len(blob) > self.max_bytes)
                or (self.max_age and now - self.opened_at >= self.max_age)
            ):
                os.rename(self.path, self._rotated_name())
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                self._reopen()
                size = self._locked_current()
                if self.fsync == "always":
                    _fsync_dir(os.path.dirname(self.path))
            try:
                view = memoryview(blob)
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
                if sync and self.fsync == "always":
                    os.fsync(self.fd)
                elif sync and self.fsync == "batch":
                    os.fdatasync(self.fd)
            except BaseException:
                # leave no partial chunk behind: the retry appends the whole chunk again
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, size)
                raise
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the file descriptor."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


async def _open_deferred(sink: Sink, file: LineFile, writer: GroupWriter) -> None:
    try:
        await writer.executor.run(file.open)
    except OSError as e:
        # LineFile.write opens the file when it is not open: the write path retries
        with contextlib.suppress(OSError):
            file.close()
        sink.healthy = False
        log.warning("sink %s: cannot open %s yet (%s); writes will retry", sink.name, file.path, sink.describe_error(e))


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _expand(path: str, worker: int) -> str:
    return path.replace("{worker}", str(worker))


class JsonlSink(Sink):
    """Events as JSON lines in a rotated file (see :class:`JsonlSinkConfig`)."""

    kind = "jsonl"

    def __init__(self, config: JsonlSinkConfig, *, name: str, codec: EventCodec, worker: int) -> None:
        super().__init__(config, name=name, codec=codec, worker=worker)
        self.file = LineFile(
            _expand(config.path, worker), fsync=config.fsync, max_bytes=config.max_bytes, max_age=config.max_age
        )
        self.writer = GroupWriter(self.file.write, name)
        # fdatasync of the chunks written meanwhile, one at a time, on the same thread
        self.syncer = GroupWriter(lambda _blob: self.file.sync(), name, executor=self.writer.executor)
        self.sync_on_thread_until = 0.0  # fsync = "batch": the loop syncs from then on
        self.sync_average = 0.0  # seconds: the loop's fdatasyncs, a moving average
        self.sync_probe = False  # the loop's next fdatasync is its first after the thread's
        self.syncs_inline = self.syncs_on_thread = 0  # how this sink's fdatasyncs ran

    async def open(self) -> None:
        """Open the file and repair a torn last line (on the sink's thread).

        A file that cannot be opened yet (a directory not mounted, no permission) is
        not a boot failure: every write tries to open it again, so the retry budget
        and the dead-letter sink apply as for a store that is down.
        """
        await _open_deferred(self, self.file, self.writer)

    async def write(self, batch: Batch) -> None:
        """Append the chunk; returns after the fsync the policy asks for.

        With ``fsync = "never"`` or ``"batch"`` the write itself runs on the worker's
        loop: it lands in the page cache in microseconds, less than handing every
        chunk to a thread cost (10-20 % of a worker under small HTTP chunks). Only the
        ``fdatasync`` follows on the loop too while it stays fast (see
        ``INLINE_SYNC_MAX``), else on the sink's thread, shared by the chunks written
        meanwhile. ``"always"``, and a file not open yet, take the thread for all of it.
        """
        blob = batch.ndjson
        if self.config.fsync == "always" or self.file.fd < 0 or self.writer.busy:
            await self.writer.write(blob)
            return
        self.file.write(blob, sync=False)
        if self.config.fsync != "batch":
            return
        start = time.monotonic()
        if start >= self.sync_on_thread_until and not self.syncer.busy:
            self.file.sync()
            self.syncs_inline += 1
            took = time.monotonic() - start
            if self.sync_probe:  # the disk is judged afresh after a while on the thread
                self.sync_average, self.sync_probe = took, False
            else:
                self.sync_average += (took - self.sync_average) * SYNC_AVERAGE
            if self.sync_average > INLINE_SYNC_MAX:
                self.sync_on_thread_until = start + took + INLINE_SYNC_RETRY
                self.sync_probe = True
                log.debug("%s: fdatasync took %.1f ms on average; syncing on the sink's thread for %.1f s",
                          self.name, self.sync_average * 1e3, INLINE_SYNC_RETRY)
            return
        self.syncs_on_thread += 1
        await self.syncer.write(b"")

    async def flush(self) -> None:
        """Wait for the write and the sync in progress."""
        await self.writer.drain()
        await self.syncer.drain()

    async def close(self) -> None:
        """Close the file and stop the sink's thread."""
        await self.flush()
        await self.writer.executor.run(self.file.close)
        self.writer.shutdown()


class StdoutSink(Sink):
    """Events as JSON lines on standard output, with the event's own keys (seed 001)."""

    kind = "stdout"

    def __init__(self, config: StdoutSinkConfig, *, name: str, codec: EventCodec, worker: int, fd: int = 1) -> None:
        super().__init__(config, name=name, codec=codec, worker=worker)
        self.fd = fd
        self.writer = GroupWriter(self._write, name)
        try:
            mode = os.fstat(fd).st_mode
            # several workers share one pipe: writes up to PIPE_BUF are atomic there,
            # so lines are written in line-aligned pieces no bigger than that
            self.piecewise = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)
        except OSError:
            self.piecewise = False

    def _write(self, blob: bytes) -> None:
        if self.fd == 1:
            with contextlib.suppress(Exception):
                sys.stdout.flush()  # keep print() output ordered before ours
        if not self.piecewise or len(blob) <= PIPE_BUF:
            _write_all(self.fd, blob)
            return
        start = 0
        n = len(blob)
        while start < n:
            end = start + PIPE_BUF
            if end < n:
                cut = blob.rfind(b"\n", start, end)
                end = cut + 1 if cut >= start else blob.find(b"\n", end) + 1 or n
            _write_all(self.fd, memoryview(blob)[start:end])
            start = end

    async def write(self, batch: Batch) -> None:
        """Write the chunk's lines."""
        await self.writer.write(batch.ndjson)

    async def flush(self) -> None:
        """Wait for the write in progress."""
        await self.writer.drain()

    async def close(self) -> None:
        """Stop the sink's thread (standard output stays open)."""
        await self.writer.drain()
        self.writer.shutdown()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class DeadLetterSink(Sink):
    """:class:`DeadLetter` records as JSON lines (see :class:`DeadLetterConfig`)."""

    kind = "deadletter"

    def __init__(self, config: DeadLetterConfig, *, name: str, codec: EventCodec, worker: int) -> None:
        super().__init__(config, name=name, codec=codec, worker=worker)
        self.file = LineFile(_expand(config.path, worker), fsync=config.fsync, max_bytes=config.max_bytes)
        self.writer = GroupWriter(self.file.write, name)
        self.encoder = msgspec.json.Encoder()

    async def open(self) -> None:
        """Open the file and repair a torn last line (a failure is retried on write)."""
        await _open_deferred(self, self.file, self.writer)

    async def write_records(self, records: list[DeadLetter]) -> None:
        """Append ``records``."""
        await self.writer.write(self.encoder.encode_lines(records))

    async def write(self, batch: Batch) -> None:
        """Not used: events reach the dead-letter sink as records."""
        raise TypeError("the dead-letter sink takes DeadLetter records (write_records)")

    async def flush(self) -> None:
        """Wait for the write in progress."""
        await self.writer.drain()

    async def close(self) -> None:
        """Close the file and stop the sink's thread."""
        await self.writer.drain()
        await self.writer.executor.run(self.file.close)
        self.writer.shutdown()


def read_deadletters(path: str) -> list[DeadLetter]:
    """Every record of a dead-letter file (a torn last line is skipped)."""
    dec = msgspec.json.Decoder(DeadLetter)
    out = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            if line.strip():
                out.append(dec.decode(line))
    return out
