"""The daemon: engine + HTTP server on one uvloop loop, driven by signals and systemd."""

from __future__ import annotations

from .daemon import EX_CONFIG, Daemon, run_daemon

__all__ = ["EX_CONFIG", "Daemon", "run_daemon"]
