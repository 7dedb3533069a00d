"""The daemon's benchmark peer (``collector.benchmarks.asgi_peer``): uvicorn with 2 workers
stores exactly the events it answered ``accepted``, once each, and answers bad input
the way the daemon does. Real processes (uvicorn and its workers), loopback only."""

from __future__ import annotations

import http.client
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from collector.benchmarks.asgi_peer import PeerServer, stored_events, uvicorn_missing
from collector.generic import generate_generic

pytestmark = pytest.mark.skipif(uvicorn_missing() is not None, reason=str(uvicorn_missing()))

CONNECTIONS, BATCHES, PER_BATCH = 4, 10, 50


def _post(port: int, body: bytes, conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, Any]]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("POST", "/events/batch", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        if conn is None:
            c.close()


def _client(port: int, k: int) -> list[dict[str, Any]]:
    """One keep-alive connection sending BATCHES batches; the answers."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        out = []
        for b in range(BATCHES):
            events = generate_generic(PER_BATCH, seed=k * 1000 + b)
            status, answer = _post(port, json.dumps({"events": events}).encode(), c)
            assert status == 202, answer
            out.append(answer)
        return out
    finally:
        c.close()


def test_peer_stores_exactly_the_events_sent(tmp_path: Path) -> None:
    with PeerServer(str(tmp_path), workers=2) as peer:
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            answers = [a for part in pool.map(lambda k: _client(peer.port, k), range(CONNECTIONS)) for a in part]
        sent = [e for k in range(CONNECTIONS) for b in range(BATCHES) for e in generate_generic(PER_BATCH, seed=k * 1000 + b)]
        # an event without id gets one (its answer names it); one bad item is answered, not stored
        status, mixed = _post(peer.port, json.dumps({"events": [
            {"type": "sensor_data", "source": "iot_device", "data": {"t": 1}},
            {"type": "bogus", "source": "web"},
        ]}).encode())
        bad_json = _post(peer.port, b'{"events": [')
        bad_envelope = _post(peer.port, b'{"evnts": []}')
    assert peer.proc is not None and peer.proc.returncode == 0, peer.log_tail()

    assert sum(a["accepted"] for a in answers) == len(sent) == CONNECTIONS * BATCHES * PER_BATCH
    assert all(a["invalid"] == 0 and [r["status"] for r in a["results"]] == ["accepted"] * PER_BATCH for a in answers)
    assert status == 202 and (mixed["accepted"], mixed["invalid"]) == (1, 1)
    new_id = mixed["results"][0]["id"]
    assert mixed["results"][1] == {"index": 1, "status": "invalid", "path": "$.events[1].type",
                                   "reason": "Invalid enum value 'bogus'"}
    assert bad_json[0] == 400 and bad_json[1]["error"] == "malformed JSON"
    assert bad_envelope[0] == 422 and "evnts" in bad_envelope[1]["detail"]

    stored = stored_events(str(tmp_path))
    counts = Counter(e["id"] for e in stored)
    assert counts == Counter([e["id"] for e in sent] + [new_id])  # every accepted event once, nothing else
    by_id = {e["id"]: e for e in stored}
    for e in sent:  # stored as sent, with the receipt time stamped
        got = by_id[e["id"]]
        assert {k: got[k] for k in e} == e and got["timestamp"].endswith("Z")
