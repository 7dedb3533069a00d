"""Tokens: the auth service's verify call, the local JWT check, and a built-in service.

::

    AuthClient.verify(token) ── GET <service_url>, Authorization: Bearer <token> ──► auth service
        200 {"user_id": "u1", "expires_at": 1764500000}  ─► Verified(user_id, expires_at)
        401 / 403 {"reason": "token expired"}             ─► TokenRejected(reason)   (final)
        5xx, other status, timeout, refused, bad answer   ─► AuthUnavailable(why)    (retry, breaker)

    JwtCheck(key, algorithms, claim)(token) ─► user id, or TokenRejected (signature, format,
        algorithm not in the fixed list, missing claim); expiry is *not* checked: this is the
        fallback the seed asks for while the service is down

:class:`AuthService` is a small built-in service (stdlib asyncio + PyJWT) for tests, the
demo and machines without a real one: ``POST /tokens`` issues an HS256 JWT signed with
its key, ``GET /verify`` checks one (``Authorization: Bearer`` or ``?token=``);
``down`` makes ``/verify`` answer 503, ``delay`` makes it slow, ``revoke(token)``
makes it refuse a well-signed token; ``calls`` counts ``/verify`` requests.
``python -m collector.sources.auth --port 8090 --key secret``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec

from ..errors import missing
from .http import aiohttp_module, read_bounded
from .local_service import LocalService

log = logging.getLogger("collector.sources.auth")

__all__ = [
    "ALGORITHMS",
    "AuthClient",
    "AuthService",
    "AuthUnavailable",
    "JwtCheck",
    "TokenRejected",
    "Verified",
    "algorithm_family",
    "jwt_module",
]

# the algorithms a configuration may name, by family; "none" is in none of them
ALGORITHMS: dict[str, str] = {
    **dict.fromkeys(("HS256", "HS384", "HS512"), "hmac"),
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), "rsa"),
    **dict.fromkeys(("ES256", "ES256K", "ES384", "ES512"), "ec"),
    "EdDSA": "okp",
}


def algorithm_family(algorithms: tuple[str, ...] | list[str]) -> str:
    """The one family ``algorithms`` belong to; ``ValueError`` for ``none``, an unknown
    name, an empty list, or a mix of families (a public key must never be usable as an
    HMAC secret: the algorithm-confusion attack)."""
    if not algorithms:
        raise ValueError("algorithms: name at least one JWT algorithm (e.g. HS256)")
    families = set()
    for a in algorithms:
        if a.lower() == "none":
            raise ValueError("algorithms: 'none' is never accepted (an unsigned token proves nothing)")
        if a not in ALGORITHMS:
            raise ValueError(f"algorithms: unknown JWT algorithm {a!r}; known: {', '.join(ALGORITHMS)}")
        families.add(ALGORITHMS[a])
    if len(families) > 1:
        raise ValueError(f"algorithms: {list(algorithms)} mix key families ({', '.join(sorted(families))}); "
                         "list algorithms of one family, for one key")
    return families.pop()


def jwt_module(what: str) -> Any:
    """PyJWT, or the error naming the extra to install."""
    try:
        import jwt
    except ImportError:
        raise missing("PyJWT", "auth", what) from None
    return jwt


class TokenRejected(Exception):
    """The token is not valid (the service said so, or the local check failed)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AuthUnavailable(Exception):
    """The service gave no verdict: refused, timed out, 5xx, or an answer of the wrong shape."""


class Verified(msgspec.Struct):
    """The service's verdict on a valid token."""

    user_id: str
    expires_at: float | None = None


class _Refusal(msgspec.Struct):
    reason: str | None = None
    error: str | None = None
    detail: str | None = None


