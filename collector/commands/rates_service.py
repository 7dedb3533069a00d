"""``collector rates-service``: the built-in deterministic FX rates service, in the foreground.

::

    collector rates-service [--host H] [--port P] [--port-file PATH] [--rate CUR=RATE ...]
      ─► RatesService (collector.sources.rates) on H:P ─► prints "rates service on URL"
      ─► GET /latest answers exchangerate.host's format until SIGTERM or SIGINT ─► exit 0

For the demo, tests and machines without the internet: point a ``rates`` source's
``url`` (or ``--rates-url``) at the printed URL. ``--port 0`` takes a free port;
``--port-file`` writes the bound port for whoever started it.
"""

from __future__ import annotations

import argparse
from decimal import Decimal, InvalidOperation

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``collector rates-service``."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8089, help="port (default 8089; 0: a free one)")
    p.add_argument("--port-file", metavar="PATH", help="write the bound port to this file once listening")
    p.add_argument("--rate", action="append", default=[], metavar="CUR=RATE",
                   help="set or add one rate (units of CUR per EUR), e.g. --rate USD=1.10; repeatable")


def _rates(items: list[str]) -> dict[str, str]:
    from collector.errors import ConfigError
    from collector.sources.rates import DEFAULT_RATES

    rates = dict(DEFAULT_RATES)
    for item in items:
        cur, sep, rate = item.partition("=")
        try:
            ok = bool(sep and cur.strip()) and Decimal(rate.strip()) > 0
        except InvalidOperation:
            ok = False
        if not ok:
            raise ConfigError(f"--rate {item!r}: expected CUR=RATE with a positive number, e.g. USD=1.10")
        rates[cur.strip().upper()] = rate.strip()
    return rates


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; exit 0 (1: the address is taken)."""
    from collector.sources.rates import RatesService

    svc = RatesService(_rates(args.rate), host=args.host, port=args.port)
    return svc.serve_forever("rates service on {svc.url}", args.port_file)
