"""The ``rates`` kind: FX conversion from a rates API in exchangerate.host's format.

::

    GET <url>  (at most once per ``max_age`` seconds per worker; seed 001: 60)
      ─► {"base": "EUR", "rates": {"USD": 1.0832, "BTC": 0.0000161, ...}}
    key "USD"           ─► Decimal rate: units of USD per 1 unit of the base
    key ("USD", 500)    ─► the amount in EUR minor units (with Lookup key_fields=("amount",))

Conversion rule. An amount ``a`` is in the minor units of its currency ``C`` (``d_C``
decimals: 2 for EUR, USD, GBP, NZD; 8 for BTC; ``decimals`` is configurable). In the
target currency ``T`` (EUR) it is ``a / 10**d_C / rate[C] * rate[T] * 10**d_T`` minor
units, computed in :class:`decimal.Decimal` from the rates as written in the JSON
(no binary floats), then rounded to an integer **half away from zero** (ROUND_HALF_UP:
467.5 → 468, 467.49 → 467, -467.5 → -468). An amount already in ``T`` is
returned unchanged. A currency missing from the table is a counted failure of that key
(the field keeps its default), never a crash.

:class:`RatesService` is a tiny built-in HTTP service (stdlib asyncio, no dependency)
serving a deterministic table in that format at ``/latest``, for tests, the demo and
machines without the internet: ``python -m collector.sources.rates --port 8089``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import msgspec

from .base import Failure, Source, SourceError
from .config import RatesSourceConfig
from .http import aiohttp_module, read_bounded
from .local_service import LocalService

__all__ = ["DEFAULT_RATES", "RatesService", "RatesSource", "convert"]

# deterministic rates (units per 1 EUR) served by the built-in service
DEFAULT_RATES: dict[str, str] = {"EUR": "1", "USD": "1.0832", "GBP": "0.8571", "NZD": "1.7964", "BTC": "0.0000161"}


class _Latest(msgspec.Struct):
    base: str
    rates: dict[str, Decimal]


def convert(amount: int, currency: str, rates: dict[str, Decimal], base: str,
            decimals: dict[str, int], default_decimals: int = 2, target: str = "EUR") -> int:
    """``amount`` minor units of ``currency`` in ``target`` minor units (module doc's rule).

    ``KeyError(currency)`` when the table has no rate for it.
    """
    if currency == target:
        return amount
    d_src = decimals.get(currency, default_decimals)
    d_dst = decimals.get(target, default_decimals)
    r_src = Decimal(1) if currency == base else rates[currency]
    r_dst = Decimal(1) if target == base else rates[target]
    if r_src <= 0:
        raise KeyError(currency)
    v = Decimal(amount).scaleb(-d_src) / r_src * r_dst
    return int(v.scaleb(d_dst).quantize(Decimal(1), rounding=ROUND_HALF_UP))


class RatesSource(Source):
    """``RatesSource(url="https://api.exchangerate.host/latest", max_age=60)``."""

    kind = "rates"
    Config = RatesSourceConfig

    def __init__(self, config: Any = None, /, **fields: Any) -> None:
        super().__init__(config, **fields)
        self.aiohttp = aiohttp_module("the rates source")
        self.table: _Latest | None = None
        self.fetched_at = -1e18
        self.fetches = 0
        self.lock: asyncio.Lock | None = None
        self.dec = msgspec.json.Decoder(_Latest, float_hook=Decimal)

    async def rates(self) -> _Latest:
        """The rates table, fetched again when older than ``max_age`` (one fetch at a time)."""
        if self.table is not None and time.monotonic() - self.fetched_at < self.config.max_age:
            return self.table
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            if self.table is None or time.monotonic() - self.fetched_at >= self.config.max_age:
                self.table = await self._fetch()
                self.fetched_at = time.monotonic()
        return self.table

    async def _fetch(self) -> _Latest:
        ah = self.aiohttp
        self.fetches += 1
        url = self.config.url
        async with (
            asyncio.timeout(self.config.resilience.timeout),
            ah.ClientSession(timeout=ah.ClientTimeout(total=None)) as s,
            s.get(url) as resp,
        ):
            if resp.status != 200:
                raise SourceError(f"rates: HTTP {resp.status} from {url}", "http_status")
            raw = await read_bounded(resp, self.config.max_body)
        try:
            return self.dec.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise SourceError(f"rates: {url} did not answer in the /latest format: {e}", "invalid") from None

    async def get_many(self, keys: Sequence[Any]) -> dict[Any, Any]:
        """Currency → rate, or ``(currency, amount)`` → converted minor units."""
        t = await self.rates()
        cfg = self.config
        out: dict[Any, Any] = {}
        for k in keys:
            try:
                if isinstance(k, tuple):
                    cur, amount = k
                    out[k] = convert(int(amount), cur, t.rates, t.base, cfg.decimals, cfg.default_decimals, cfg.target)
                else:
                    out[k] = Decimal(1) if k == t.base else t.rates[k]
            except KeyError:
                out[k] = Failure(f"no rate for currency {k[0] if isinstance(k, tuple) else k!r}")
            except (TypeError, ValueError) as e:
                out[k] = Failure(f"cannot convert {k!r}: {e}")
        return out

    @property
    def max_batch(self) -> int:
        return 100_000

    def describe(self) -> str:
        return f"rates {self.config.url}"


class RatesService(LocalService):
    """A deterministic ``/latest`` service on 127.0.0.1 (see the module docstring).

    ``with svc.running(): svc.url`` runs it on a thread of its own;
    ``requests`` counts the requests served. ``rates`` may be changed while it runs.
    """

    name = "rates-service"

    def __init__(self, rates: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.rates = dict(rates or DEFAULT_RATES)

    @property
    def url(self) -> str:
        """The ``/latest`` URL."""
        return f"http://{self.host}:{self.port}/latest"

    def body(self) -> bytes:
        """The answer: the rates as JSON numbers, written exactly as configured."""
        rates = ", ".join(f'"{c}": {r}' for c, r in self.rates.items())
        date = time.strftime("%Y-%m-%d", time.gmtime())
        return f'{{"success": true, "base": "EUR", "date": "{date}", "rates": {{{rates}}}}}'.encode()

    async def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """``/latest``: the table; anything else: 404."""
        if target.split("?")[0] == "/latest":
            return 200, self.body()
        return 404, b'{"error": "not found"}'


def main(argv: list[str] | None = None) -> None:
    """``python -m collector.sources.rates [--host H] [--port P]`` (``collector rates-service`` has more)."""
    ap = argparse.ArgumentParser(description="Serve deterministic FX rates in exchangerate.host's /latest format.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8089)
    a = ap.parse_args(argv)
    raise SystemExit(RatesService(host=a.host, port=a.port).serve_forever("rates service on {svc.url}"))


if __name__ == "__main__":
    main()
