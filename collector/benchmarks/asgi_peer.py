"""The daemon's peer: what a Python user would deploy instead of ``collector serve``.

A plain ASGI app (no framework) under ``uvicorn --workers N --loop uvloop --http
httptools``: ``POST /events/batch`` takes the body the daemon takes
(``{"events": [...]}``, see docs/daemon.md), decodes it with msgspec into
``list[GenericEvent]`` (the generic pack's own Struct, so the same validation), stamps
the receipt time on events sent without one, appends the events as JSON lines to a
file of its own per worker (``peer-<pid>.jsonl``) and answers like the daemon:
``202`` with the counts and one result per item (``accepted`` or ``invalid`` with
``path`` and ``reason``), ``400`` for malformed JSON, ``422`` for a wrong envelope.

What it does not do, and the daemon does: deduplicate ids, enrich ``segment``, shard
by id, and answer only after the sink committed (the daemon's JSONL sink fdatasyncs
every group of chunks before it acknowledges them, ``fsync = "batch"``). The peer
writes each request's lines with one ``write()`` to its file and answers: the bytes
are in the OS (they survive a crash of the process, not of the machine), unless
``COLLECTOR_PEER_FSYNC=request``, which adds an ``fdatasync`` (on a thread) before
each answer. ``COLLECTOR_PEER_DIR`` is where the files go (default: the working
directory).

:class:`PeerServer` starts it (``python -m uvicorn ...`` in its own session) for
``bench/http_load.py`` and the tests; uvicorn is the ``bench`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from ..http.schemas import BatchResponse, ErrorResponse, ItemResult
from ..packs.generic import GenericEvent
from ..worker.decoding import error_path
from .servers import HOST, ServerProcess

__all__ = ["PeerServer", "app", "stored_events", "uvicorn_missing"]

MAX_BODY = 16 << 20  # the daemon's default max_body_bytes


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    events: list[GenericEvent]


class _RawEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    events: list[msgspec.Raw]


_batch = msgspec.json.Decoder(_Envelope)
_raw_batch = msgspec.json.Decoder(_RawEnvelope)
_one = msgspec.json.Decoder(GenericEvent)
_enc = msgspec.json.Encoder()


class _File:
    """This worker's output file (opened at lifespan start, or on first use)."""

    fd = -1
    fsync = os.environ.get("COLLECTOR_PEER_FSYNC", "never") == "request"

    @classmethod
    def open(cls) -> int:
        if cls.fd < 0:
            d = os.environ.get("COLLECTOR_PEER_DIR", ".")
            cls.fd = os.open(os.path.join(d, f"peer-{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return cls.fd

    @classmethod
    def close(cls) -> None:
        if cls.fd >= 0:
            os.close(cls.fd)
            cls.fd = -1


def _decode(body: bytes) -> tuple[int, Any, list[GenericEvent]]:
    """(status, answer, events to store) for one batch body."""
    try:
        events = _batch.decode(body).events
        results = [ItemResult(i, "accepted", e.id) for i, e in enumerate(events)]
        return 202, BatchResponse(len(events), 0, 0, 0, results), events
    except msgspec.ValidationError:
        pass  # some item (or the envelope) is wrong: find out which, item by item
    except msgspec.DecodeError as e:
        return 400, ErrorResponse("malformed JSON", str(e)), []
    try:
        raw = _raw_batch.decode(body).events
    except msgspec.ValidationError as e:
        path, reason = error_path(str(e))
        return 422, ErrorResponse("invalid envelope", f"{reason}; send {{\"events\": [...]}}", path=path), []
    events, results = [], []
    for i, r in enumerate(raw):
        try:
            ev = _one.decode(r)
        except msgspec.ValidationError as e:
            path, reason = error_path(str(e))  # the collector's own reading of msgspec's message
            results.append(ItemResult(i, "invalid", path=f"$.events[{i}]{path[1:]}", reason=reason))
            continue
        events.append(ev)
        results.append(ItemResult(i, "accepted", ev.id))
    return 202, BatchResponse(len(events), 0, len(raw) - len(events), 0, results), events


async def _store(events: list[GenericEvent]) -> None:
    now = None
    for e in events:
        if e.timestamp is None:
            if now is None:  # one clock read per request, as the daemon's ReceiptTime stage does per chunk
                now = dt.datetime.now(dt.UTC)
            e.timestamp = now
    data = memoryview(_enc.encode_lines(events))
    fd = _File.open()
    while data:  # a regular file takes it all at once; the loop is for the rule, not the case
        data = data[os.write(fd, data) :]
    if _File.fsync:
        await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, fd)


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            _File.open()
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            _File.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The ASGI application: ``POST /events/batch``, ``GET /health``."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    path, method = scope["path"], scope["method"]
    if path == "/health":
        await _answer(send, 200, b'{"status":"ok"}')
        return
    if path != "/events/batch":
        await _answer(send, 404, _enc.encode(ErrorResponse("not found", f"no route {path}")))
        return
    if method != "POST":
        await _answer(send, 405, _enc.encode(ErrorResponse("method not allowed", "POST only")))
        return
    chunks, size, more = [], 0, True
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        part = msg.get("body", b"")
        size += len(part)
        if size > MAX_BODY:
            await _answer(send, 413, _enc.encode(ErrorResponse("body too large", f"at most {MAX_BODY} bytes")))
            return
        chunks.append(part)
        more = msg.get("more_body", False)
    status, answer, events = _decode(chunks[0] if len(chunks) == 1 else b"".join(chunks))
    if events:
        await _store(events)
    await _answer(send, status, _enc.encode(answer))


# ====================================================================== running it


def uvicorn_missing() -> str | None:
    """Why the peer cannot run here, or None when it can."""
    if importlib.util.find_spec("uvicorn") is None:
        return "uvicorn is not installed; install it with: pip install 'collector[bench]'"
    return None


_RUNNING = re.compile(rb"Uvicorn running on http://[^:\s]+:(\d+)")


class PeerServer(ServerProcess):
    """``uvicorn collector.benchmarks.asgi_peer:app --workers N`` on a free port of 127.0.0.1,
    writing to ``data_dir``; ready once every worker finished its start-up.

    Use as a context manager, or :meth:`start` and :meth:`stop`."""

    what = "the uvicorn peer"

    def __init__(self, data_dir: str, workers: int = 2, *, fsync: str = "never", log_path: str | None = None) -> None:
        if uvicorn_missing():
            from ..errors import missing

            raise missing("uvicorn", "bench", "the ASGI peer of `collector bench http`")
        if fsync not in ("never", "request"):
            raise ValueError(f"fsync must be 'never' or 'request' (got {fsync!r})")
        self.workers = workers
        self.data_dir = data_dir
        cmd = [sys.executable, "-m", "uvicorn", "collector.benchmarks.asgi_peer:app", "--host", HOST, "--port", "0",
               "--workers", str(workers), "--loop", "uvloop", "--http", "httptools", "--lifespan", "on",
               "--no-access-log", "--log-level", "info"]
        env = dict(os.environ, COLLECTOR_PEER_DIR=data_dir, COLLECTOR_PEER_FSYNC=fsync)
        self.own_log = log_path is None
        log = log_path or os.path.join(tempfile.gettempdir(), f"asgi-peer-{os.getpid()}-{id(self):x}.log")
        super().__init__(cmd, data_dir, log, env)

    def port_from_log(self, text: bytes) -> int:
        """uvicorn's "Uvicorn running on http://127.0.0.1:PORT" line (with the bound port)."""
        m = _RUNNING.search(text)
        return int(m.group(1)) if m else 0

    def is_ready(self) -> bool:
        """Every worker logged "Application startup complete" (its lifespan opened its file)."""
        return self._log().count(b"Application startup complete") >= self.workers

    def __enter__(self) -> PeerServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stop() in (0, None) and self.own_log:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)


def stored_events(data_dir: str) -> list[dict[str, Any]]:
    """Every event the peer's workers wrote to ``data_dir``, as dicts (file by file)."""
    out: list[dict[str, Any]] = []
    for p in sorted(Path(data_dir).glob("peer-*.jsonl")):
        out.extend(msgspec.json.decode(line) for line in p.read_bytes().splitlines() if line)
    return out
