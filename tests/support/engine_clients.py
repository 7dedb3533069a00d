"""Enrichment clients for the engine tests; workers import this module (spawn keeps sys.path).

Crashing clients crash once: the first call creates ``marker`` and dies; the
replacement worker finds the marker and answers normally, so a test can check that
the chunk was redelivered and completed.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import threading
import time
from pathlib import Path

from collector.playback import model_of, region_of


class Immediate:
    """Answers at once (async)."""

    async def get_region(self, user_id: str) -> tuple[str, float]:
        return region_of(user_id), 0.0

    async def get_model(self, device_type: str) -> tuple[str, float]:
        return model_of(device_type), 0.0


class SlowAsync:
    """``delay`` seconds per call, async; records concurrency in a file-free way (per process)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def get_region(self, user_id: str) -> tuple[str, float]:
        await asyncio.sleep(self.delay)
        return region_of(user_id), self.delay

    async def get_model(self, device_type: str) -> tuple[str, float]:
        await asyncio.sleep(self.delay)
        return model_of(device_type), self.delay


class SlowBlocking:
    """``delay`` seconds per call, plain blocking functions (the worker's thread pool runs them)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def get_region(self, user_id: str) -> tuple[str, float]:
        time.sleep(self.delay)
        return region_of(user_id), self.delay

    def get_model(self, device_type: str) -> tuple[str, float]:
        time.sleep(self.delay)
        return model_of(device_type), self.delay


class Crasher:
    """Dies once, in the way ``mode`` says, on its first region call; fine afterwards."""

    def __init__(self, mode: str, marker: str) -> None:
        self.mode = mode
        self.marker = marker

    def _first(self) -> bool:
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    async def get_region(self, user_id: str) -> tuple[str, float]:
        if self._first():
            if self.mode == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.mode == "segfault":
                ctypes.string_at(0)
            elif self.mode == "exit":
                os._exit(7)
            elif self.mode == "hang":
                time.sleep(60)  # blocks the worker's loop: its heartbeat stops
            elif self.mode == "raise":
                raise RuntimeError("enrichment blew up")
        return region_of(user_id), 0.0

    async def get_model(self, device_type: str) -> tuple[str, float]:
        return model_of(device_type), 0.0


class KillsOn:
    """SIGKILLs its worker every time it is asked for the region of ``user_id`` (poison)."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id

    async def get_region(self, user_id: str) -> tuple[str, float]:
        if user_id == self.user_id:
            os.kill(os.getpid(), signal.SIGKILL)
        return region_of(user_id), 0.0

    async def get_model(self, device_type: str) -> tuple[str, float]:
        return model_of(device_type), 0.0


class KillsOnceOn(Crasher):
    """SIGKILLs its worker the first time (over all workers) it is asked for ``user_id``."""

    def __init__(self, user_id: str, marker: str) -> None:
        super().__init__("sigkill", marker)
        self.user_id = user_id

    async def get_region(self, user_id: str) -> tuple[str, float]:
        if user_id == self.user_id and self._first():
            os.kill(os.getpid(), signal.SIGKILL)
        return region_of(user_id), 0.0


class Flaky:
    """Fails the first ``fail_times`` calls for each key (per process), then answers."""

    def __init__(self, fail_times: int) -> None:
        self.fail_times = fail_times
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, int]:
        return {"fail_times": self.fail_times}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["fail_times"])  # type: ignore[misc]

    async def get_region(self, user_id: str) -> tuple[str, float]:
        n = self.seen.get(user_id, 0)
        self.seen[user_id] = n + 1
        if n < self.fail_times:
            raise ConnectionError("flaky service")
        return region_of(user_id), 0.0

    async def get_model(self, device_type: str) -> tuple[str, float]:
        return model_of(device_type), 0.0


class AlwaysFails:
    """Every region call fails; models answer."""

    async def get_region(self, user_id: str) -> tuple[str, float]:
        raise ConnectionError("region service down")

    async def get_model(self, device_type: str) -> tuple[str, float]:
        return model_of(device_type), 0.0


class TooSlow:
    """Region calls never return in time."""

    async def get_region(self, user_id: str) -> tuple[str, float]:
        await asyncio.sleep(30)
        return "never", 30.0

    async def get_model(self, device_type: str) -> tuple[str, float]:
        return model_of(device_type), 0.0


def immediate_factory() -> Immediate:
    """A client built in the worker from an import string."""
    return Immediate()


def broken_factory() -> Immediate:
    """A client that cannot be built."""
    raise RuntimeError("cannot connect to the enrichment service at boot")


def marker_path(tmp: Path, name: str) -> str:
    """Where a crasher keeps its once-only marker."""
    return str(tmp / f"{name}.marker")
