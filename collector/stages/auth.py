"""TokenAuth: an event's token → its user id (seed 002, step 2), or the event is refused.

::

    chunk ─► distinct tokens ─► local cache (this worker; the token's own expiry)   hit ─┐
              null/absent ─► user_id = "anonymous"                                      │
              └► misses ─► single-flight: a token already being resolved by another     │
                           chunk of this worker? wait for that answer                   │
                 └► lead ─► Redis (one MGET of sha256(token) keys) ─► hit ──────────────┤
                     └► auth service (GET /verify, one per token, concurrently; breaker,│
                        retries, timeout) ─► 200: user id (cached in both levels until  │
                        the token expires, at most cache_max_ttl) ──────────────────────┤
                        401/403: rejected (no fallback) ─► ErrorRecord "unauthorized"   │
                        down / timeout / 5xx / breaker open ─► local JWT check: the     │
                        signature with jwt_key and the fixed algorithm list, expiry     │
                        ignored (the seed's rule); bad ─► "unauthorized" ───────────────┤
    events ◄── user_id set, token set to None (removed from the stored event) ◄─────────┘

The service is the authority (it knows revocations and expiry); the local check only
keeps events flowing while it is down, and its answers are never cached. Counters per
outcome are the stage's partial state: ``Collector.aggregate(name)`` sums the workers'.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, NamedTuple

import msgspec

from ..protocol import ErrorRecord
from ..retry import Backoff
from ..sources.auth import (
    AuthClient,
    AuthUnavailable,
    JwtCheck,
    TokenRejected,
    Verified,
    algorithm_family,
)
from ..sources.cache import FOUND, MISS, NOT_FOUND, LocalCache, SharedCache
from ..sources.guard import CircuitBreaker, Flights
from .base import Stage

__all__ = ["OUTCOMES", "AuthRuntime", "TokenAuth"]

log = logging.getLogger("collector.stages.auth")

UNAUTHORIZED = "unauthorized"
# per event: how its user id was found, or why it was not
OUTCOMES = ("service", "cache_local", "cache_redis", "jwt_fallback", "rejected", "anonymous", "unavailable")
# per call: what the runtime did to find them
CALLS = ("service_calls", "service_failures", "breaker_open", "redis_errors", "coalesced")


@dataclass(frozen=True)
class TokenAuth(Stage):
    """Resolve ``token_field`` to a user id in ``target`` (see the module docstring).

    ``service_url``: the auth service's verify URL (``GET`` with ``Authorization: Bearer``;
    200 ``{"user_id", "expires_at"}``; ``reject_status`` means the token is invalid).
    ``redis_url``: the shared cache level (empty: only the worker's own cache).
    ``jwt_key`` (or the environment variable ``jwt_key_env``): the key of the local check
    when the service gives no verdict; without one such events fail with kind ``retry``.
    ``algorithms`` is the fixed list the local check accepts (never ``none``; one family).
    """

    service_url: str = ""
    token_field: str = "token"
    target: str = "user_id"
    anonymous: str = "anonymous"
    redis_url: str = ""
    redis_prefix: str = "collector:auth:"
    cache_max_ttl: float = 3600.0
    reject_ttl: float = 30.0  # a refused token is remembered (locally only) this long
    local_max_entries: int = 100_000
    jwt_key: str = ""
    jwt_key_env: str = ""
    algorithms: tuple[str, ...] = ("HS256",)
    user_claim: str = "sub"
    audience: str = ""
    issuer: str = ""
    timeout: float = 0.5
    retries: int = 1
    backoff: float = 0.05
    connections: int = 32
    breaker_failures: int = 5
    breaker_reset: float = 10.0
    reject_status: tuple[int, ...] = (401, 403)
    max_token_length: int = 8192
    name: str = "auth"

    def __post_init__(self) -> None:
        object.__setattr__(self, "algorithms", tuple(self.algorithms))
        object.__setattr__(self, "reject_status", tuple(self.reject_status))
        algorithm_family(self.algorithms)
        if not self.service_url and not (self.jwt_key or self.jwt_key_env):
            raise ValueError("auth: set service_url, or jwt_key / jwt_key_env to check tokens locally only")
        if self.jwt_key and self.jwt_key_env:
            raise ValueError("auth: set jwt_key or jwt_key_env, not both")
        if self.timeout <= 0 or self.cache_max_ttl < 0 or self.retries < 0:
            raise ValueError("auth: timeout must be > 0, cache_max_ttl and retries >= 0")

    def key(self) -> str:
        """The local check's key (from ``jwt_key_env`` when named); empty: no local check."""
        if self.jwt_key_env:
            k = os.environ.get(self.jwt_key_env, "")
            if not k:
                raise ValueError(f"auth: the environment variable {self.jwt_key_env!r} (jwt_key_env) is not set")
            return k
        return self.jwt_key

    def build(self) -> AuthRuntime:
        """The resolver of one worker."""
        return AuthRuntime(self)

    def merge(self, partials: Sequence[bytes]) -> dict[str, int]:
        """The workers' counters summed."""
        out = dict.fromkeys((*OUTCOMES, *CALLS), 0)
        for b in partials:
            for k, v in _dec.decode(b).items():
                out[k] = out.get(k, 0) + v
        return out

    def read(self, result: dict[str, int], key: Any = None, **_: Any) -> Any:
        """Every counter, or one (``key``: its name)."""
        return dict(result) if key is None else result.get(key)


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(dict[str, int])


class Answer(NamedTuple):
    """What one token resolved to: a user id, or a reason and the drop's kind."""

    user: str | None
    outcome: str  # an OUTCOMES name
    reason: str = ""
    kind: str = UNAUTHORIZED


def token_key(token: str) -> str:
    """The cache key of ``token`` in Redis: its SHA-256 (the raw token is never stored)."""
    return hashlib.sha256(token.encode()).hexdigest()


class AuthRuntime:
    """The running form of :class:`TokenAuth` in one worker; call it with a chunk's events.

    Returns the drops, or a coroutine of them when some token is not in the local cache.
    """

    def __init__(self, spec: TokenAuth) -> None:
        self.spec = spec
        self.get = attrgetter(spec.token_field)
        self.path = f"$.{spec.token_field}"
        self.local = LocalCache(spec.cache_max_ttl, not_found_ttl=spec.reject_ttl,
                                max_entries=spec.local_max_entries)
        self.flights = Flights()
        self.counts = dict.fromkeys((*OUTCOMES, *CALLS), 0)
        self._snap: bytes | None = None
        key = spec.key()
        self.check = JwtCheck(key, spec.algorithms, spec.user_claim, spec.audience, spec.issuer) if key else None
        self.client = (AuthClient(spec.service_url, timeout=spec.timeout, connections=spec.connections,
                                  reject_status=spec.reject_status) if spec.service_url else None)
        self.shared = (SharedCache(spec.redis_url, namespace="tokens", prefix=spec.redis_prefix,
                                   ttl=spec.cache_max_ttl) if spec.redis_url else None)
        self.breaker = CircuitBreaker(spec.breaker_failures, spec.breaker_reset)
        self.backoff = Backoff(spec.backoff, cap=max(spec.backoff, 1.0), retries=spec.retries)
        self._logged: set[str] = set()

    def stats(self) -> dict[str, int]:
        """This worker's counters: events per outcome, then calls."""
        return dict(self.counts)

    def snapshot(self) -> bytes:
        """The counters as msgpack; the same bytes object while nothing changed."""
        if self._snap is None:
            self._snap = _enc.encode(self.counts)
        return self._snap

    async def aclose(self) -> None:
        """Close the service session and the Redis pool (the worker is exiting)."""
        if self.client is not None:
            await self.client.close()
        if self.shared is not None:
            await self.shared.close()

    # ------------------------------------------------------------------ per chunk
    def __call__(self, events: list[Any]) -> Any:
        """Drops for ``events`` (user ids set in place); a coroutine when a lookup is needed."""
        tokens = list(map(self.get, events))
        now = time.monotonic()
        local = self.local
        local.sweep(now)
        answers: dict[Any, Answer] = {}
        todo: list[str] = []
        for t in dict.fromkeys(tokens):
            if t is None:
                continue
            if type(t) is not str:
                answers[t] = Answer(None, "rejected", "the token must be a string")
                continue
            a = local.live(t, now)
            if a is MISS:
                todo.append(t)
            else:
                answers[t] = a
        if not todo:
            return self._apply(events, tokens, answers)
        return self._lookup(events, tokens, answers, todo)

    def _apply(self, events: list[Any], tokens: list[Any], answers: dict[Any, Answer]) -> list[ErrorRecord]:
        target, tfield, anon = self.spec.target, self.spec.token_field, self.spec.anonymous
        counts = self.counts
        drops: list[ErrorRecord] = []
        for i, (e, t) in enumerate(zip(events, tokens, strict=True)):
            if t is None:
                setattr(e, target, anon)
                counts["anonymous"] += 1
                continue
            a = answers[t]
            counts[a.outcome] += 1
            if a.user is None:
                drops.append(ErrorRecord(i, self.path, a.reason, a.kind))
            else:
                setattr(e, target, a.user)
                setattr(e, tfield, None)
        self._snap = None
        return drops

    async def _lookup(self, events: list[Any], tokens: list[Any], answers: dict[Any, Answer],
                      todo: list[str]) -> list[ErrorRecord]:
        flights = self.flights
        joined: list[tuple[str, asyncio.Future[Any]]] = []
        lead: list[str] = []
        for t in todo:
            f = flights.get(t)
            if f is None:
                lead.append(t)
            else:
                joined.append((t, f))
        if lead:
            fut = flights.lead_many(lead)
            try:
                got = await self._resolve(lead)
            except BaseException:
                flights.abandon_many(lead, fut)
                raise
            flights.settle_many(lead, fut, got)
            answers.update(got)
        again: list[str] = []
        for t, f in joined:
            if not f.done():
                await asyncio.wait([f])
            a = None if f.cancelled() else f.result().get(t)
            if a is None:  # its leader was cancelled: resolve it here
                again.append(t)
            else:
                self.counts["coalesced"] += 1
                answers[t] = a
        if again:
            answers.update(await self._resolve(again))
        return self._apply(events, tokens, answers)

    async def _resolve(self, tokens: list[str]) -> dict[str, Answer]:
        """An answer for each token: Redis, then the service (or the local check)."""
        out: dict[str, Answer] = {}
        todo = []
        limit = self.spec.max_token_length
        for t in tokens:
            if not t or len(t) > limit or not t.isascii() or not t.isprintable() or " " in t:
                why = "empty token" if not t else f"malformed token (printable ASCII without spaces, at most {limit} characters)"
                out[t] = Answer(None, "rejected", why)
            else:
                todo.append(t)
        if self.shared is not None and todo:
            todo = await self._from_redis(todo, out)
        if todo:
            results = await asyncio.gather(*(self._verify(t) for t in todo))
            store: list[tuple[Any, int, Any]] = []
            ttls: list[float] = []
            wall, now = time.time(), time.monotonic()
            for t, (a, v) in zip(todo, results, strict=True):
                out[t] = a
                if v is not None:
                    ttl = self._ttl(v.expires_at, wall)
                    if ttl > 0:
                        self.local.put(t, Answer(v.user_id, "cache_local"), FOUND, now, ttl)
                        store.append((token_key(t), FOUND, (v.user_id, v.expires_at)))
                        ttls.append(ttl)
                elif a.outcome == "rejected" and a.kind == UNAUTHORIZED and self.spec.reject_ttl > 0:
                    self.local.put(t, a, NOT_FOUND, now)
            if self.shared is not None and store:
                try:
                    async with asyncio.timeout(self.spec.timeout):
                        await self.shared.put_many(store, ttls)
                except Exception as e:
                    self._redis_failed("write", e)
        return out

    def _ttl(self, expires_at: float | None, wall: float) -> float:
        cap = self.spec.cache_max_ttl
        return cap if expires_at is None else min(cap, expires_at - wall)

    async def _from_redis(self, todo: list[str], out: dict[str, Answer]) -> list[str]:
        """Answer what Redis holds into ``out``; the tokens it does not hold."""
        assert self.shared is not None
        keys = [token_key(t) for t in todo]
        try:
            async with asyncio.timeout(self.spec.timeout):
                got = await self.shared.get_many(keys)
        except Exception as e:
            self._redis_failed("read", e)
            return todo
        rest = []
        wall, now = time.time(), time.monotonic()
        for t, k in zip(todo, keys, strict=True):
            hit = got.get(k)
            try:
                outcome, (user, exp) = hit  # type: ignore[misc]
                ttl = self._ttl(exp, wall)
                ok = outcome == FOUND and isinstance(user, str) and user and ttl > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                rest.append(t)
                continue
            out[t] = Answer(user, "cache_redis")
            self.local.put(t, Answer(user, "cache_local"), FOUND, now, ttl)
        return rest

    def _redis_failed(self, what: str, e: Exception) -> None:
        self.counts["redis_errors"] += 1
        self._snap = None
        if what not in self._logged:
            self._logged.add(what)
            log.warning("auth %s: Redis %s failed, going on without it: %s: %s (logged once)",
                        self.spec.name, what, type(e).__name__, e)

    async def _verify(self, token: str) -> tuple[Answer, Verified | None]:
        """The service's verdict (and its answer when valid), or the local check's."""
        client = self.client
        if client is None:
            return self._local(token, "no auth service is configured"), None
        breaker, counts = self.breaker, self.counts

        async def call() -> Verified:
            if not breaker.allow():
                counts["breaker_open"] += 1
                raise ConnectionRefusedError(f"the circuit breaker is {breaker.state}")
            counts["service_calls"] += 1
            try:
                v = await client.verify(token)
            except asyncio.CancelledError:
                breaker.failure()  # a half-open probe must not stay "in flight" for ever
                raise
            except AuthUnavailable:
                counts["service_failures"] += 1
                breaker.failure()
                raise
            except TokenRejected:
                breaker.success()  # a verdict: the service works
                raise
            breaker.success()
            return v

        try:
            v = await self.backoff.run(call, retry_if=lambda e: isinstance(e, AuthUnavailable))
        except TokenRejected as e:
            return Answer(None, "rejected", f"token rejected by the auth service: {e.reason}"), None
        except (AuthUnavailable, ConnectionRefusedError) as e:
            if "service" not in self._logged:
                self._logged.add("service")
                log.warning("auth %s: the auth service gave no verdict (%s); checking tokens locally "
                            "(logged once)", self.spec.name, e)
            return self._local(token, str(e)), None
        return Answer(v.user_id, "service"), v

    def _local(self, token: str, why: str) -> Answer:
        """The fallback: the token's signature checked here, its expiry not (seed 002)."""
        if self.check is None:
            return Answer(None, "unavailable",
                          f"the auth service gave no verdict ({why}) and no jwt_key is set to check "
                          "the token locally; retry later", "retry")
        try:
            return Answer(self.check(token), "jwt_fallback")
        except TokenRejected as e:
            return Answer(None, "rejected", f"invalid token ({e.reason}); checked locally: {why}")
