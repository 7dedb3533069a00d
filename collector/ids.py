"""Event ids: UUID version 7 (RFC 9562), made one at a time or in bulk.

:func:`new_id` is the id of an event sent without one (a Struct ``default_factory``);
:func:`new_ids` makes a request's worth at once (HTTP id injection).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from typing import Any

__all__ = ["id_block", "new_id", "new_ids"]

_NODE = int.from_bytes(os.urandom(4), "big") & 0x3FF_FFFF  # 26 random bits per process
_VARIANT = 0x8000 | (_NODE & 0x3FFF)  # the 4th group: variant bits and 14 of _NODE
_V4 = f"{_VARIANT:04x}"
_MASK = 0xFFFF_FFFF_FFFF
_COUNTER = [int.from_bytes(os.urandom(3), "big")]  # the next counter value
_LOCK = threading.Lock()  # a batch reserves a range of the counter
_PREFIX: list[Any] = [-1, ""]  # (millisecond, its id prefix): one format per millisecond, not per id


def _reserve(n: int) -> int:
    with _LOCK:
        c = _COUNTER[0]
        _COUNTER[0] = c + n
    return c


def new_id() -> str:
    """A UUID version 7 (RFC 9562) as text: the id of an event sent without one.

    Time-ordered, so a SQL primary key on it appends to its index instead of splitting
    pages at random (seed 004 stores ids in a MySQL primary key). Layout: 48-bit Unix
    milliseconds, version 7, 26 random bits fixed per process (``rand_a`` and the top of
    ``rand_b``), then a 48-bit per-process counter (RFC 9562's "fixed bit-length
    dedicated counter"), so ids never repeat within a process and differ between
    processes. The prefix is formatted once per millisecond: a few hundred ns per id,
    against 2-4 µs for ``str(uuid.uuid4())``.
    """
    return f"{_prefix()}{_V4}-{_reserve(1) & _MASK:012x}"


def new_ids(n: int) -> list[str]:
    """``n`` ids as :func:`new_id` makes them, with one clock read and no Python step
    per id: the 4th group and the counter are packed as 8-byte integers, hexed with a
    separator, and the dash and time prefix go in by one ``replace`` (about 0.05 µs an
    id, against 0.3 µs for an f-string each)."""
    if n <= 0:
        return []
    if n == 1:  # a single event: the pack-and-hex steps below cost 2.5x one f-string
        return [new_id()]
    c = _reserve(n)
    base = _VARIANT << 48
    if (c & _MASK) + n > _MASK:  # the 48-bit counter wraps inside this batch: rare, slow
        return [f"{_prefix()}{_V4}-{(c + i) & _MASK:012x}" for i in range(n)]
    lo = base | (c & _MASK)
    hx = struct.pack(f">{n}Q", *range(lo, lo + n)).hex("\n", 8)
    return ("\n" + hx).replace("\n" + _V4, f"\n{_prefix()}{_V4}-")[1:].split("\n")


def id_block(n: int) -> tuple[str, int]:
    """``(prefix, first)``: ``n`` ids as :func:`new_ids` makes them, for a native
    formatter (``collector.http.batchread``): id ``i`` is ``prefix`` followed by the 12
    lowercase hex digits of ``(first + i) & 0xFFFFFFFFFFFF`` (the counter wraps as it
    does here)."""
    return f"{_prefix()}{_V4}-", _reserve(n)


def _prefix() -> str:
    ms = time.time_ns() // 1_000_000
    if ms != _PREFIX[0]:
        _PREFIX[0] = ms
        _PREFIX[1] = f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7{_NODE >> 14:03x}-"
    return str(_PREFIX[1])
