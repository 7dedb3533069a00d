"""The daemon as users start it: ``python -m collector serve`` in its own session.

Every test talks HTTP to a real daemon process (real workers, real JSONL files) and
every wait is bounded. The daemon's stderr (JSON lines) is kept in the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import wait_until
from paths import ROOT, SUPPORT

from collector.commands.demo import HttpClient

EVENT = {"type": "user_action", "source": "web", "user_id": "user_123",
         "data": {"action": "purchase", "value": 99.99}}


class Daemon:
    """A running ``collector serve`` and what the test needs to talk to it."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, data: Path, log: Path, cfg: Path) -> None:
        self.proc = proc
        self.port = port
        self.data = data
        self.log = log
        self.cfg = cfg

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, str):
                body = body.encode()
            h = {"Content-Type": "application/json"} if body is not None else {}
            h.update(headers or {})
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def post(self, path: str, obj: Any, **kw: Any) -> tuple[int, Any]:
        status, _, body = self.request("POST", path, json.dumps(obj), **kw)
        return status, json.loads(body)

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        status, _, body = self.request("GET", path, **kw)
        return status, json.loads(body)

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for ln in self.log.read_text().splitlines():
            try:
                out.append(json.loads(ln))
            except ValueError:
                out.append({"msg": ln, "level": "raw"})
        return out

    def stored(self) -> list[dict[str, Any]]:
        rows = []
        for f in sorted(self.data.glob("events-*.jsonl")):
            rows += [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
        return rows

    def deadletters(self) -> list[dict[str, Any]]:
        rows = []
        for f in sorted(self.data.glob("deadletter-*.jsonl")):
            rows += [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
        return rows

    def worker_pids(self) -> set[int]:
        return {c.pid for c in psutil.Process(self.proc.pid).children() if "spawn_main" in " ".join(c.cmdline())}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"the daemon did not stop within {timeout}s; log:\n{self.log.read_text()[-3000:]}") from None


def start_daemon(tmp: Path, config: str = "", env: dict[str, str] | None = None, ready: bool = True,
                 workers: int = 2, wrap: list[str] | None = None, args: list[str] | None = None) -> Daemon:
    """Start ``python -m collector serve`` on a free port with ``config`` (TOML text).

    ``wrap``: a command line that execs the rest (the daemon's argv follows it);
    ``args``: more options of ``collector serve``.
    """
    data = tmp / "data"
    cfg = tmp / "collector.toml"
    cfg.write_text(config)
    port_file = tmp / "port"
    port_file.unlink(missing_ok=True)  # a daemon restarted in the same dir: not the old port
    log = tmp / "daemon.log"
    cmd = [*(wrap or []), sys.executable, "-m", "collector", "serve", "--config", str(cfg), "--port", "0",
           "--data-dir", str(data), "--port-file", str(port_file), "--workers", str(workers), *(args or [])]
    with open(log, "wb") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=lf, start_new_session=True, env={**os.environ, **(env or {})})
    try:
        wait_until(lambda: (port_file.exists() and port_file.read_text().strip()) or proc.poll() is not None,
                   60, what="the daemon to listen")
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        d = Daemon(proc, int(port_file.read_text()), data, log, cfg)
        if ready:
            wait_until(lambda: _ready(d), 30, what="GET /ready == 200")
        return d
    except BaseException:
        with_kill(proc)
        raise


def _ready(d: Daemon) -> bool:
    try:
        return d.request("GET", "/ready", timeout=5)[0] == 200
    except OSError:
        return False


def with_kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


PROBE_RULE = '[[rules]]\nname = "probe"\nwhen = { path = "data.probe", exists = true }\naction = "allow"\n'


@pytest.fixture
def daemon(tmp_path: Path, no_leaks: None) -> Iterator[Daemon]:
    """A daemon on embedded defaults (generic pack, JSONL sink), 2 workers."""
    # a rule that matches only events carrying data.probe: /processor/filters has counters to show
    d = start_daemon(tmp_path, "[pipeline]\nenrich_latency = 0.001\n" + PROBE_RULE)
    try:
        yield d
    finally:
        code = d.stop()
        assert code == 0, f"exit code {code}; log:\n{d.log.read_text()[-3000:]}"


# ------------------------------------------------------------------ seed 004's examples
def test_seed_curl_examples_single_batch_metrics_health(daemon: Daemon) -> None:
    status, body = daemon.post("/events", EVENT)
    assert status == 202 and body["status"] == "accepted"
    single_id = body["id"]
    batch = {"events": [
        {"type": "sensor_data", "source": "iot_device", "data": {"temperature": 23.5}},
        {"type": "system_log", "source": "system", "data": {"level": "error", "message": "Connection timeout"}},
    ]}
    status, body = daemon.post("/events/batch", batch)
    assert status == 202
    assert body["accepted"] == 2 and body["invalid"] == 0
    assert [r["status"] for r in body["results"]] == ["accepted", "accepted"]
    ids = [r["id"] for r in body["results"]]
    status, m = daemon.get("/metrics")
    assert status == 200
    for k in ("events_received", "events_processed", "events_failed", "average_processing_latency_ms",
              "current_queue_depth", "active_workers", "events_per_second", "uptime_seconds"):
        assert k in m, k
    assert m["events_received"] == 3 and m["events_processed"] == 3 and m["events_failed"] == 0
    assert m["active_workers"] == 2 and m["current_queue_depth"] == 0
    status, h = daemon.get("/health")
    assert status == 200 and h["status"] == "ok"
    # a 202 means stored: every id is in the JSONL files with its fields intact
    rows = {r["id"]: r for r in daemon.stored()}
    assert set(rows) == {single_id, *ids}
    r = rows[single_id]
    assert r["type"] == "user_action" and r["user_id"] == "user_123" and r["data"] == EVENT["data"]
    assert r["timestamp"].endswith("Z") and r["segment"] in ("new", "casual", "regular", "power")
    assert rows[ids[0]]["segment"] == "anonymous"  # no user: the simulated service's answer
    # Prometheus text, by negotiation and by path
    status, hdrs, text = daemon.request("GET", "/metrics", headers={"Accept": "text/plain"})
    assert status == 200 and hdrs["content-type"].startswith("text/plain")
    assert b"collector_events_received_total 3" in text
    assert b'collector_worker_up{worker="1"} 1' in text
    assert b'collector_stage_latency_seconds_bucket{stage="http_request",le="+Inf"}' in text


