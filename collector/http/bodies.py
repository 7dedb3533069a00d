"""Request bodies before they are read as events: nesting depth, and undoing
``Content-Encoding`` with the body limit applied to the output.

Both run on the supervisor loop for every ingest request, so each is a few C-level
passes over the bytes, never a Python loop per byte.
"""

from __future__ import annotations

import re
import zlib

__all__ = ["ENCODINGS", "TooLarge", "inflate", "json_depth"]

_ESCAPE = re.compile(rb"\\.", re.S)
_STRING = re.compile(rb'"[^"]*"')
_KEEP = bytes(range(256)).translate(None, b'{}[]"')  # delete all but the structural bytes
_PARENS = bytes.maketrans(b"{[}]", b"(())")


def json_depth(body: bytes, limit: int) -> int:
    """Nesting depth of arrays and objects in ``body``; ``limit + 1`` means "deeper".

    Every step is a C-level pass, none is per byte in Python: escapes go first (so
    ``\\"`` does not end a string), then every byte that is not a bracket or a quote,
    then string bodies; what is left is brackets only. Each ``replace("()", "")``
    removes the innermost pairs, so the number of passes until nothing is left is the
    depth (a normal event needs three or four).
    """
    s = (_ESCAPE.sub(b"", body) if b"\\" in body else body).translate(None, _KEEP)
    if len(s) <= limit:
        return 0  # fewer brackets than the limit: cannot be deeper
    # most strings hold no bracket and are now `""`; dropping those pairs first leaves
    # the regex (a call per match) only the strings that do
    s = s.replace(b'""', b"")
    if b'"' in s:
        s = _STRING.sub(b"", s)
    s = s.translate(_PARENS)
    for depth in range(limit + 1):
        if not s:
            return depth
        s = s.replace(b"()", b"")
    # limit + 1 passes and brackets were left after the first limit of them: deeper
    # (this said `limit` when the last pass emptied it, so a body one level too deep passed)
    return limit + 1


# Content-Encoding → zlib wbits (None: nothing to undo). "deflate" is the zlib format
# (RFC 9110); inflate also takes the raw deflate some clients send under that name
ENCODINGS: dict[str, int | None] = {"": None, "identity": None, "gzip": 31, "x-gzip": 31, "deflate": 15}


class TooLarge(Exception):
    """The body inflates to more than the limit."""


def inflate(body: bytes, wbits: int, limit: int) -> bytes:
    """``body`` decompressed, never more than ``limit`` bytes of output held (a small
    body can expand a thousandfold); gzip members written one after another are read
    in turn, as gzip(1) does."""
    out: list[bytes] = []
    size = 0
    data = body
    while True:
        d = zlib.decompressobj(wbits)
        try:
            chunk = d.decompress(data, limit + 1 - size)
        except zlib.error:
            if wbits != 15 or out:
                raise
            d = zlib.decompressobj(-15)  # raw deflate, no zlib header
            chunk = d.decompress(data, limit + 1 - size)
        size += len(chunk)
        out.append(chunk)
        if size > limit or d.unconsumed_tail:
            raise TooLarge
        if not d.eof:
            raise zlib.error("the compressed stream ends early (truncated body)")
        data = d.unused_data
        if not data or wbits != 31:
            break
    if data:
        raise zlib.error(f"{len(data)} bytes of trailing data after the compressed stream")
    return b"".join(out)