class AuthClient:
    """The verify call of one worker: one aiohttp session, a bounded pool (``connections``).

    Made inside the worker's loop (the session is created on first use there).
    """

    def __init__(self, url: str, *, timeout: float = 0.5, connections: int = 32,
                 reject_status: tuple[int, ...] = (401, 403), max_body: int = 65536) -> None:
        self.aiohttp = aiohttp_module("the auth stage's service calls")
        self.url = url
        self.timeout = timeout
        self.connections = connections
        self.reject_status = reject_status
        self.max_body = max_body
        self.session: Any = None
        self.requests = 0
        self.dec = msgspec.json.Decoder(Verified)
        self.dec_refusal = msgspec.json.Decoder(_Refusal)

    def _session(self) -> Any:
        if self.session is None or self.session.closed:
            ah = self.aiohttp
            self.session = ah.ClientSession(connector=ah.TCPConnector(limit=self.connections),
                                            timeout=ah.ClientTimeout(total=None))
        return self.session

    async def verify(self, token: str) -> Verified:
        """The service's verdict: ``Verified``, or raises ``TokenRejected`` / ``AuthUnavailable``."""
        self.requests += 1
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with asyncio.timeout(self.timeout), self._session().get(self.url, headers=headers) as resp:
                status = resp.status
                raw = await read_bounded(resp, self.max_body)
        except TimeoutError:
            raise AuthUnavailable(f"no answer from {self.url} within {self.timeout}s") from None
        except (OSError, self.aiohttp.ClientError) as e:
            raise AuthUnavailable(f"{self.url}: {type(e).__name__}: {e}") from None
        except Exception as e:  # a body over the limit (SourceError)
            raise AuthUnavailable(f"{self.url}: {e}") from None
        if status in self.reject_status:
            try:
                r = self.dec_refusal.decode(raw)
                why = r.reason or r.error or r.detail
            except (msgspec.DecodeError, msgspec.ValidationError):
                why = None
            raise TokenRejected(why or f"HTTP {status}")
        if status != 200:
            raise AuthUnavailable(f"HTTP {status} from {self.url}")
        try:
            v = self.dec.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise AuthUnavailable(f"{self.url} answered 200 without a user_id: {e}") from None
        if not v.user_id:
            raise AuthUnavailable(f"{self.url} answered 200 with an empty user_id")
        return v

    async def close(self) -> None:
        """Close the session."""
        if self.session is not None:
            s, self.session = self.session, None
            await s.close()