def test_client_ids_are_kept_and_repeats_are_reported_as_duplicates(daemon: Daemon) -> None:
    ev = {**EVENT, "id": "3f0e7c8e-0000-4000-8000-000000000001"}
    assert daemon.post("/events", ev) == (202, {"status": "accepted", "id": ev["id"]})
    assert daemon.post("/events", ev) == (200, {"status": "duplicate", "id": ev["id"]})
    status, body = daemon.post("/events/batch", {"events": [ev, {**ev, "id": "other-1"}]})
    assert status == 202
    assert [(r["status"], r["id"]) for r in body["results"]] == [("duplicate", ev["id"]), ("accepted", "other-1")]
    assert sorted(r["id"] for r in daemon.stored()) == sorted([ev["id"], "other-1"])


def test_single_events_that_sent_ids_reach_their_ids_worker(daemon: Daemon) -> None:
    """``POST /events`` reads an event that sent its id in C too; the event must still go
    to the worker its id hashes to (not to the worker the server would make ids for), so
    that every repeat meets the original's dedup window: 40 ids, each sent twice, the
    repeats in reverse order (idle workers take turns at the ids the server makes, so a
    repeat sent in the same turn as its original would reach the same worker anyway)."""
    ids = [f"single-own-{i}" for i in range(40)]
    for i in ids:
        assert daemon.post("/events", {**EVENT, "id": i}) == (202, {"status": "accepted", "id": i})
    for i in reversed(ids):
        assert daemon.post("/events", {**EVENT, "id": i}) == (200, {"status": "duplicate", "id": i})
    assert sorted(r["id"] for r in daemon.stored() if r["id"] in set(ids)) == sorted(ids)


def _worker_events(daemon: Daemon, total: int) -> list[int]:
    """Events per worker once ``total`` are counted (the counters trail the answers a little)."""
    deadline = time.monotonic() + 10
    while True:
        per = [w["events"] for w in daemon.get("/metrics")[1]["workers"]]
        if sum(per) >= total or time.monotonic() > deadline:
            return per
        time.sleep(0.02)


def test_generated_ids_put_a_requests_events_on_one_worker_and_their_repeats_are_duplicates(daemon: Daemon) -> None:
    """Events sent without ids get ids that the shard function gives to one worker (the
    least loaded; idle workers take turns), so a request's events make one chunk there,
    not one per worker. A repeat sent later with the id it was given still reaches that
    worker's dedup window, through the native reader and the Python one (a batch where
    some event sent its own id)."""
    ev = {"type": "sensor_data", "source": "iot_device", "data": {"t": 1}}
    per, total, ids = [0, 0], 0, []
    for rnd in range(4):
        batch = [dict(ev) for _ in range(50)]
        if rnd == 3:  # one event with its own id: the batch is read the Python way
            batch[7]["id"] = "client-own-1"
        status, body = daemon.post("/events/batch", {"events": batch})
        assert status == 202 and body["accepted"] == 50, body
        ids += [r["id"] for r in body["results"]]
        total += 50
        now = _worker_events(daemon, total)
        grew = sorted(b - a for a, b in zip(per, now, strict=True))
        per = now
        if rnd < 3:
            assert grew == [0, 50], f"request {rnd}: its events were split over the workers: {grew}"
        else:  # the 49 generated ids on one worker, the client's id wherever it hashes to
            assert grew in ([0, 50], [1, 49]), grew
    assert min(per) >= 50, f"one worker took every request: {per}"
    status, body = daemon.post("/events", dict(ev))
    assert status == 202
    ids.append(body["id"])
    # every repeat, by the id it was given: a duplicate, found by the worker that stored it
    for lo in range(0, len(ids), 100):
        part = ids[lo:lo + 100]
        status, body = daemon.post("/events/batch", {"events": [{**ev, "id": i} for i in part]})
        assert status == 202 and body["duplicates"] == len(part), body
    assert daemon.post("/events", {**ev, "id": ids[-1]})[1]["status"] == "duplicate"
    assert sorted(r["id"] for r in daemon.stored()) == sorted(ids)


