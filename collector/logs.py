"""Structured logs: one JSON object per line on stderr.

Every line has ``time`` (Unix seconds), ``level``, ``logger``, ``msg`` and, in a
worker, ``worker`` (its slot index); extra fields passed as ``extra={"fields": {...}}``
are merged in (event counts, ports). The daemon sets ``COLLECTOR_LOG_FORMAT=json`` so
that its spawned workers log the same way.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import msgspec

__all__ = ["JsonFormatter", "setup_logging"]

_enc = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON (exceptions as a ``traceback`` field)."""
        out: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        try:
            return _enc.encode(out).decode()
        except (TypeError, msgspec.EncodeError):
            return _enc.encode({k: str(v) for k, v in out.items()}).decode()


def setup_logging(level: int | str = logging.INFO, *, json: bool | None = None, worker: int | None = None) -> None:
    """Configure the root logger on stderr: JSON lines when ``json`` (or the env says so)."""
    if json is None:
        json = os.environ.get("COLLECTOR_LOG_FORMAT") == "json"
    if isinstance(level, str):
        level = getattr(logging, level.upper())
    handler = logging.StreamHandler(sys.stderr)
    if json:
        handler.setFormatter(JsonFormatter(worker))
    else:
        tag = f"collector.worker[{worker}]" if worker is not None else "%(name)s"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag} %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.Formatter.converter = time.gmtime
