"""The error tree: every error the collector raises on purpose is a ``CollectorError``.

Messages say what was wrong, where (field path, worker index, config path) and the
likely fix. A worker's traceback travels back as text and is chained into the error
the caller sees (``WorkerError.__cause__`` is a ``RemoteTraceback``), as loky and
``concurrent.futures`` do.
"""

from __future__ import annotations

__all__ = [
    "CollectorClosed",
    "CollectorError",
    "ConfigError",
    "InvalidInput",
    "MissingDependency",
    "Overloaded",
    "RemoteTraceback",
    "WorkerBootError",
    "WorkerError",
]


class CollectorError(Exception):
    """Base class of every error the collector raises on purpose."""


class Overloaded(CollectorError):
    """In-flight work is at its bound; retry later (``retry_after`` seconds is a hint)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CollectorClosed(CollectorError):
    """The collector was closed (or halted after a fatal error) and takes no more work."""


class ConfigError(CollectorError):
    """A configuration value is wrong; the message names its path (``$.sinks[1].dsn``)."""


class InvalidInput(CollectorError):
    """A whole input could not be read at all (not one bad event: those go to ``errors``)."""


class MissingDependency(CollectorError, ImportError):
    """An optional driver is not installed; the message names the extra to install."""


class RemoteTraceback(Exception):
    """A traceback formatted in a worker process, shown as the cause of a ``WorkerError``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class WorkerError(CollectorError):
    """A worker process failed; ``worker`` is its slot index."""

    def __init__(self, message: str, worker: int | None = None, tb: str | None = None) -> None:
        super().__init__(message)
        self.worker = worker
        if tb:
            self.__cause__ = RemoteTraceback(tb)


class WorkerBootError(WorkerError):
    """A worker could not start (bad pipeline import, client that cannot be built).

    The collector halts instead of respawning in a loop; the worker's traceback is the
    ``__cause__``.
    """


def missing(module: str, extra: str, what: str) -> MissingDependency:
    """The error for an optional driver that is not installed."""
    return MissingDependency(
        f"{what} needs the {module!r} package, which is not installed; "
        f"install it with: pip install 'collector[{extra}]'"
    )