# ------------------------------------------------------------------ bad input
BAD: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    # (name, path, body, headers, status, text the answer must contain)
    ("malformed JSON", "/events", b'{"type": "user_action",', {}, 400, "malformed_json"),
    ("empty body", "/events", b"", {}, 400, "empty"),
    ("wrong type value", "/events", b'{"type": "nope", "source": "web"}', {}, 422, "$.type"),
    ("missing field", "/events", b'{"type": "user_action"}', {}, 422, "source"),
    ("unknown field", "/events", b'{"type": "user_action", "source": "web", "tpye": 1}', {}, 422, "tpye"),
    ("bad timestamp", "/events", b'{"type": "user_action", "source": "web", "timestamp": "yesterday"}', {}, 422, "$.timestamp"),
    ("not an object", "/events", b"[1, 2]", {}, 422, "object"),
    ("batch not an object", "/events/batch", b"[]", {}, 422, "object"),
    ("batch without events", "/events/batch", b'{"event": []}', {}, 422, "events"),
    ("wrong content type", "/events", b"{}", {"Content-Type": "text/plain"}, 415, "application/json"),
    ("too deep", "/events", b'{"type": "user_action", "source": "web", "data": ' + b'{"a":' * 40 + b"1" + b"}" * 41,
     {}, 400, "max_json_depth"),
    ("too deep with an id", "/events",
     b'{"id": "d0", "type": "user_action", "source": "web", "data": ' + b'{"a":' * 40 + b"1" + b"}" * 41,
     {}, 400, "max_json_depth"),
    ("too deep and not an object", "/events", b"[" * 40 + b"]" * 40, {}, 400, "max_json_depth"),
    # a batch of events without ids is read natively (batchread.c), one with an id the Python way
    ("too deep in a batch", "/events/batch",
     b'{"events": [{"type": "user_action", "source": "web", "data": ' + b'{"a":' * 40 + b"1" + b"}" * 41 + b"]}",
     {}, 400, "max_json_depth"),
    ("too deep in a batch with ids", "/events/batch",
     b'{"events": [{"id": "d1", "type": "user_action", "source": "web", "data": ' + b'{"a":' * 40 + b"1"
     + b"}" * 41 + b"]}", {}, 400, "max_json_depth"),
    ("too many items", "/events/batch", json.dumps({"events": [EVENT] * 101}).encode(), {}, 413, "max_batch_items"),
    ("body too large", "/events", b'{"x": "' + b"a" * (1 << 20) + b'"}', {}, 413, "max_body_bytes"),
    # 4 KiB on the wire, 4 MiB once inflated: refused without holding the 4 MiB
    ("gzip bomb", "/events", gzip.compress(b'{"x": "' + b"a" * (4 << 20) + b'"}'), {"Content-Encoding": "gzip"},
     413, "decompresses to more than max_body_bytes"),
    ("corrupt gzip", "/events", gzip.compress(json.dumps(EVENT).encode())[:-12], {"Content-Encoding": "gzip"},
     400, "bad_encoding"),
    ("gzip claimed, plain sent", "/events", json.dumps(EVENT).encode(), {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
    ("unknown encoding", "/events", b"{}", {"Content-Encoding": "br"}, 415, "gzip, deflate"),
    # the fault suite's classes (issue 10, section 3)
    ("invalid UTF-8", "/events", b'{"type": "user_action", "source": "web", "user_id": "\xff\xfe"}', {}, 422,
     "Invalid UTF-8"),
    ("truncated UTF-8 sequence", "/events", b'{"type": "user_action", "source": "web", "data": {"k": "\xc3"}}', {},
     422, "Invalid UTF-8"),
    ("lone high surrogate", "/events", b'{"type": "user_action", "source": "web", "user_id": "\\ud800"}', {}, 400,
     "malformed_json"),
    ("lone low surrogate", "/events", b'{"type": "user_action", "source": "web", "data": {"k": "\\udc00x"}}', {},
     400, "surrogate"),
    ("NaN literal", "/events", b'{"type": "user_action", "source": "web", "data": {"v": NaN}}', {}, 400,
     "malformed_json"),
    ("Infinity literal", "/events", b'{"type": "user_action", "source": "web", "data": {"v": -Infinity}}', {}, 400,
     "malformed_json"),
    ("NaN in a batch item", "/events/batch", b'{"events": [{"type": "user_action", "source": "web", "data": {"v": NaN}}]}',
     {}, 400, "malformed_json"),
    ("number out of range", "/events", b'{"type": "user_action", "source": "web", "data": {"v": 1e999}}', {}, 422,
     "out of range"),
    ("wrong type: int for str", "/events", b'{"type": "user_action", "source": 5}', {}, 422, "$.source"),
    ("wrong type: array for str", "/events", b'{"type": "user_action", "source": "web", "user_id": ["a"]}', {}, 422,
     "$.user_id"),
    ("wrong type: str for object", "/events", b'{"type": "user_action", "source": "web", "data": "x"}', {}, 422,
     "$.data"),
    ("wrong type: events an object", "/events/batch", b'{"events": {"a": 1}}', {}, 422, "$.events"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_its_status_and_reason_and_kills_nothing(daemon: Daemon, case: tuple[Any, ...]) -> None:
    name, path, body, headers, status, text = case
    pids = daemon.worker_pids()
    got, hdrs, answer = daemon.request("POST", path, body, headers={"Content-Type": "application/json", **headers})
    assert got == status, (name, answer)
    assert text.encode() in answer, (name, answer)
    assert hdrs["content-type"] == "application/json"
    json.loads(answer)  # always a JSON body that says why
    # the daemon goes on, with the same workers
    assert daemon.post("/events", EVENT)[0] == 202
    assert daemon.worker_pids() == pids
    assert daemon.get("/metrics")[1]["worker_restarts"] == 0


def _raw_exchange(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request`` as is and read until the server closes (or ``timeout``)."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = s.recv(65536)
            except OSError:
                break
            if not got:
                break
            data += got
    return data


def _framing_cases() -> list[tuple[str, bytes, list[int], str]]:
    """(name, raw request, statuses in order, text in the answer) of lying framing."""
    body = json.dumps(EVENT).encode()
    head = b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    big = b'{"x": "' + b"a" * (2 << 20) + b'"}'
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 65536]), big[i:i + 65536]) for i in range(0, len(big), 65536))
    return [
        # the first 10 bytes are missing: that body is cut JSON; the rest is no request
        ("Content-Length shorter than the body", head + b"Content-Length: %d\r\n\r\n%s" % (len(body) - 10, body),
         [400, 400], "malformed_json"),
        # the server waits for bytes that never come: body_timeout, then 408
        ("Content-Length longer than the body", head + b"Content-Length: %d\r\n\r\n%s" % (len(body) + 10, body),
         [408], "body"),
        ("oversize chunked body", head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n",
         [413], "body_too_large"),
        ("chunked and Content-Length", head + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
         + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), [400], "Content-Length"),
        ("two Content-Lengths", head + b"Content-Length: 5\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
         [400], "Content-Length"),
        ("negative Content-Length", head + b"Content-Length: -5\r\n\r\n" + body, [400], "Content-Length"),
    ]


def test_lying_framing_gets_4xx_and_kills_nothing(tmp_path: Path, no_leaks: None) -> None:
    d = start_daemon(tmp_path, "[server]\nbody_timeout = 1.0\n")
    try:
        pids = d.worker_pids()
        for name, request, statuses, text in _framing_cases():
            data = _raw_exchange(d.port, request)
            got = [int(part[:3]) for part in data.split(b"HTTP/1.1 ")[1:]]
            assert got == statuses, (name, data[:500])
            assert text.encode() in data, (name, data[:500])
            assert d.post("/events", EVENT)[0] == 202, name
        assert d.worker_pids() == pids
        assert d.get("/metrics")[1]["worker_restarts"] == 0
    finally:
        assert d.stop() == 0