class JwtCheck:
    """Verify a JWT locally: the signature with ``key``, only ``algorithms``; not the expiry.

    ``audience``/``issuer``, when set, must match. The user id is the ``claim`` claim
    (a non-empty string, or an integer given as text).
    """

    def __init__(self, key: str, algorithms: tuple[str, ...], claim: str = "sub",
                 audience: str = "", issuer: str = "", leeway: float = 0.0) -> None:
        family = algorithm_family(algorithms)
        if not key:
            raise ValueError("a JWT key is needed to check tokens locally")
        shortest = max(int(a[2:]) // 8 for a in algorithms) if family == "hmac" else 0
        if len(key.encode()) < shortest:
            log.warning("the JWT key is %d bytes, shorter than the %d RFC 7518 asks for %s; "
                        "PyJWT warns on every check", len(key.encode()), shortest, "/".join(algorithms))
        self.jwt = jwt_module("the auth stage's local JWT check")
        self.key = key
        self.algorithms = list(algorithms)
        self.claim = claim
        self.audience = audience or None
        self.issuer = issuer or None
        self.leeway = leeway
        self.options = {"verify_exp": False, "require": [claim]}

    def __call__(self, token: str) -> str:
        """The user id in ``token``; ``TokenRejected`` when the token does not verify."""
        jwt = self.jwt
        try:
            claims = jwt.decode(token, self.key, algorithms=self.algorithms, options=self.options,
                                audience=self.audience, issuer=self.issuer, leeway=self.leeway)
        except jwt.InvalidTokenError as e:
            raise TokenRejected(f"{type(e).__name__}: {e}") from None
        user = claims.get(self.claim)
        if type(user) is int:
            user = str(user)
        if not isinstance(user, str) or not user:
            raise TokenRejected(f"claim {self.claim!r} is not a user id")
        return user


class AuthService(LocalService):
    """The built-in token service on 127.0.0.1 (see the module docstring).

    ``with svc.running(): svc.verify_url`` runs it on a thread of its own.
    """

    name = "auth-service"

    def __init__(self, key: str = "collector-demo-key-change-me-0123456789", host: str = "127.0.0.1", port: int = 0,
                 algorithm: str = "HS256") -> None:
        super().__init__(host, port)
        self.jwt = jwt_module("the built-in auth service")
        self.key = key
        self.algorithm = algorithm
        self.down = False  # /verify answers 503
        self.delay = 0.0  # seconds /verify waits before answering
        self.calls = 0  # /verify requests
        self.revoked: set[str] = set()

    @property
    def url(self) -> str:
        """The service's base URL."""
        return f"http://{self.host}:{self.port}"

    @property
    def verify_url(self) -> str:
        """The ``/verify`` URL (a stage's ``service_url``)."""
        return f"{self.url}/verify"

    def issue(self, user_id: str, ttl: float = 3600.0, **claims: Any) -> tuple[str, float]:
        """A token for ``user_id`` valid ``ttl`` seconds (negative: already expired), and its expiry."""
        now = time.time()
        exp = int(now + ttl)
        token = self.jwt.encode({"sub": user_id, "iat": int(now), "exp": exp, **claims}, self.key, self.algorithm)
        return token, float(exp)

    def revoke(self, token: str) -> None:
        """Refuse ``token`` from now on (it stays well signed: only the service knows)."""
        self.revoked.add(token)

    def check(self, token: str) -> tuple[int, dict[str, Any]]:
        """``/verify``'s status and answer for ``token``."""
        jwt = self.jwt
        if token in self.revoked:
            return 401, {"reason": "token revoked"}
        try:
            claims = jwt.decode(token, self.key, algorithms=[self.algorithm], options={"require": ["sub", "exp"]})
        except jwt.ExpiredSignatureError:
            return 401, {"reason": "token expired"}
        except jwt.InvalidTokenError as e:
            return 401, {"reason": f"invalid token: {e}"}
        return 200, {"user_id": str(claims["sub"]), "expires_at": claims["exp"]}

    async def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """``/verify``, ``/tokens`` and ``/health`` (see the module docstring)."""
        status, doc = await self._route(method, target, headers, body)
        return status, msgspec.json.encode(doc)

    async def _route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        u = urlsplit(target)
        if u.path == "/verify" and method == "GET":
            self.calls += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.down:
                return 503, {"reason": "auth service down (AuthService.down)"}
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            token = token or (parse_qs(u.query).get("token") or [""])[0]
            if not token:
                return 401, {"reason": "no token: send Authorization: Bearer <token> or ?token="}
            return self.check(token)
        if u.path == "/tokens" and method == "POST":
            try:
                req = msgspec.json.decode(body)
                user, ttl = req["user_id"], float(req.get("ttl", 3600))
                if not isinstance(user, str) or not user:
                    raise ValueError("user_id must be a non-empty string")
            except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                return 400, {"reason": f'send {{"user_id": "...", "ttl": seconds}}: {e}'}
            token, exp = self.issue(user, ttl)
            return 200, {"token": token, "expires_at": exp}
        if u.path == "/health":
            return 200, {"status": "ok"}
        return 404, {"reason": f"no route {method} {u.path}"}


def main(argv: list[str] | None = None) -> None:
    """``python -m collector.sources.auth [--host H] [--port P] [--key K]``."""
    ap = argparse.ArgumentParser(description="Serve the built-in token service (POST /tokens, GET /verify).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--key", default="collector-demo-key-change-me-0123456789", help="the HS256 signing key")
    a = ap.parse_args(argv)
    svc = AuthService(a.key, host=a.host, port=a.port)
    raise SystemExit(svc.serve_forever("auth service on {svc.url} (POST /tokens, GET /verify)"))


if __name__ == "__main__":
    main()
