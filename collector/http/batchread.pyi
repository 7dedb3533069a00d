"""Types of the native batch reader built from batchread.c (see its header comment)."""

from typing import Any

def with_ids(
    raws: list[Any], quoted_id: bytes, ids: list[str], quoted_key: bytes | None, /
) -> tuple[list[bytes], list[Any] | None, int] | None: ...
