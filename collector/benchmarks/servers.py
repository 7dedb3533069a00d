"""A server under test as a child process: start it in its own session, learn its port
from its log, wait until it is ready, stop it with SIGTERM. Every wait is bounded.

``bench/http_load.py`` starts ``collector serve`` this way, and
:mod:`collector.benchmarks.asgi_peer` its uvicorn peer; each says how its server names
its port (:meth:`ServerProcess.port_from_log`) and when it is ready
(:meth:`ServerProcess.is_ready`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

__all__ = ["HOST", "ServerProcess", "http_get"]

HOST = "127.0.0.1"


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """A blocking GET to 127.0.0.1 (status, body); status 0 when nothing answered."""
    import http.client

    try:
        c = http.client.HTTPConnection(HOST, port, timeout=timeout)
        try:
            c.request("GET", path, headers={"Accept": "application/json"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()
    except OSError:
        return 0, b""


class ServerProcess:
    """A server command run in its own session (so its whole process tree can be killed),
    with stderr in ``log_path`` and ``cwd`` as its working directory."""

    what = "server"

    def __init__(self, cmd: list[str], cwd: str, log_path: str, env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.cwd = cwd
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    # ------------------------------------------------------------ what a subclass says

    def port_from_log(self, text: bytes) -> int:
        """The port the server says it listens on, from its log so far; 0 while unsaid."""
        raise NotImplementedError

    def is_ready(self) -> bool:
        """Whether the server (listening on ``self.port``) takes load now."""
        return http_get(self.port, "/health")[0] == 200

    # ------------------------------------------------------------ life

    def start(self, timeout: float = 90.0) -> int:
        """Start the server; return its port once :meth:`is_ready` says so (``RuntimeError`` if not in time)."""
        self.port = 0
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child writes it for its whole life
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=log, start_new_session=True, cwd=self.cwd, env=self.env)
        finally:
            log.close()
        end = time.monotonic() + timeout
        while not self.port:
            self._check_alive("before listening")
            if time.monotonic() > end:
                raise RuntimeError(f"{self.what}: no port in its log within {timeout:.0f} s:\n{self.log_tail()}")
            self.port = self.port_from_log(self._log())
            if not self.port:
                time.sleep(0.05)
        while not self.is_ready():
            self._check_alive("before ready")
            if time.monotonic() > end:
                raise RuntimeError(f"{self.what}: not ready within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)
        return self.port

    def _check_alive(self, when: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.what} exited with {self.proc.returncode} {when}:\n{self.log_tail()}")

    def _log(self) -> bytes:
        try:
            return Path(self.log_path).read_bytes()
        except OSError:
            return b""

    def log_tail(self, n: int = 20) -> str:
        """The last lines of the server's stderr."""
        return "\n".join(self._log().decode(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait (bounded), then SIGKILL its process group; the exit code."""
        p = self.proc
        if p is None or p.poll() is not None:
            return None if p is None else p.returncode
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            # its own session (start_new_session), so the group holds only the server and its children
            os.killpg(p.pid, signal.SIGKILL)
            return p.wait(10)
