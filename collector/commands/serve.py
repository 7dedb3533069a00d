"""``collector serve``: the daemon (HTTP ingest, metrics, health; systemd Type=notify).

With no ``--config`` it runs on embedded defaults: the ``generic`` pack (``--pack`` picks
another registered one, e.g. ``playback``), a JSONL sink
and a dead-letter file in ``./collector-data`` (``$STATE_DIRECTORY`` under systemd),
127.0.0.1:8080. ``--source nats://HOST:PORT`` (or a ``[source]`` table) also consumes a
JetStream stream. Exit codes: 0 after a clean stop, 1 when the drain ran out of time,
the engine halted or the ``[source]`` could not start, 78 (EX_CONFIG) when the config
or the workers' boot failed.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``collector serve``."""
    p.add_argument("--config", "-c", metavar="PATH", help="TOML config file (default: embedded defaults)")
    p.add_argument("--host", help="override [server].host")
    p.add_argument("--port", type=int, help="override [server].port (0: any free port; see the 'listening' log line)")
    p.add_argument("--workers", type=int, help="override [engine].workers")
    p.add_argument("--data-dir", help="override data_dir (where default file sinks write)")
    p.add_argument("--pack", help="override [pipeline].pack: a registered pack (generic, playback) or module:attr")
    p.add_argument("--source", metavar="URL", help="also consume a NATS JetStream stream: nats://HOST:PORT "
                   "(sets [source].url; stream, subjects, durable from [source] or the flags below)")
    p.add_argument("--stream", metavar="NAME", help="override [source].stream (the JetStream stream)")
    p.add_argument("--subject", metavar="SUBJ", action="append",
                   help="override [source].subjects (repeatable), e.g. 'events.>'")
    p.add_argument("--durable", metavar="NAME", help="override [source].durable (the durable consumer name)")
    p.add_argument("--port-file", metavar="PATH", help="write the bound port to this file once listening")


def run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    from collector.daemon import run_daemon

    overrides = {"host": args.host, "port": args.port, "workers": args.workers, "data_dir": args.data_dir,
                 "pack": args.pack, "source": args.source, "stream": args.stream, "subject": args.subject,
                 "durable": args.durable}
    return run_daemon(args.config, overrides=overrides, port_file=args.port_file)
