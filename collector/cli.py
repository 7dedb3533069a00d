"""The ``collector`` command: one sub-command per module, imported only when used.

``COMMANDS`` maps a sub-command to ``"module:function"``; the module must also define
``add_arguments(parser)``. Lazy imports keep ``collector --help`` fast and let a
sub-command that needs an optional extra fail with the extra's name, not at start-up.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from .errors import CollectorError

__all__ = ["COMMANDS", "main"]

# name -> (module, one-line help); the module has add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("collector.commands.run", "run a playback batch through the built-in simulated service (default)"),
    "serve": ("collector.commands.serve", "run the daemon: HTTP ingest, metrics, health (systemd Type=notify)"),
    "demo": ("collector.commands.demo", "start the daemon on embedded defaults and drive it for a few seconds"),
    "check-config": ("collector.commands.check_config", "validate a TOML config file without starting"),
    "bench": ("collector.commands.bench", "run a benchmark scenario (inmem, slow-service, seed-000, stats, http, service)"),
    "migrate": ("collector.commands.migrate", "create the tables the configured SQL sinks write to"),
    "replay": ("collector.commands.replay", "send dead-lettered events back through the pipeline"),
    "publish": ("collector.commands.publish", "send a pack's generated events, or NDJSON, to NATS JetStream"),
    "consume": ("collector.commands.consume", "run a collector fed by a NATS JetStream durable consumer (no HTTP)"),
    "rates-service": ("collector.commands.rates_service", "serve deterministic FX rates (exchangerate.host's /latest) until SIGTERM"),
}


def _available() -> dict[str, tuple[str, str]]:
    found = {}
    for name, (mod, help_) in COMMANDS.items():
        if importlib.util.find_spec(mod) is not None:
            found[name] = (mod, help_)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``collector`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available()
    parser = argparse.ArgumentParser(
        prog="collector",
        description="High-throughput event collector. With no sub-command: `collector run`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (mod, help_) in commands.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == wanted or (wanted is None and name == "run"):
            importlib.import_module(mod).add_arguments(p)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    args = parser.parse_args(argv)
    module = importlib.import_module(commands[args.command][0])
    try:
        return int(module.run(args) or 0)
    except CollectorError as e:
        print(f"collector {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