def test_batch_mixes_results_per_item_and_invalid_events_reach_the_deadletter_file(daemon: Daemon) -> None:
    events = [EVENT, {"type": "bogus", "source": "web"}, 7, {**EVENT, "source": "fax"}, EVENT]
    status, body = daemon.post("/events/batch", {"events": events})
    assert status == 202
    res = body["results"]
    assert [r["status"] for r in res] == ["accepted", "invalid", "invalid", "invalid", "accepted"]
    assert res[1]["path"] == "$.events[1].type" and "enum" in res[1]["reason"]
    assert res[2]["path"] == "$.events[2]" and "object" in res[2]["reason"]
    assert res[3]["path"] == "$.events[3].source"
    assert (body["accepted"], body["invalid"]) == (2, 3)
    assert len(daemon.stored()) == 2
    dl = daemon.deadletters()
    assert sorted(d["path"] for d in dl) == ["$.source", "$.type"]
    assert all(d["stage"] == "validate" for d in dl)
    m = daemon.get("/metrics")[1]
    assert (m["events_received"], m["events_processed"], m["events_failed"]) == (5, 2, 3)
    # every event invalid: still answered per item (the envelope was right)
    status, body = daemon.post("/events/batch", {"events": [{"type": "x"}]})
    assert status == 202 and (body["accepted"], body["invalid"]) == (0, 1)


def test_gzip_and_deflate_bodies_are_inflated(daemon: Daemon) -> None:
    batch = json.dumps({"events": [{**EVENT, "id": f"gz-{i}"} for i in range(50)]}).encode()
    two_members = gzip.compress(batch[:300]) + gzip.compress(batch[300:])  # as `cat a.gz b.gz`
    for enc, body in (("gzip", gzip.compress(batch)), ("gzip", two_members), ("deflate", zlib.compress(batch)),
                      ("x-gzip", gzip.compress(batch)), ("deflate", zlib.compress(batch)[2:-4])):  # raw deflate too
        status, _, answer = daemon.request("POST", "/events/batch", body,
                                           headers={"Content-Type": "application/json", "Content-Encoding": enc})
        assert status == 202, (enc, answer)
        counts = json.loads(answer)
        assert counts["accepted"] + counts["duplicates"] == 50, (enc, counts)
    assert sorted(e["id"] for e in daemon.stored()) == sorted(f"gz-{i}" for i in range(50))
    status, hdrs, _ = daemon.request("POST", "/events", b"{}", headers={"Content-Type": "application/json",
                                                                        "Content-Encoding": "zstd"})
    assert status == 415 and hdrs["accept-encoding"] == "gzip, deflate"


def test_http_garbage_wrong_method_and_unknown_path(daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 100_000 + b"\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 431")
    status, hdrs, _ = daemon.request("GET", "/events")
    assert status == 405 and hdrs["allow"] == "POST"
    assert daemon.request("GET", "/nope")[0] == 404
    assert daemon.request("GET", "/metrics")[0] == 200


def test_bearer_auth(tmp_path: Path, no_leaks: None) -> None:
    d = start_daemon(tmp_path, '[server]\nauth_tokens = ["s3cret"]\nauth_tokens_env = "TEST_TOKENS"\n',
                     env={"TEST_TOKENS": "other,second"})
    try:
        status, hdrs, _body = d.request("POST", "/events", json.dumps(EVENT))
        assert status == 401 and "bearer" in hdrs["www-authenticate"].lower()
        assert d.request("POST", "/events", json.dumps(EVENT), headers={"Authorization": "Bearer wrong"})[0] == 401
        for tok in ("s3cret", "second"):
            assert d.request("POST", "/events", json.dumps(EVENT), headers={"Authorization": f"Bearer {tok}"})[0] == 202
        assert d.request("GET", "/health")[0] == 200  # only ingest needs a token
    finally:
        assert d.stop() == 0


