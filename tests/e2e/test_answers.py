"""Answers that mean what they say (a real daemon, real sockets, real files).

* A body over ``max_body_bytes`` sent without ``Expect: 100-continue`` by a plain
  client gets its 413 (a lingering close), not ``Connection reset by peer``.
* Duplicate keys in an event object: the last one wins, as in JavaScript's
  ``JSON.parse`` and Python's ``json``; the id answered is the id stored.
* Integers beyond 64 bits in free-form ``data`` are stored exactly.
"""

from __future__ import annotations

import json
import socket

from test_daemon import EVENT, Daemon, daemon  # noqa: F401  (daemon is a fixture)


def test_an_oversized_body_without_expect_gets_its_413_not_a_reset(daemon: Daemon) -> None:  # noqa: F811
    body = b'{"type": "user_action", "source": "web", "data": {"x": "' + b"a" * (64 << 20) + b'"}}'
    head = (
        f"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as s:
        s.sendall(head)
        view = memoryview(body)
        try:
            for i in range(0, len(body), 1 << 20):  # a plain client: sends it all, then reads
                s.sendall(view[i : i + (1 << 20)])
        except (BrokenPipeError, ConnectionResetError) as e:
            raise AssertionError(f"the server reset the connection while the client was sending: {e!r}") from e
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Content Too Large", answer[:300]
    assert b"Connection: close" in rest and b"max_body_bytes" in rest
    assert daemon.post("/events", EVENT)[0] == 202  # and the daemon goes on


def test_duplicate_keys_last_wins_and_big_integers_are_stored_exactly(daemon: Daemon) -> None:  # noqa: F811
    big = 2**70 + 3
    raw = (
        '{"id": "dup-first", "type": "user_action", "source": "web", "id": "dup-last", '
        f'"data": {{"big": {big}, "neg": -{big}, "k": 1, "k": 2}}}}'
    )
    status, _, body = daemon.request("POST", "/events", raw)
    assert status == 202, body
    assert json.loads(body)["id"] == "dup-last"
    assert daemon.post("/events", {**EVENT, "id": "dup-last"}) == (200, {"status": "duplicate", "id": "dup-last"})
    stored = [r for r in daemon.stored() if r["id"].startswith("dup-")]
    assert [r["id"] for r in stored] == ["dup-last"]
    assert stored[0]["data"] == {"big": big, "neg": -big, "k": 2}  # exact: Python's json reads big ints
