"""Types of the native batch reader built from batchread.c (see its header comment)."""

from typing import Any

def with_ids(
    raws: list[Any],
    quoted_id: bytes,
    prefix: str,
    first: int,
    quoted_key: bytes | None,
    owner: int = 0,
    workers: int = 1,
    span: int = 0,
    /,
) -> tuple[list[bytes], list[str], list[Any], int] | None: ...

def sent_ids(
    raws: list[Any], quoted_id: bytes, quoted_key: bytes | None, workers: int = 1, /
) -> tuple[list[Any], list[Any], int, list[int] | None] | None: ...

def accepted(ids: list[Any], layout: tuple[bytes, bytes, bytes, bytes, bytes, bytes], /) -> bytes | None: ...