def test_slow_client_is_cut_off_without_hurting_others(tmp_path: Path, no_leaks: None) -> None:
    d = start_daemon(tmp_path, "[server]\nheader_timeout = 1.0\nbody_timeout = 1.0\n")
    try:
        slow = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        slow.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\n")  # and then nothing more
        slow_body = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        slow_body.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{")
        t0 = time.monotonic()
        # others are served meanwhile
        for _ in range(5):
            assert d.post("/events", EVENT)[0] == 202
        for s in (slow, slow_body):
            data = s.recv(4096)
            assert data.startswith(b"HTTP/1.1 408"), data
            assert s.recv(4096) == b""  # and the connection is closed
            s.close()
        assert time.monotonic() - t0 < 5
        _status, _hdrs, text = d.request("GET", "/metrics/prometheus")
        assert b"collector_http_slow_clients_total 2" in text
    finally:
        assert d.stop() == 0


# ------------------------------------------------------------------ load, overload, signals
async def _hammer(port: int, conns: int, seconds: float, batch: int, accepted: list[str], statuses: list[int],
                  stop: asyncio.Event | None = None, retry_after: list[str] | None = None) -> None:
    from collector.packs.generic import generate_generic

    deadline = time.monotonic() + seconds

    async def one(i: int) -> None:
        c = HttpClient("127.0.0.1", port)
        n = 0
        try:
            while time.monotonic() < deadline and not (stop and stop.is_set()):
                evs = generate_generic(batch, seed=i * 100_000 + n, with_ids=False)
                n += 1
                try:
                    status, hdrs, body = await c.request("POST", "/events/batch", json.dumps({"events": evs}).encode(),
                                                         timeout=30)
                except (OSError, asyncio.IncompleteReadError):
                    statuses.append(-1)  # connection closed (the daemon stopped listening)
                    await c.close()
                    if stop is not None and stop.is_set():
                        return
                    await asyncio.sleep(0.05)
                    continue
                statuses.append(status)
                if status == 202:
                    accepted.extend(r["id"] for r in json.loads(body)["results"] if r["status"] == "accepted")
                elif retry_after is not None and "retry-after" in hdrs:
                    retry_after.append(hdrs["retry-after"])
        finally:
            await c.close()

    await asyncio.gather(*(one(i) for i in range(conns)))


def test_sigterm_under_load_drains_every_accepted_event(tmp_path: Path, no_leaks: None) -> None:
    d = start_daemon(tmp_path, "[pipeline]\nenrich_latency = 0.02\n")
    accepted: list[str] = []
    statuses: list[int] = []

    async def scenario() -> None:
        load = asyncio.ensure_future(_hammer(d.port, 8, 10.0, 50, accepted, statuses))
        await asyncio.sleep(2.0)
        d.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(load, 40)

    asyncio.run(scenario())
    code = d.proc.wait(60)
    assert code == 0, d.log.read_text()[-3000:]
    assert len(accepted) > 100
    stored = [r["id"] for r in d.stored()]
    missing = set(accepted) - set(stored)
    assert not missing, f"{len(missing)} accepted events missing from the sink"
    assert len(stored) == len(set(stored))  # no worker died: nothing written twice
    assert 500 not in statuses
    logs = d.logs()
    assert any(r.get("event") == "stopping" for r in logs) and any(r.get("event") == "stopped" for r in logs)


def test_overload_answers_503_with_retry_after_and_memory_stays_flat(tmp_path: Path, no_leaks: None) -> None:
    # a slow user service and a small in-flight bound: the engine fills at once
    d = start_daemon(tmp_path, "[pipeline]\nenrich_latency = 0.3\ncache_ttl = 0\n[engine]\nmax_inflight = 300\n")
    try:
        proc = psutil.Process(d.proc.pid)
        accepted: list[str] = []
        statuses: list[int] = []
        retry: list[str] = []
        asyncio.run(_hammer(d.port, 16, 3.0, 50, accepted, statuses, retry_after=retry))
        rss1 = proc.memory_info().rss
        asyncio.run(_hammer(d.port, 16, 6.0, 50, accepted, statuses, retry_after=retry))
        rss2 = proc.memory_info().rss
        assert 503 in statuses and 202 in statuses
        assert set(statuses) <= {202, 503}, set(statuses)
        assert retry and all(int(r) >= 1 for r in retry)
        # twice the requests, no growth to speak of: nothing queues without bound
        assert rss2 - rss1 < 20 << 20, (rss1, rss2)
        m = d.get("/metrics")[1]
        assert m["worker_restarts"] == 0
        wait_until(lambda: d.get("/metrics")[1]["current_queue_depth"] == 0, 30, what="the queue to drain")
        stored = {r["id"] for r in d.stored()}
        assert set(accepted) <= stored
    finally:
        assert d.stop() == 0


def test_sighup_reload_under_traffic_has_zero_failed_requests(tmp_path: Path, no_leaks: None) -> None:
    # a slow, uncached lookup: the old engine takes a while to drain, and /metrics is
    # read all along
    d = start_daemon(tmp_path, "[pipeline]\nenrich_latency = 0.3\ncache_ttl = 0\n")
    try:
        before = d.worker_pids()
        accepted: list[str] = []
        statuses: list[int] = []

        seen: list[int] = []

        async def watch(load: asyncio.Future[None]) -> None:
            c = HttpClient("127.0.0.1", d.port)
            try:
                while not load.done():
                    _, _, body = await c.request("GET", "/metrics")
                    seen.append(json.loads(body)["events_processed"])
                    await asyncio.sleep(0.02)
            finally:
                await c.close()

        async def scenario() -> None:
            load = asyncio.ensure_future(_hammer(d.port, 6, 8.0, 20, accepted, statuses))
            watcher = asyncio.ensure_future(watch(load))
            await asyncio.sleep(1.5)
            # a change that needs new workers (pipeline option), and one that does not
            d.cfg.write_text("[pipeline]\nenrich_latency = 0.001\ndedup_ttl = 60\n[server]\nmax_batch_items = 50\n")
            d.proc.send_signal(signal.SIGHUP)
            await asyncio.wait_for(load, 40)
            await asyncio.wait_for(watcher, 10)

        asyncio.run(scenario())
        assert len(seen) > 20 and seen == sorted(seen), "a counter went backwards during the reload"
        assert statuses and set(statuses) == {202}, {s: statuses.count(s) for s in set(statuses)}
        logs = d.logs()
        rel = [r for r in logs if r.get("event") == "reloaded"]
        assert rel and rel[0]["engine_replaced"] is True, [r for r in logs if "reload" in r.get("msg", "")]
        after = d.worker_pids()
        assert after and not (after & before)
        # the new limit applies; counters carried over the reload
        status, _body = d.post("/events/batch", {"events": [EVENT] * 51})
        assert status == 413
        m = d.get("/metrics")[1]
        assert m["events_processed"] >= len(accepted)
        stored = {r["id"] for r in d.stored()}
        assert set(accepted) <= stored
        # a broken config on reload is refused and the daemon goes on
        d.cfg.write_text("[server]\nprot = 1\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: any(r.get("event") == "reload_failed" for r in d.logs()), 10, what="reload_failed")
        assert d.post("/events", EVENT)[0] == 202
    finally:
        assert d.stop() == 0


# ------------------------------------------------------------------ systemd notify
def test_notify_socket_gets_ready_watchdog_stopping_in_order(tmp_path: Path, no_leaks: None) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    msgs: list[str] = []

    def drain() -> None:
        while True:
            try:
                msgs.append(sock.recv(4096).decode())
            except TimeoutError:
                return

    d = start_daemon(tmp_path, "", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "600000"})
    try:
        wait_until(lambda: (drain(), sum("WATCHDOG=1" in m for m in msgs) >= 2)[1], 20, what="two WATCHDOG=1")
        ready = [i for i, m in enumerate(msgs) if "READY=1" in m]
        assert ready and "STATUS=" in msgs[ready[0]]
        first_wd = next(i for i, m in enumerate(msgs) if "WATCHDOG=1" in m)
        assert ready[0] < first_wd
        # a silent worker (stopped) stops the watchdog pings; systemd would restart us
        w = sorted(d.worker_pids())[0]
        os.kill(w, signal.SIGSTOP)
        try:
            time.sleep(3.5)  # heartbeats go stale after 2.5 s (5 x the 0.5 s interval)
            drain()  # what was sent before that
            msgs.clear()
            time.sleep(1.5)
            drain()
            assert not any("WATCHDOG=1" in m for m in msgs), msgs
        finally:
            os.kill(w, signal.SIGCONT)
        wait_until(lambda: (drain(), any("WATCHDOG=1" in m for m in msgs))[1], 10, what="WATCHDOG=1 again")
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        drain()
        assert "STOPPING=1" in msgs[-1] or any("STOPPING=1" in m for m in msgs)
    finally:
        d.stop()
        sock.close()


# ------------------------------------------------------------------ config and CLI
def _cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collector", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_check_config_names_the_path_of_a_typo(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[server]\nport = 9000\n[[sinks]]\nkind = "sqlite"\npath = "x.db"\n')
    r = _cli("check-config", str(good))
    assert r.returncode == 0 and "ok" in r.stdout and "9000" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sinks]]\nkind = "jsonl"\n[[sinks]]\nkind = "postgres"\ntabel = "x"\n')
    r = _cli("check-config", str(bad))
    assert r.returncode == 2 and "`$.sinks[1]`" in r.stderr and "tabel" in r.stderr
    worse = tmp_path / "worse.toml"
    worse.write_text("[server\n")
    r = _cli("check-config", str(worse))
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    # serve refuses a bad config with EX_CONFIG (systemd: RestartPreventExitStatus=78)
    r = _cli("serve", "--config", str(bad))
    assert r.returncode == 78 and "tabel" in r.stderr


