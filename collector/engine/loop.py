"""The supervisor's own loop for a collector used from synchronous code.

::

    with Collector(...) ─► LoopThread.start() ─► uvloop loop on a daemon thread
                           the engine's coroutines run there (run_coroutine_threadsafe)
    close() / exit ──────► LoopThread.stop() ─► loop.stop, async generators closed, join

``async with Collector(...)`` needs none of this: the engine runs on the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

__all__ = ["LoopThread"]


class LoopThread:
    """A uvloop event loop running on a daemon thread of its own."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.ident: int | None = None  # the thread's id, once it runs

    def start(self) -> asyncio.AbstractEventLoop:
        """Start the thread; return its loop once it runs."""
        import uvloop

        loop = self.loop = uvloop.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self.ident = threading.get_ident()
            started.set()
            try:
                loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self.thread = threading.Thread(target=run, name=self.name, daemon=True)
        self.thread.start()
        started.wait()
        return loop

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and join the thread (bounded)."""
        if self.thread is not None and self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
            self.thread = None
