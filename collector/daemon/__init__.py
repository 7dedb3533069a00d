"""The daemon: engine + HTTP server on one uvloop loop, driven by signals and systemd.

::

    collector serve ─► run_daemon: config (+ CLI overrides), JSON logs, uvloop
                        ▼
    signals ──(handlers only queue)──► daemon.Daemon.main_loop (≤ 1 s per turn)
                                        ├─ handle_term: stop accepting, drain HTTP, engine, sinks
                                        ├─ handle_hup: reload; a new engine swapped in, the old drained
                                        ├─ notify: WATCHDOG=1 while heartbeats are fresh, STATUS=
                                        └─ stats log line every log.stats_interval
    http.HttpServer ─► http.App ─► views.Views (the http.Backend) ─► (Collector, Coalescer)
                                     metrics/health/ready summed across reloads, sink probes

``daemon.py`` runs the process (signals, lifecycle, the engine swap), ``views.py`` is
what the HTTP routes see of it, ``notify.py`` speaks systemd's notify protocol.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import uvloop

from ..config import load_config
from ..errors import ConfigError
from ..logs import setup_logging
from .daemon import EX_CONFIG, Daemon, apply_overrides

__all__ = ["EX_CONFIG", "Daemon", "run_daemon"]

log = logging.getLogger("collector.daemon")


def run_daemon(config_path: str | None, *, overrides: dict[str, Any] | None = None, port_file: str | None = None) -> int:
    """Load the config (with CLI overrides), set up JSON logs, run the daemon on uvloop."""
    try:
        cfg = load_config(config_path)
        if overrides:
            cfg = apply_overrides(cfg, overrides)
    except ConfigError as e:
        setup_logging("INFO", json=True)
        log.error("%s", e, extra={"fields": {"event": "config_error"}})
        return EX_CONFIG
    os.environ["COLLECTOR_LOG_FORMAT"] = "json"  # spawned workers log JSON lines too
    setup_logging(cfg.log.level, json=True)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(Daemon(cfg, config_path, port_file=port_file, overrides=overrides).run())