def test_rules_from_the_config_filter_events_and_show_their_counters(tmp_path: Path, no_leaks: None) -> None:
    rules = (ROOT / "examples" / "seed003-rules.toml").read_text().replace('name = "seed003"\n', "")
    bad = tmp_path / "bad.toml"
    bad.write_text(rules.replace("regex = ", "regexp = "))
    r = _cli("check-config", str(bad))
    assert r.returncode == 2 and "`$.rules[0].when.regexp`: unknown operator 'regexp'" in r.stderr, r.stderr
    good = tmp_path / "good.toml"
    good.write_text(rules)
    r = _cli("check-config", str(good))
    assert r.returncode == 0 and "rules rules: bot-user-agents (block)" in r.stdout, r.stdout + r.stderr
    d = start_daemon(tmp_path, "[pipeline]\nenrich_latency = 0.001\n" + rules)
    try:
        bot = {"type": "user_action", "source": "web", "data": {"user_agent": "Googlebot/2.1"}}
        status, body = d.post("/events", bot)
        assert status == 200 and body["status"] == "filtered" and "bot-user-agents" in body["reason"]
        status, body = d.post("/events/batch", {"events": [bot, {**bot, "data": {"user_type": "premium"}}]})
        assert status == 202 and body["filtered"] == 1 and body["accepted"] == 1
        assert [x["status"] for x in body["results"]] == ["filtered", "accepted"]

        def counters() -> Any:
            return d.get("/processor/filters")[1]["filters"]["rules"]

        # Each worker publishes its counters on its own clock: wait for the whole expected
        # picture, not for one worker's part of it.
        def settled() -> bool:
            c = counters()
            return bool(c["bot-user-agents"]["blocked"] == 2 and c["bot-user-agents"]["evaluated"] == 3
                        and c["high-value-users"]["transformed"] == 1)

        wait_until(settled, 10, what="the rule counters")
        c = counters()
        assert c["bot-user-agents"]["evaluated"] == 3 and c["high-value-users"]["transformed"] == 1
        stored = wait_until(d.stored, 10, what="the stored event")
        assert [e["data"] for e in stored] == [{"user_type": "premium", "route": "high_value"}]
    finally:
        assert d.stop() == 0


def test_readme_configuration_table_is_generated_from_the_structs() -> None:
    from collector.config import options_table

    readme = (ROOT / "docs" / "daemon.md").read_text()
    assert options_table() in readme, "README's daemon options table is stale: paste collector.config.options_table()"


