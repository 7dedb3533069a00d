"""Chunk payloads in shared memory: one arena of fixed slots per worker channel.

::

    supervisor: Ledger.pump ─► arena.put(payload) ─► slot k (one memcpy)
                            ─► Chunk(payload=b"", slot=k, size=n) on the channel (a few bytes)
    worker:     Chunk ─► arena.view(k, n) ─► decode straight from the shared pages
    supervisor: the chunk's Ack, or its worker's death ─► arena.free(k)

A shard="key" NDJSON range goes with a slot reserved in each other worker's arena
(``take``): the worker routing it writes each owner's part straight into that owner's
slot (``write``), and the part reaches its owner without passing through the supervisor.

Over the channel socket a 400 KB NDJSON range was copied five times before the
worker could parse it (into the kernel, out of it, into the stream buffer, out of it,
out of the msgpack frame); through the arena it is copied once, by the supervisor.
A slot is written only while it is free, and freed only when its worker has
acknowledged the chunk or has exited: a worker never sees a slot change under it.

The arena has as many slots as a worker's window (the ledger never has more chunks in
flight to one worker), at most :data:`MAX_SLOTS`, each :data:`SLOT_BYTES` long; a
payload larger than a slot, or sent while every slot is taken, goes inline in its
frame, as before. Space is reserved when the arena is made: a full ``/dev/shm`` is an
error then, never a SIGBUS on a later write. Making, mapping and removing the segment
is :class:`collector.shm.Segment`'s job, as for the stats block.
"""

from __future__ import annotations

from .shm import Segment

__all__ = ["MAX_SLOTS", "SLOT_BYTES", "PayloadArena"]

SLOT_BYTES = 1 << 20  # a 2048-line range of 200-byte events is ~400 KB
MAX_SLOTS = 32  # per worker, whatever its window: 32 MiB of /dev/shm at most


class PayloadArena:
    """``slots`` payload slots of ``slot_bytes`` each, in one shared-memory segment.

    The creator (the supervisor) puts and frees; a worker attaches by ``name`` and
    only reads views.
    """

    def __init__(self, slots: int, slot_bytes: int = SLOT_BYTES, name: str | None = None, *,
                 create: bool = True) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.segment = Segment(slots * slot_bytes, name, create=create, reserve=create)
        self.name = self.segment.name
        self._buf: memoryview = self.segment.buf
        self._free = list(range(slots - 1, -1, -1))  # a stack: the slot freed last is warm in cache

    def put(self, payload: bytes | memoryview) -> int:
        """Copy ``payload`` into a free slot and return its index; -1 when it does not fit
        a slot or no slot is free (the caller sends it inline)."""
        if len(payload) > self.slot_bytes:
            return -1
        k = self.take()
        if k >= 0:
            self.write(k, payload)
        return k

    def take(self) -> int:
        """Reserve a free slot for a payload another process will write (a routed part,
        written by the worker that routes it); -1 when none is free."""
        return self._free.pop() if self._free else -1

    def write(self, k: int, payload: bytes | memoryview) -> None:
        """Copy ``payload`` into slot ``k``, reserved for it (:meth:`take`) by the creator."""
        start = k * self.slot_bytes
        self._buf[start:start + len(payload)] = payload

    def free(self, k: int) -> None:
        """Slot ``k`` may be written again (its worker acknowledged its chunk, or exited)."""
        self._free.append(k)

    def free_count(self) -> int:
        """Slots not holding a payload."""
        return len(self._free)

    def view(self, k: int, size: int) -> memoryview:
        """The ``size`` bytes in slot ``k`` (no copy; valid until the chunk is acknowledged)."""
        start = k * self.slot_bytes
        return self._buf[start:start + size]

    def close(self) -> None:
        """Unmap the arena; the creator also unlinks it."""
        self.segment.close()
