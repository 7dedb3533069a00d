"""The ``map`` kind: a mapping given in Python, or a JSON object / CSV file kept fresh.

A file is re-read when its modification time (or size) changes, checked at most every
``check_interval`` seconds and only when a lookup asks; a file that fails to parse
keeps the previous contents (and logs why). File keys are strings, so a non-string
lookup key is also tried as ``str(key)``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from .base import Source, SourceError
from .config import MapSourceConfig

__all__ = ["MapSource"]

log = logging.getLogger("collector.sources")


class MapSource(Source):
    """``MapSource(data={...})``, ``MapSource(path="regions.csv", value_column="region")``."""

    kind = "map"
    Config = MapSourceConfig

    def __init__(self, config: Any = None, /, **fields: Any) -> None:
        super().__init__(config, **fields)
        cfg = self.config
        if (cfg.data is None) == (not cfg.path):
            raise SourceError("map source: give either `data` or `path`")
        self.data: Mapping[Any, Any] = cfg.data if cfg.data is not None else {}
        self.stamp: tuple[int, int] | None = None
        self.checked = -1e18
        self.loads = 0  # how many times the file was (re)read

    def _load(self) -> None:
        path = self.config.path
        now = time.monotonic()
        if now - self.checked < self.config.check_interval and self.stamp is not None:
            return
        self.checked = now
        try:
            st = os.stat(path)
        except OSError as e:
            if self.stamp is None:
                raise SourceError(f"map source {path!r}: {e}") from None
            return  # keep what was read; the file may be being replaced
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self.stamp:
            return
        try:
            with open(path, "rb") as f:
                raw = f.read()
            self.data = self._parse(raw)
        except (OSError, ValueError, msgspec.DecodeError) as e:
            if self.stamp is None:
                raise SourceError(f"map source {path!r}: cannot read: {e}") from None
            log.warning("map source %s: cannot re-read (%s); keeping the previous contents", path, e)
            return
        self.stamp = stamp
        self.loads += 1

    def _parse(self, raw: bytes) -> dict[Any, Any]:
        cfg = self.config
        fmt = cfg.format
        if fmt == "auto":
            fmt = "csv" if cfg.path.lower().endswith(".csv") else "json"
        if fmt == "json":
            data = msgspec.json.decode(raw)
            if not isinstance(data, dict):
                raise ValueError("a JSON map file must hold one object")
            return data
        rows = csv.DictReader(io.StringIO(raw.decode("utf-8")))
        out: dict[Any, Any] = {}
        for row in rows:
            if cfg.key_column not in row:
                raise ValueError(f"no column {cfg.key_column!r}")
            out[row[cfg.key_column]] = row[cfg.value_column] if cfg.value_column else row
        return out

    async def get_many(self, keys: Sequence[Any]) -> dict[Any, Any]:
        """The keys the mapping has."""
        if self.config.path:
            self._load()
        data = self.data
        out: dict[Any, Any] = {}
        for k in keys:
            v = data.get(k, _ABSENT)
            if v is _ABSENT and type(k) is not str:
                v = data.get(str(k), _ABSENT)
            if v is not _ABSENT:
                out[k] = v
        return out

    @property
    def max_batch(self) -> int:
        return 100_000

    def describe(self) -> str:
        return f"map {self.config.path}" if self.config.path else "map"


_ABSENT = object()