def test_openapi_document_describes_the_validating_structs(daemon: Daemon) -> None:
    status, doc = daemon.get("/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    ev = doc["components"]["schemas"]["GenericEvent"]
    assert sorted(ev["properties"]["type"]["enum"]) == ["sensor_data", "system_log", "user_action"]
    assert set(ev["required"]) == {"type", "source"}
    assert doc["components"]["schemas"]["EventBatch"]["properties"]["events"]["maxItems"] == 100
    assert {"/events", "/events/batch", "/metrics", "/health", "/ready", "/ingress"} <= set(doc["paths"])
    ing = doc["components"]["schemas"]["IngressStatus"]
    assert {"connected", "stream", "durable", "acked", "nakked", "terminated", "messages_inflight", "num_pending",
            "num_ack_pending", "last_error"} <= set(ing["properties"])
    assert daemon.get("/ingress")[0] == 404  # no [source]


def test_schemathesis_against_the_running_server(daemon: Daemon, tmp_path: Path) -> None:
    st = Path(sys.executable).with_name("schemathesis")
    if not st.exists():
        pytest.skip("schemathesis is not installed (it is in the test extra)")
    pids = daemon.worker_pids()
    # the issue fixes 413 for too many items (decided before the items are validated)
    conf = tmp_path / "schemathesis.toml"
    conf.write_text('[checks.negative_data_rejection]\nexpected-statuses = ["400", "413", "415", "422"]\n')
    r = subprocess.run(
        [str(st), "--config-file", str(conf), "run", f"http://127.0.0.1:{daemon.port}/openapi.json", "--checks", "all",
         "--max-examples", "20", "--seed", "1", "--max-time", "40", "--request-timeout", "10",
         "--report-dir", str(tmp_path / "st")],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-6000:]
    assert daemon.worker_pids() == pids


def test_demo_runs_the_daemon_and_stops_it_cleanly(tmp_path: Path, no_leaks: None) -> None:
    r = _cli("demo", "--duration", "2", "--connections", "4", "--data-dir", str(tmp_path / "d"), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "events accepted" in r.stderr and "exit code 0" in r.stderr
    m = json.loads(r.stdout)
    assert m["events_processed"] > 0 and m["current_queue_depth"] == 0
    files = list((tmp_path / "d").glob("events-*.jsonl"))
    assert files and sum(len(f.read_text().splitlines()) for f in files) == m["events_processed"]


def test_shipped_config_and_unit_file() -> None:
    root = ROOT
    r = _cli("check-config", str(root / "packaging" / "collector.toml"))
    assert r.returncode == 0, r.stderr
    unit = (root / "packaging" / "systemd" / "collector.service").read_text()
    keys = {ln.split("=", 1)[0]: ln.split("=", 1)[1] for ln in unit.splitlines() if "=" in ln and not ln.startswith("#")}
    assert keys["Type"] == "notify" and keys["Restart"] == "on-failure" and keys["OOMPolicy"] == "continue"
    assert keys["KillMode"] == "mixed" and keys["RestartPreventExitStatus"] == "78"
    for k in ("WatchdogSec", "DynamicUser", "StateDirectory", "ProtectSystem", "NoNewPrivileges", "PrivateTmp", "MemoryMax"):
        assert k in keys, k
    analyze = "/usr/bin/systemd-analyze"
    if os.path.exists(analyze):  # only the ExecStart binary may be missing on a build machine
        out = subprocess.run([analyze, "verify", str(root / "packaging" / "systemd" / "collector.service")],
                             capture_output=True, text=True, timeout=60)
        problems = [ln for ln in (out.stdout + out.stderr).splitlines()
                    if ln.strip() and "is not executable" not in ln and "No such file" not in ln]
        assert not problems, problems


# the kernel's MemoryDenyWriteExecute (PR_SET_MDWE, Linux 6.3+), inherited by the
# workers, then exec the daemon: what the unit's MemoryDenyWriteExecute=yes asks
_MDWE_EXEC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    "    sys.exit(99)\n"
    "os.umask(0o077)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def test_the_unit_is_hardened_to_an_exposure_of_2_or_less_and_the_daemon_runs_so(
    tmp_path: Path, no_leaks: None
) -> None:
    unit = ROOT / "packaging" / "systemd" / "collector.service"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    out = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r"Overall exposure level for collector\.service: ([0-9.]+)", out.stdout)
    assert found, out.stdout[-2000:] + out.stderr[-2000:]
    assert float(found.group(1)) <= 2.0, out.stdout
    # the settings a process can check without systemd: no W^X memory, umask 077
    text = unit.read_text()
    assert "MemoryDenyWriteExecute=yes" in text and "UMask=0077" in text
    probe = subprocess.run([sys.executable, "-c", _MDWE_EXEC, sys.executable, "-c", "pass"], timeout=60)
    if probe.returncode == 99:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+): MemoryDenyWriteExecute not checked")
    d = start_daemon(tmp_path, "[pipeline]\nenrich_latency = 0.001\n", wrap=[sys.executable, "-c", _MDWE_EXEC])
    try:
        status, body = d.post("/events/batch", {"events": [{**EVENT, "id": f"mdwe-{i}"} for i in range(20)]})
        assert status == 202 and body["accepted"] == 20, body
        assert sorted(r["id"] for r in d.stored()) == sorted(f"mdwe-{i}" for i in range(20))
        assert d.get("/metrics")[1]["worker_restarts"] == 0
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]


def test_ready_reports_an_unreachable_sink_while_health_stays_ok(tmp_path: Path, no_leaks: None) -> None:
    cfg = ('[log]\nstats_interval = 0.5\n[[sinks]]\nkind = "jsonl"\nname = "events"\n'
           '[[sinks]]\nkind = "postgres"\nname = "pg"\ndsn = "postgresql://postgres@127.0.0.1:1/test"\n')
    d = start_daemon(tmp_path, cfg, ready=False)
    try:
        status, h = d.get("/ready")
        assert status == 503 and h["sinks"] == {"events": True, "pg": False, "deadletter": True}
        assert "pg" in h["detail"]
        assert d.get("/health")[0] == 200
        wait_until(lambda: any(r.get("event") == "stats" for r in d.logs()), 10, what="a stats log line")
        line = next(r for r in d.logs() if r.get("event") == "stats")
        assert {"events_received", "events_processed", "current_queue_depth"} <= set(line)
    finally:
        assert d.stop() == 0


def test_an_event_postgres_refuses_is_answered_deadlettered_not_accepted(
    tmp_path: Path, no_leaks: None, pg_dsn: str
) -> None:
    """A NUL character in ``data`` (JSONB cannot hold U+0000): that item is answered
    ``deadlettered`` naming the sink and the reason, the others ``accepted``; the
    dead-letter file holds it, ``/metrics`` counts it, and ``POST /events`` answers 422."""
    from test_sinks import PostgresStore

    pg = PostgresStore(pg_dsn)
    cfg = ('[pipeline]\nenrich_latency = 0.001\n'
           f'[[sinks]]\nkind = "postgres"\nname = "pg"\ndsn = "{pg.dsn}"\ntable = "{pg.table}"\n')
    d = start_daemon(tmp_path, cfg, workers=1)
    try:
        nul = {**EVENT, "data": {"note": "a\u0000b"}}
        events = [{**EVENT, "id": "dl-0"}, {**nul, "id": "dl-1"}, {**EVENT, "id": "dl-2"}]
        status, body = d.post("/events/batch", {"events": events}, timeout=30)
        assert status == 202, body
        got = {r["id"]: r for r in body["results"]}
        assert got["dl-0"]["status"] == got["dl-2"]["status"] == "accepted"
        bad = got["dl-1"]
        assert bad["status"] == "deadlettered" and bad["path"] == "$.events[1]"
        assert bad["reason"].startswith("sink pg: refused this event") and "0000" in bad["reason"], bad
        assert (body["accepted"], body["deadlettered"], body["failed"], body["duplicates"]) == (2, 1, 0, 0)
        stored = sorted(r[0] for r in pg._run(f'SELECT id FROM "{pg.table}"'))
        assert stored == ["dl-0", "dl-2"]
        held = [json.loads(r["payload"])["id"] for r in d.deadletters()]
        assert held == ["dl-1"]
        assert d.deadletters()[0]["stage"] == "sink:pg"

        # not remembered by dedup: the same event again is refused again, not a duplicate
        status, one = d.post("/events", {**nul, "id": "dl-1"}, timeout=30)
        assert status == 422 and one["status"] == "deadlettered" and one["id"] == "dl-1", one
        assert one["reason"].startswith("sink pg: refused this event"), one
        assert [json.loads(r["payload"])["id"] for r in d.deadletters()] == ["dl-1", "dl-1"]

        # metrics have no cache in front: the JSON and the Prometheus text both count them
        assert d.get("/metrics")[1]["deadlettered"] == 2
        status, _, text = d.request("GET", "/metrics", headers={"Accept": "text/plain"})
        assert status == 200 and re.search(rb"^collector_deadlettered_total 2(\.0)?$", text, re.M), text[-2000:]
    finally:
        code = d.stop()
        pg.cleanup()
    assert code == 0, d.log.read_text()[-3000:]


