"""The auth stage against the real built-in auth service (HTTP) and a real Redis.

The runtime is driven on its own (one chunk at a time, as a worker calls it), then
inside a real ``Collector``: user ids are filled, refused tokens come back per item as
``unauthorized``, and the per-outcome counters are summed over the workers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from auth_support import Click, click_pipeline, run, run_stage
from conftest import wait_until
from source_servers import free_port

from collector import Collector
from collector.errors import ConfigError
from collector.sources.auth import AuthService
from collector.stages import build_stage
from collector.stages.auth import TokenAuth, token_key

jwt = pytest.importorskip("jwt")

KEY = "test-signing-key-" + "0123456789abcdef" * 3  # 64 bytes: long enough for HS512


@pytest.fixture
def svc() -> Iterator[AuthService]:
    s = AuthService(KEY)
    with s.running():
        yield s


def clicks(*tokens: str | None) -> list[Click]:
    return [Click(event="element_click", id=str(i), token=t) for i, t in enumerate(tokens)]


def stage(svc: AuthService, **kw: Any) -> TokenAuth:
    return TokenAuth(**{"service_url": svc.verify_url, "jwt_key": KEY, "timeout": 1.0, **kw})


def resolve(spec: TokenAuth, *chunks: list[Click]) -> tuple[list[list[Any]], dict[str, int]]:
    """Each chunk through one runtime in turn; the drops of each and the counters."""
    async def go() -> tuple[list[list[Any]], dict[str, int]]:
        rt = spec.build()
        try:
            return [await run_stage(rt, c) for c in chunks], rt.stats()
        finally:
            await rt.aclose()
    return run(go())  # type: ignore[no-any-return]


# ------------------------------------------------------------------ the built-in service's API
def _http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def test_the_service_issues_and_verifies_tokens_over_http(svc: AuthService) -> None:
    status, doc = _http("POST", f"{svc.url}/tokens", {"user_id": "u-http", "ttl": 60})
    assert status == 200 and doc["expires_at"] > time.time() + 50
    tok = doc["token"]
    assert jwt.get_unverified_header(tok)["alg"] == "HS256"
    assert jwt.decode(tok, KEY, algorithms=["HS256"])["sub"] == "u-http"
    status, doc = _http("GET", svc.verify_url, headers={"Authorization": f"Bearer {tok}"})
    assert status == 200 and doc["user_id"] == "u-http" and doc["expires_at"] > time.time()
    assert _http("GET", f"{svc.verify_url}?token={tok}")[1]["user_id"] == "u-http"
    old, _ = svc.issue("u-old", ttl=-5)
    assert _http("GET", f"{svc.verify_url}?token={old}") == (401, {"reason": "token expired"})
    status, doc = _http("GET", f"{svc.verify_url}?token=garbage")
    assert status == 401 and doc["reason"].startswith("invalid token")
    assert _http("GET", svc.verify_url)[0] == 401
    assert _http("POST", f"{svc.url}/tokens", {"ttl": 5})[0] == 400
    assert _http("GET", f"{svc.url}/nope")[0] == 404
    svc.down = True
    assert _http("GET", f"{svc.verify_url}?token={tok}")[0] == 503
    assert svc.calls == 6


# ------------------------------------------------------------------ the service path
def test_a_valid_token_becomes_its_user_id_and_is_removed(svc: AuthService) -> None:
    tok, _ = svc.issue("user-1")
    events = clicks(tok, None)
    (drops,), stats = resolve(stage(svc), events)
    assert drops == []
    assert (events[0].user_id, events[0].token) == ("user-1", None)
    assert (events[1].user_id, events[1].token) == ("anonymous", None)
    assert stats["service"] == 1 and stats["anonymous"] == 1 and svc.calls == 1
    assert b"token" not in msgspec.json.encode(events[0])  # the pack's Struct omits it on output


def test_repeated_tokens_cost_one_call_each_and_the_next_chunk_none(svc: AuthService) -> None:
    a, _ = svc.issue("ua")
    b, _ = svc.issue("ub")
    first = clicks(*([a, b] * 50))
    second = clicks(a, b, a)
    (d1, d2), stats = resolve(stage(svc), first, second)
    assert d1 == d2 == [] and svc.calls == 2
    assert [e.user_id for e in first[:4]] == ["ua", "ub", "ua", "ub"]
    assert stats["service"] == 100 and stats["cache_local"] == 3 and stats["service_calls"] == 2


def test_concurrent_chunks_share_one_lookup(svc: AuthService) -> None:
    tok, _ = svc.issue("u-shared")
    svc.delay = 0.3

    async def go() -> tuple[list[Any], dict[str, int]]:
        rt = stage(svc).build()
        try:
            chunks = [clicks(tok, None), clicks(tok), clicks(tok, tok)]
            drops = await asyncio.gather(*(run_stage(rt, c) for c in chunks))
            assert all(e.user_id in ("u-shared", "anonymous") for c in chunks for e in c)
            return drops, rt.stats()
        finally:
            await rt.aclose()

    drops, stats = run(go())
    assert drops == [[], [], []] and svc.calls == 1 and stats["coalesced"] == 2


def test_the_service_says_invalid_so_the_token_is_refused_without_fallback(svc: AuthService) -> None:
    revoked, _ = svc.issue("u-revoked")
    svc.revoke(revoked)  # well signed: only the service knows it is revoked
    expired, _ = svc.issue("u-old", ttl=-60)
    garbage = "not-a-jwt"
    events = clicks(revoked, expired, garbage, revoked)
    (drops,), stats = resolve(stage(svc), events)
    assert [(d.pos, d.path, d.kind) for d in drops] == [(i, "$.token", "unauthorized") for i in range(4)]
    assert "token revoked" in drops[0].reason and "token expired" in drops[1].reason
    assert all("auth service" in d.reason for d in drops)
    assert stats["rejected"] == 4 and stats["jwt_fallback"] == 0 and svc.calls == 3
    assert all(e.user_id == "" for e in events)


def test_malformed_tokens_are_refused_before_any_call(svc: AuthService) -> None:
    (drops,), _ = resolve(stage(svc), clicks("", "has space", "x" * 9000, "line\nbreak"))
    assert [d.kind for d in drops] == ["unauthorized"] * 4 and svc.calls == 0
    assert drops[0].reason == "empty token" and "malformed token" in drops[1].reason


# ------------------------------------------------------------------ the fallback
def test_service_down_checks_tokens_locally_signature_yes_expiry_no(svc: AuthService) -> None:
    good, _ = svc.issue("u-good")
    expired, _ = svc.issue("u-expired", ttl=-3600)
    forged = jwt.encode({"sub": "u-forged", "exp": int(time.time()) + 600}, "another-key-" + "0123456789abcdef" * 3,
                        algorithm="HS256")
    unsigned = jwt.encode({"sub": "u-none", "exp": int(time.time()) + 600}, None, algorithm="none")
    hs512 = jwt.encode({"sub": "u-512"}, KEY, algorithm="HS512")  # well signed, algorithm not in the list
    svc.down = True
    events = clicks(good, expired, forged, unsigned, hs512)
    (drops,), stats = resolve(stage(svc, retries=0), events)
    assert [e.user_id for e in events[:2]] == ["u-good", "u-expired"]
    assert events[0].token is None and events[1].token is None
    assert [(d.pos, d.kind) for d in drops] == [(2, "unauthorized"), (3, "unauthorized"), (4, "unauthorized")]
    assert "Signature verification failed" in drops[0].reason
    assert "not allowed" in drops[1].reason and "not allowed" in drops[2].reason
    assert all("checked locally" in d.reason for d in drops)
    assert stats["jwt_fallback"] == 2 and stats["rejected"] == 3 and stats["service_failures"] >= 1


@pytest.mark.parametrize("fault", ["down", "slow", "refused"])
def test_every_kind_of_outage_falls_back(svc: AuthService, fault: str) -> None:
    tok, _ = svc.issue("u-1")
    kw: dict[str, Any] = {"retries": 0, "timeout": 0.3}
    if fault == "down":
        svc.down = True
    elif fault == "slow":
        svc.delay = 1.0
    else:
        kw["service_url"] = f"http://127.0.0.1:{free_port()}/verify"
    events = clicks(tok)
    (drops,), stats = resolve(stage(svc, **kw), events)
    assert drops == [] and events[0].user_id == "u-1" and stats["jwt_fallback"] == 1


def test_the_breaker_stops_calling_a_failing_service(svc: AuthService) -> None:
    toks = [svc.issue(f"u{i}")[0] for i in range(6)]
    svc.down = True
    spec = stage(svc, retries=0, breaker_failures=2, breaker_reset=60)
    chunks = [clicks(t) for t in toks]
    drops, stats = resolve(spec, *chunks)
    assert all(d == [] for d in drops) and stats["jwt_fallback"] == 6
    assert svc.calls == 2 and stats["breaker_open"] == 4


def test_service_down_and_no_key_fails_with_retry(svc: AuthService) -> None:
    tok, _ = svc.issue("u-1")
    svc.down = True
    (drops,), stats = resolve(TokenAuth(service_url=svc.verify_url, retries=0), clicks(tok, None))
    assert [(d.pos, d.kind) for d in drops] == [(0, "retry")] and "retry later" in drops[0].reason
    assert stats["unavailable"] == 1 and stats["anonymous"] == 1


# ------------------------------------------------------------------ Redis, the shared level
def test_redis_shares_answers_between_workers_under_hashed_keys(svc: AuthService, redis_url: str) -> None:
    import redis

    prefix = f"collector:test:auth:{uuid.uuid4().hex}:"
    tok, _ = svc.issue("u-redis", ttl=120)
    spec = stage(svc, redis_url=redis_url, redis_prefix=prefix, cache_max_ttl=3600)
    r = redis.Redis.from_url(redis_url)
    try:
        ev1, ev2 = clicks(tok, tok), clicks(tok)
        (d1,), s1 = resolve(spec, ev1)  # worker 1: the service, then both levels
        (d2,), s2 = resolve(spec, ev2)  # worker 2 (a fresh runtime): Redis
        assert d1 == d2 == [] and svc.calls == 1
        assert s1["service"] == 2 and s2["cache_redis"] == 1 and s2["service_calls"] == 0
        assert ev2[0].user_id == "u-redis"
        keys = r.keys(prefix + "*")
        assert len(keys) == 1 and token_key(tok).encode() in keys[0] and tok.encode() not in keys[0]
        assert 100 < r.ttl(keys[0]) <= 120  # the token's own expiry, under the cap
        # capped by cache_max_ttl
        tok2, _ = svc.issue("u-cap", ttl=7200)
        resolve(stage(svc, redis_url=redis_url, redis_prefix=prefix, cache_max_ttl=30), clicks(tok2))
        assert 0 < r.ttl(prefix + f'tokens:"{token_key(tok2)}"') <= 30
    finally:
        for k in r.keys(prefix + "*"):
            r.delete(k)
        r.close()


def test_redis_down_is_not_an_outage_of_the_stage(svc: AuthService) -> None:
    tok, _ = svc.issue("u-1")
    events = clicks(tok)
    (drops,), stats = resolve(stage(svc, redis_url=f"redis://127.0.0.1:{free_port()}/0"), events)
    assert drops == [] and events[0].user_id == "u-1" and stats["service"] == 1 and stats["redis_errors"] >= 1


# ------------------------------------------------------------------ configuration
def test_configuration_is_checked() -> None:
    ok = build_stage({"kind": "auth", "service_url": "http://127.0.0.1:1/verify", "algorithms": ["HS256", "HS512"]})
    assert isinstance(ok, TokenAuth) and ok.algorithms == ("HS256", "HS512")
    for algs, why in ((["none"], "never accepted"), (["HS256", "RS256"], "mix key families"),
                      (["XS1"], "unknown JWT algorithm"), ([], "at least one")):
        with pytest.raises(ConfigError, match=why):
            build_stage({"kind": "auth", "service_url": "http://x/verify", "algorithms": algs})
    with pytest.raises(ConfigError, match="service_url, or jwt_key"):
        build_stage({"kind": "auth"})
    with pytest.raises(ConfigError, match="unknown field"):
        build_stage({"kind": "auth", "service_url": "http://x/verify", "tokne_field": "t"})


def test_jwt_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TokenAuth(jwt_key_env="COLLECTOR_TEST_AUTH_KEY")  # no service: the local check only
    with pytest.raises(ValueError, match="COLLECTOR_TEST_AUTH_KEY"):
        spec.build()
    monkeypatch.setenv("COLLECTOR_TEST_AUTH_KEY", KEY)
    tok = jwt.encode({"sub": "u-env"}, KEY, algorithm="HS256")
    events = clicks(tok)
    (drops,), stats = resolve(spec, events)
    assert drops == [] and events[0].user_id == "u-env" and stats["jwt_fallback"] == 1


# ------------------------------------------------------------------ inside a Collector
@pytest.mark.usefixtures("no_leaks")
def test_a_collector_fills_user_ids_and_reports_refused_tokens(svc: AuthService) -> None:
    users = [f"user-{i}" for i in range(5)]
    tokens = {u: svc.issue(u)[0] for u in users}
    bad = jwt.encode({"sub": "mallory"}, "not-the-key-0123456789abcdefghijk", algorithm="HS256")
    batch: list[dict[str, Any]] = []
    for i in range(200):
        tok: str | None = tokens[users[i % 5]] if i % 10 else None
        if i % 37 == 0 and i:
            tok = bad
        batch.append({"event": "element_click", "id": f"e{i}", "token": tok, "data": {"page_type": "movie"}})
    p = click_pipeline(stage(svc))
    with Collector(p, workers=2, chunk_size=32) as c:
        res = c.handle(batch, return_events=True).wait(timeout=60)
        refused = [i for i in range(200) if batch[i]["token"] == bad]
        assert [(x.index, x.kind, x.path) for x in res.errors] == [(i, "unauthorized", "$.token") for i in refused]
        assert all("token rejected by the auth service" in x.reason for x in res.errors)
        assert res.failed_events == 0 and res.handled_events == 200
        assert res.events is not None
        for i, ev in enumerate(res.events):
            if i in refused:
                assert ev is None
            else:
                want = "anonymous" if batch[i]["token"] is None else users[i % 5]
                assert ev.user_id == want and ev.token is None
        # each worker asked the service at most once per user (and once for the bad token)
        assert svc.calls <= 2 * (len(users) + 1)
        want = {"anonymous": 20, "rejected": len(refused)}
        wait_until(lambda: all(c.aggregate("auth")[k] == v for k, v in want.items()), 10,
                   what="the workers' auth counters")
        got = c.aggregate("auth")
        assert got["service"] + got["cache_local"] == 200 - 20 - len(refused)
