"""The NATS ingress's Structs: its counters and its dead-letter record.

:class:`IngressStats` is updated by the fetch loop (:mod:`.nats`), the settling of each
batch (:mod:`.nats_settle`) and the lag watch (:mod:`.nats_setup`); ``/metrics`` reads
a copy. :class:`NatsDeadLetter` is what :mod:`.nats_settle` writes for an event that
cannot be handed to the engine.
"""

from __future__ import annotations

import time

import msgspec

from ..sinks.base import DeadLetter

__all__ = ["IngressState", "IngressStats", "NatsDeadLetter"]


class IngressStats(msgspec.Struct):
    """The ingress's counters (messages unless said otherwise)."""

    fetched: int = 0
    events: int = 0  # events handed to the engine
    acked: int = 0
    nakked: int = 0
    redelivered: int = 0  # fetched with a delivery count above 1
    terminated: int = 0  # poison: delivered max_deliver times, dead-lettered
    deadlettered: int = 0  # events: invalid here or in a worker, or in a poison message
    fetch_errors: int = 0
    batches_inflight: int = 0
    messages_inflight: int = 0  # fetched, not yet settled (acked, nakked or terminated) by this collector
    num_pending: int = 0  # consumer lag: stream messages not yet delivered to the consumer
    num_ack_pending: int = 0  # delivered, not yet acknowledged (all collectors on the consumer)


class IngressState(msgspec.Struct):
    """What is not a counter: when the consumer's lag was last read, the last error."""

    info_at: float | None = None  # time.monotonic() of the last successful consumer info
    last_error: str | None = None
    last_error_at: float | None = None  # time.monotonic() of it

    def error(self, text: str) -> None:
        """Remember ``text`` as the last error (cut to 300 characters)."""
        self.last_error = text[:300]
        self.last_error_at = time.monotonic()


class NatsDeadLetter(DeadLetter, frozen=True):
    """A dead-letter record with the message's origin; ``collector replay`` reads it as a DeadLetter."""

    subject: str = ""
    stream: str = ""
    sequence: int = 0
    deliveries: int = 0
    index: int = 0  # the event's line in its message