def test_another_pack_keeps_its_ids_and_is_sharded_by_its_own_key(tmp_path: Path, no_leaks: None) -> None:
    d = start_daemon(tmp_path, '[pipeline]\npack = "collector.playback:playback_pipeline"\n')
    try:
        events = [{"id": i, "user_id": f"u{i % 17}", "video_id": "v", "start_at": 0, "stop_at": 10,
                   "bitrate_kbps": 3000, "device_type": "tv"} for i in range(200)]
        status, body = d.post("/events/batch", {"events": events[:100]})
        assert status == 202 and body["accepted"] == 100
        assert [r["id"] for r in body["results"]] == list(range(100))  # int ids as sent
        for e in events[100:]:
            assert d.post("/events", e) == (202, {"status": "accepted", "id": e["id"]})
        status, body = d.post("/events", {"user_id": "u1"})  # playback ids are ints: none generated
        assert status == 422 and "id" in body["reason"] + body["path"]
        doc = d.get("/openapi.json")[1]  # the document describes this pack's event
        assert "PlaybackEvent" in doc["components"]["schemas"] and "GenericEvent" not in doc["components"]["schemas"]
        files = sorted(d.data.glob("events-*.jsonl"))
        users = [{json.loads(ln)["user_id"] for ln in f.read_text().splitlines()} for f in files]
        assert sum(len(f.read_text().splitlines()) for f in files) == 200
        assert len(users) == 2 and not (users[0] & users[1])  # each user on one worker only
    finally:
        assert d.stop() == 0


def test_ids_are_generated_under_the_packs_own_id_field(tmp_path: Path, no_leaks: None) -> None:
    tests_dir = str(SUPPORT)
    d = start_daemon(tmp_path, '[pipeline]\npack = "sink_helpers:reading_pipeline"\n',
                     env={"PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))})
    try:
        readings = [{"sensor": f"s{i}", "value": i / 2} for i in range(20)]
        status, body = d.post("/events/batch", {"events": [*readings[:10], {"value": 1.0}, {}, {"reading_id": "mine", **readings[10]}]})
        assert status == 202 and (body["accepted"], body["invalid"]) == (11, 2), body
        status, one = d.post("/events", readings[11])
        assert status == 202, one
        stored = {e["reading_id"]: e for f in sorted(d.data.glob("events-*.jsonl"))
                  for e in map(json.loads, f.read_text().splitlines())}
        made = [r["id"] for r in body["results"][:10]] + [one["id"]]
        assert all(len(i) == 36 for i in made) and sorted(stored) == sorted([*made, "mine"])
        assert all("id" not in e for e in stored.values())  # under the pack's field, not a stray "id"
        bad = body["results"][10:12]
        assert [r["path"] for r in bad] == ["$.events[10]", "$.events[11]"] and all("sensor" in r["reason"] for r in bad)
    finally:
        assert d.stop() == 0


def test_a_worker_killed_under_load_is_replaced_named_in_one_log_line_and_loses_nothing(
    tmp_path: Path, no_leaks: None
) -> None:
    d = start_daemon(tmp_path, "[pipeline]\nenrich_latency = 0.002\n")
    try:
        victim = sorted(d.worker_pids())[0]
        accepted: list[str] = []
        statuses: list[int] = []

        async def scenario() -> None:
            load = asyncio.ensure_future(_hammer(d.port, 6, 5.0, 50, accepted, statuses))
            await asyncio.sleep(1.5)
            os.kill(victim, signal.SIGKILL)
            await asyncio.wait_for(load, 40)

        asyncio.run(scenario())
        assert set(statuses) == {202}, {s: statuses.count(s) for s in set(statuses)}
        wait_until(lambda: d.get("/metrics")[1]["current_queue_depth"] == 0, 30, what="the queue to drain")
        stored = [r["id"] for r in d.stored()]
        assert set(accepted) <= set(stored)  # redelivered chunks may repeat in an append-only file
        m = d.get("/metrics")[1]
        assert m["worker_restarts"] == 1 and m["active_workers"] == 2
        deaths = [r for r in d.logs() if r.get("event") == "worker_died"]
        assert len(deaths) == 1 and "SIGKILL" in deaths[0]["cause"] and deaths[0]["pid"] == victim
        assert victim not in d.worker_pids()
    finally:
        assert d.stop() == 0


def test_connections_are_bounded(tmp_path: Path, no_leaks: None) -> None:
    d = start_daemon(tmp_path, "[server]\nmax_connections = 3\n")
    try:
        idle = [socket.create_connection(("127.0.0.1", d.port), timeout=10) for _ in range(3)]
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as extra:
            data = extra.recv(4096)
            assert data.startswith(b"HTTP/1.1 503") and b"Retry-After" in data
            assert extra.recv(4096) == b""  # closed
        for s in idle:
            s.close()
        wait_until(lambda: _ready(d), 10, what="room for a new connection")
        assert d.post("/events", EVENT)[0] == 202
    finally:
        assert d.stop() == 0


def test_pipelined_requests_are_answered_in_order(daemon: Daemon) -> None:
    one = json.dumps({**EVENT, "id": "p-1"}).encode()
    two = json.dumps({"events": [{**EVENT, "id": "p-2"}]}).encode()
    bad = b"{nope"
    reqs = b"".join(
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
        % (path, len(body), extra, body)
        for path, body, extra in [(b"/events", one, b""), (b"/events/batch", two, b"Expect: 100-continue\r\n"),
                                  (b"/events", bad, b"")]
    ) + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(reqs)
        data = b""
        deadline = time.monotonic() + 10
        while data.count(b"HTTP/1.1 ") < 4 and time.monotonic() < deadline:
            data += s.recv(65536)
    statuses = [int(part[:3]) for part in data.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [202, 202, 400, 200], data[:2000]
