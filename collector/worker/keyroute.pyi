"""Types of the native router built from keyroute.c (see its header comment)."""

KIND_STR: int
KIND_INT: int
KIND_NONE: int
KIND_MISSING: int

def split(
    payload: bytes | bytearray | memoryview, quoted_name: bytes, workers: int, me: int, kinds: int, /
) -> tuple[int, bytes, bytes, list[tuple[int, bytes, bytes]]] | None: ...
