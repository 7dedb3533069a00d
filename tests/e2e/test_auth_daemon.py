"""The auth stage in a daemon started as users start it: ``[[stages]] kind = "auth"``.

``POST /events`` with a refused token is answered 401 with the reason; in
``POST /events/batch`` such an item's status is ``unauthorized`` and counted; accepted
events are stored with their user id and without their token.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import wait_until
from paths import SUPPORT
from test_daemon import start_daemon

from collector.sources.auth import AuthService

pytest.importorskip("jwt")

KEY = "daemon-test-key-" + "0123456789abcdef" * 2


def test_a_refused_token_is_answered_401_and_not_stored(tmp_path: Path, no_leaks: None) -> None:
    svc = AuthService(KEY)
    with svc.running():
        good, _ = svc.issue("user-42")
        bad = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")  # signature broken
        config = (f'[pipeline]\npack = "auth_support:click_pipeline"\n\n[[stages]]\nkind = "auth"\n'
                  f'service_url = "{svc.verify_url}"\njwt_key_env = "COLLECTOR_TEST_AUTH_KEY"\n')
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(SUPPORT), os.environ.get("PYTHONPATH")])),
               "COLLECTOR_TEST_AUTH_KEY": KEY}
        d = start_daemon(tmp_path, config, env=env)
        try:
            status, body = d.post("/events", {"event": "element_click", "token": bad})
            assert status == 401 and body["status"] == "unauthorized" and body["path"] == "$.token", body
            assert "token rejected by the auth service" in body["reason"]
            status, body = d.post("/events", {"event": "element_click", "id": "ok-1", "token": good})
            assert (status, body) == (202, {"status": "accepted", "id": "ok-1"})
            status, body = d.post("/events/batch", {"events": [
                {"event": "page_view_start", "id": "b1", "token": good},
                {"event": "page_view_start", "id": "b2", "token": bad},
                {"event": "page_view_start", "id": "b3", "token": None},
            ]})
            assert status == 202 and (body["accepted"], body["unauthorized"], body["failed"]) == (2, 1, 0), body
            assert [r["status"] for r in body["results"]] == ["accepted", "unauthorized", "accepted"]
            assert body["results"][1]["path"] == "$.events[1].token"
            # the fallback: fresh tokens (no worker has them cached), the signature checked locally
            good2, _ = svc.issue("user-42", ttl=60)
            bad2 = good2[:-4] + ("AAAA" if not good2.endswith("AAAA") else "BBBB")
            svc.down = True
            status, body = d.post("/events", {"event": "element_click", "id": "ok-2", "token": good2})
            assert status == 202, body
            status, body = d.post("/events", {"event": "element_click", "token": bad2})
            assert status == 401 and "checked locally" in body["reason"], body
            stored = wait_until(lambda: len(d.stored()) == 4 and d.stored(), 10, what="the stored events")
            assert sorted((e["id"], e["user_id"]) for e in stored) == [
                ("b1", "user-42"), ("b3", "anonymous"), ("ok-1", "user-42"), ("ok-2", "user-42")]
            assert all("token" not in e for e in stored)
            # each worker publishes its counters on its own 0.25 s beat: wait for all of them
            counters = wait_until(lambda: (c := d.get("/aggregates")[1].get("auth")) and c["rejected"] == 3
                                  and c["jwt_fallback"] == 1 and c["anonymous"] == 1 and c, 10,
                                  what="the auth counters in /aggregates")
            assert counters["anonymous"] == 1 and counters["jwt_fallback"] == 1
        finally:
            assert d.stop() == 0, d.log.read_text()[-3000:]
