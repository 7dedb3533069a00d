"""Named shared-memory segments: the one way the collector makes, maps and removes them.

The creator (the supervisor) makes a segment with
:class:`multiprocessing.shared_memory.SharedMemory`, which registers it with the
resource tracker, so the segment is unlinked even when the creator is SIGKILLed; it
is the only owner and unlinks it at close. Other processes (workers) map
``/dev/shm/<name>`` directly: attaching through ``SharedMemory`` would register the
segment with the tracker a second time and unlink it when the worker exits (CPython
gh-82300). Names are ``collector_<creator pid>_<random>``: a collector killed together
with its process group (``kill -9 -PGID``, a container stop) takes the tracker with it,
and the next segment made on the machine unlinks those whose creator is gone
(:func:`sweep_stale_segments`). Used by the stats block (collector/stats.py) and the
payload arenas (collector/arena.py).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from multiprocessing import shared_memory

__all__ = ["Segment", "sweep_stale_segments"]


def sweep_stale_segments(shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink ``collector_<pid>_*`` segments whose creator is no longer running.

    Returns the names removed. A live pid keeps its segment even when it was reused by
    another program: a leak costs a few KiB, unlinking a live block would break a
    running collector.
    """
    import psutil

    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:  # no /dev/shm (not Linux): nothing to sweep
        return removed
    for n in names:
        parts = n.split("_")
        if len(parts) < 3 or parts[0] != "collector" or not parts[1].isdigit():
            continue
        if psutil.pid_exists(int(parts[1])):
            continue
        with contextlib.suppress(OSError):  # another collector swept it first
            os.unlink(os.path.join(shm_dir, n))
            removed.append(n)
    return removed


class Segment:
    """``size`` bytes of shared memory: made by its owner (``create``), or mapped by ``name``.

    ``reserve``: allocate the pages now (``posix_fallocate``). tmpfs allocates on first
    write, and a write that finds ``/dev/shm`` full is a SIGBUS, not an exception; with
    the reservation a full ``/dev/shm`` is an ``OSError`` here, and nothing is left.
    """

    def __init__(self, size: int, name: str | None = None, *, create: bool = True, reserve: bool = False) -> None:
        self._shm: shared_memory.SharedMemory | None = None
        self._mmap: mmap.mmap | None = None
        if create:
            sweep_stale_segments()
            # the creator's pid in the name: a leak (or a test's leak check) can tell
            # whose segment it is
            name = name or f"collector_{os.getpid()}_{secrets.token_hex(4)}"
            shm = self._shm = shared_memory.SharedMemory(name=name, create=True, size=size)
            if reserve:
                try:
                    os.posix_fallocate(shm._fd, 0, size)  # type: ignore[attr-defined]
                except BaseException:
                    shm.close()
                    with contextlib.suppress(FileNotFoundError):
                        shm.unlink()
                    raise
            buf = shm.buf
            assert buf is not None
            self.name = shm.name
        else:
            assert name is not None
            fd = os.open(f"/dev/shm/{name.lstrip('/')}", os.O_RDWR)
            try:
                self._mmap = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            buf = memoryview(self._mmap)
            self.name = name
        self.buf: memoryview = buf

    def close(self) -> None:
        """Unmap the segment; its creator also unlinks it. Views still held elsewhere
        keep the mapping until they go (it goes with the process)."""
        with contextlib.suppress(BufferError):
            self.buf.release()
        if self._shm is not None:
            with contextlib.suppress(BufferError):
                self._shm.close()
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()
            self._shm = None
        if self._mmap is not None:
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None
