"""systemd's notify protocol (``sd_notify``): a datagram of ``KEY=value`` lines.

::

    daemon ── "READY=1\\nSTATUS=..." ──► $NOTIFY_SOCKET (AF_UNIX, SOCK_DGRAM) ──► systemd

A dozen lines of protocol do not justify a dependency: the socket path comes from
``$NOTIFY_SOCKET`` (``@name`` is the abstract namespace), each message is one
``sendto``. Without ``$NOTIFY_SOCKET`` (not under systemd) every call is a no-op.
``$WATCHDOG_USEC`` (with ``$WATCHDOG_PID``, when set, naming this process) tells how
often systemd expects ``WATCHDOG=1``; :attr:`Notifier.watchdog_interval` is half of it.
"""

from __future__ import annotations

import os
import socket

__all__ = ["Notifier"]


class Notifier:
    """Sends notifications to systemd (or to whatever ``$NOTIFY_SOCKET`` names)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr.startswith("@"):
            self.address = "\0" + addr[1:]
        elif addr.startswith("/"):
            self.address = addr
        self.sock: socket.socket | None = None
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6

    @property
    def enabled(self) -> bool:
        """Whether a notify socket was given."""
        return self.sock is not None

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines (``ready=1`` → ``READY=1``); False if it could not."""
        if self.sock is None or self.address is None:
            return False
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        try:
            self.sock.sendto(msg.encode(), self.address)
        except OSError:
            return False  # systemd gone or socket full: the service goes on regardless
        return True

    def ready(self, status: str = "") -> bool:
        """``READY=1``: startup (or a reload) is complete."""
        return self.send(ready=1, **({"status": status} if status else {}))

    def reloading(self) -> bool:
        """``RELOADING=1`` with the monotonic time systemd wants alongside it."""
        import time

        return self.send(reloading=1, monotonic_usec=int(time.monotonic() * 1e6))

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.send(stopping=1)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is healthy (only send it when it is)."""
        return self.send(watchdog=1)

    def status(self, text: str) -> bool:
        """``STATUS=<text>``: one short line shown by ``systemctl status``."""
        return self.send(status=text.replace("\n", " "))

    def close(self) -> None:
        """Close the socket."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
