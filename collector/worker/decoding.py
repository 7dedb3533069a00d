"""A chunk's payload → the pipeline's events, and an error record for each bad item.

::

    payload (JSON array, or NDJSON) ─► one C parse of the whole chunk (the fast path)
        └─ it fails: item by item, each bad item an ErrorRecord (path, reason), the
           rest decoded; ``kept`` maps each event to its position in the chunk

An NDJSON chunk's blank lines are not items (:func:`collector.protocol.ndjson_lines`):
the worker that counts a range's lines and the supervisor that places its errors agree.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..protocol import ErrorRecord, ndjson_lines

__all__ = ["ChunkDecoder", "error_path"]


def error_path(msg: str) -> tuple[str, str]:
    """Split msgspec's "Expected `int`, got `str` - at `$.start_at`" into path, reason."""
    reason, sep, rest = msg.rpartition(" - at `")
    if sep:
        return rest.rstrip("`"), reason
    return "$", msg


class ChunkDecoder:
    """Decoders of one event type: a chunk at once, one item, raw items."""

    def __init__(self, event_type: Any) -> None:
        self.event_type = event_type
        self.dec = msgspec.json.Decoder(list[event_type])
        self.dec_one = msgspec.json.Decoder(event_type)
        self.dec_raw = msgspec.json.Decoder(list[msgspec.Raw])
        self.scratch = bytearray(b"[")  # an NDJSON range as a JSON array, reused (see as_array)

    def items(self, payload: bytes | memoryview, ndjson: bool) -> list[Any]:
        """The raw JSON text of each item of a chunk (an NDJSON chunk's blank lines are none)."""
        if ndjson:
            return ndjson_lines(bytes(payload))
        return self.dec_raw.decode(payload)

    def as_array(self, payload: bytes | memoryview) -> bytearray:
        """``[line,line,...]`` of an NDJSON range, built in a buffer kept between chunks.

        It takes a view of the payload arena as well as bytes, with one copy. (The
        earlier ``b"[" + payload.replace(...) + b"]"`` holds two range-sized blocks at
        once; in a short process glibc gives such blocks back and page-faults them in
        again, ~150 ns per event, but a worker's heap keeps them: the same speed there.)
        """
        buf = self.scratch
        buf[1:] = payload  # after the "[": resized in place, its capacity kept
        if buf[-1] == 0x0A:  # a last line's newline (msgspec's encode_lines ends so) is no
            buf[-1] = 0x5D  # item: "[a,b,]" would fail the fast parse and go line by line
        else:
            buf.append(0x5D)  # ]
        return buf.replace(b"\n", b",")

    def decode(self, payload: bytes | memoryview,
               ndjson: bool = False) -> tuple[list[Any], list[int] | None, list[ErrorRecord]]:
        """Events of a chunk; ``kept`` maps event index → chunk position when some failed."""
        try:
            if ndjson:
                # one array parse beats decode_lines; a blank line makes it fail (",,")
                # and the slow path below skips it: blank lines are not events
                return self.dec.decode(self.as_array(payload)), None, []
            else:
                return self.dec.decode(payload), None, []
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
        # slow path, only for chunks that hold an invalid event: item by item
        errors: list[ErrorRecord] = []
        try:
            raws = self.items(payload, ndjson)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            # the supervisor validated the JSON structure; this is a bug, not input
            raise RuntimeError(f"chunk payload is not a JSON array: {e}") from e
        events = []
        kept: list[int] = []
        dec_one = self.dec_one
        for i, raw in enumerate(raws):
            try:
                events.append(dec_one.decode(raw))
                kept.append(i)
            except msgspec.ValidationError as e:
                path, reason = error_path(str(e))
                errors.append(ErrorRecord(i, path, reason, "invalid"))
            except msgspec.DecodeError as e:
                errors.append(ErrorRecord(i, "$", f"malformed JSON: {e}", "invalid"))
        return events, kept, errors
