"""A Rules stage inside a real Collector: blocked events come back per item as
``filtered`` with the rule's name, and ``Collector.aggregate(name)`` gives the exact
per-rule counters summed over both workers once their partials arrive."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import wait_until

from collector import Collector
from collector.playback import InMemoryClient, generate_events, playback_pipeline
from collector.stages.rules import decode_rules

pytestmark = pytest.mark.usefixtures("no_leaks")

RULES = {"name": "filters", "rules": [
    {"name": "errors-pass", "when": {"path": "error_code", "exists": True}, "action": "allow"},
    {"name": "low-bitrate", "when": {"path": "bitrate_kbps", "lt": 1000}, "action": "block"},
    {"name": "tag-tv", "when": {"path": "device_type", "regex": "^device-1"}, "action": "transform",
     "set": {"region": "tagged"}},
]}


def test_blocked_events_are_reported_per_item_and_counters_are_exact() -> None:
    events = generate_events(5_000, users=200, seed=7)
    p = playback_pipeline(InMemoryClient())
    # before enrichment (the pack's default place for lookups is after every stage)
    p = dataclasses.replace(p, stages=(*p.stages, decode_rules(RULES)))
    errs = [e.error_code is not None for e in events]
    low = [not err and e.bitrate_kbps < 1000 for e, err in zip(events, errs, strict=True)]
    tagged = [not err and not lo and e.device_type.startswith("device-1")
              for e, err, lo in zip(events, errs, low, strict=True)]
    assert any(low) and any(errs) and any(tagged)
    with Collector(p, workers=2, chunk_size=512) as c:
        res = c.handle(events).wait(timeout=60)
        assert res.failed_events == 0 and res.handled_events == len(events)
        filtered = sorted((x.index, x.kind, x.reason) for x in res.errors)
        assert filtered == [(i, "filtered", "blocked by rule 'low-bitrate'") for i, lo in enumerate(low) if lo]
        n_err, n_low, n_tag = sum(errs), sum(low), sum(tagged)
        want = {
            "errors-pass": {"evaluated": len(events), "matched": n_err, "allowed": n_err, "blocked": 0,
                            "transformed": 0, "missing": 0, "errors": 0, "routed": 0},
            "low-bitrate": {"evaluated": len(events) - n_err, "matched": n_low, "allowed": 0, "blocked": n_low,
                            "transformed": 0, "missing": 0, "errors": 0, "routed": 0},
            "tag-tv": {"evaluated": len(events) - n_err - n_low, "matched": n_tag, "allowed": 0, "blocked": 0,
                       "transformed": n_tag, "missing": 0, "errors": 0, "routed": 0},
        }
        wait_until(lambda: c.aggregate("filters") == want, 10, what="both workers' rule counters")
        assert c.aggregate("filters", "low-bitrate") == want["low-bitrate"]
