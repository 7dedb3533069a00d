"""The fault tests' ledger: what a client sent, what the server answered, what was stored.

Jepsen's categories, per event id:

* **lost**: acknowledged (answered ``accepted`` or ``duplicate``) but in no store;
* **unexpected**: stored but never sent;
* **duplicated**: stored more than once (counted, bounded by what was in flight);
* **recovered**: stored although its request failed or timed out (at-least-once).

A test records each attempt with :meth:`Ledger.answer` and each store's ids with
:meth:`Ledger.check`, then asserts ``lost == unexpected == 0``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ACKED = ("accepted", "duplicate")


@dataclass
class Verdict:
    """The ledger's figures against one store."""

    sent: int
    acked: int
    stored: int
    lost: list[str]
    unexpected: list[str]
    duplicated: int
    recovered: int

    def assert_clean(self) -> None:
        """Nothing acknowledged is missing and nothing unsent was stored."""
        assert not self.lost, f"{len(self.lost)} acknowledged ids are in no store, e.g. {self.lost[:5]}: {self}"
        assert not self.unexpected, f"{len(self.unexpected)} stored ids were never sent: {self.unexpected[:5]}"


@dataclass
class Ledger:
    """Ids sent, per-item answers received, ids stored."""

    sent: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    answers: Counter[str] = field(default_factory=Counter)

    def send(self, ids: Iterable[str]) -> None:
        """The client is about to send these ids."""
        self.sent.update(ids)

    def answer(self, results: list[dict[str, Any]] | None, ids: list[str]) -> None:
        """A batch answer's ``results`` (None: the request failed or timed out)."""
        if results is None:
            self.answers["no answer"] += len(ids)
            return
        for r in results:
            self.answers[r["status"]] += 1
            if r["status"] in ACKED:
                self.acked.add(r["id"])

    def check(self, stored: Iterable[str]) -> Verdict:
        """Compare with the ids one store holds (a list: repeats count as duplicates)."""
        counts = Counter(stored)
        held = set(counts)
        return Verdict(
            sent=len(self.sent),
            acked=len(self.acked),
            stored=len(held),
            lost=sorted(self.acked - held),
            unexpected=sorted(held - self.sent),
            duplicated=sum(n - 1 for n in counts.values()),
            recovered=len((held & self.sent) - self.acked),
        )
