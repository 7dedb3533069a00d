"""Added cost per event of a 10-rule ``Rules`` stage on the in-memory path (a plain script).

    .venv/bin/python bench/rules.py [--events 200000] [--rounds 5]

Generic-pack events (``data`` a dict with a user agent, a user type, a score, ...),
in chunks of 2048, through a stage of ten rules of the common kinds: regex, ``in``,
``eq``, ``ge``/``lt``, ``range``, ``contains``, ``exists``, ``all``/``any``/``not``,
one transform. Most events match no rule, so every rule runs on nearly every event
(the worst case for first-decision order). Reports ns per event: the median of
``--rounds`` runs in CPU time (``time.process_time``). Issue 13's target is 500 ns.

A loaded or shared machine inflates every figure alike, so the script also times a
plain Python loop reading one attribute per event (about 10-15 ns on an idle modern
core): the stage's cost divided by it is the figure to compare across machines.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

from collector.benchmarks.common import attribute_read_ns
from collector.packs.generic import GenericEvent
from collector.stages.rules import decode_rules

RULES: dict[str, Any] = {"name": "bench", "rules": [
    {"name": "bots", "when": {"path": "data.user_agent", "regex": "(?i)bot|crawler|spider"}, "action": "block"},
    {"name": "internal", "when": {"path": "source", "eq": "system"}, "action": "allow"},
    {"name": "premium", "when": {"path": "data.user_type", "in": ["premium", "enterprise"]},
     "action": "transform", "set": {"data.route": "high_value"}},
    {"name": "huge", "when": {"path": "data.value", "ge": 1_000_000}, "action": "block"},
    {"name": "negative", "when": {"path": "data.value", "lt": 0}, "action": "block"},
    {"name": "perfect", "when": {"all": [{"path": "data.score", "eq": 100}, {"path": "data.items", "ge": 5}]},
     "action": "allow"},
    {"name": "test-users", "when": {"path": "user_id", "contains": "test-"}, "action": "block"},
    {"name": "odd-range", "when": {"path": "data.score", "range": [101, 1000]}, "action": "block"},
    {"name": "no-user", "when": {"not": {"path": "user_id", "exists": True}}, "action": "allow"},
    {"name": "sensor-or-log", "when": {"any": [{"path": "type", "eq": "sensor_data"}, {"path": "type", "eq": "x"}]},
     "action": "allow"},
]}


def events(n: int, seed: int = 1) -> list[GenericEvent]:
    rnd = random.Random(seed)
    return [
        GenericEvent(type="user_action", source=rnd.choice(["web", "mobile"]), user_id=f"u{rnd.randrange(10_000)}",
                     data={"user_agent": "Mozilla/5.0 (X11; Linux x86_64)", "user_type": rnd.choice(["free", "basic"]),
                           "value": rnd.randrange(1000), "score": rnd.randrange(100), "items": rnd.randrange(10)})
        for _ in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    evs = events(a.events)
    chunks = [evs[i:i + 2048] for i in range(0, len(evs), 2048)]
    run = decode_rules(RULES).build()
    times = []
    for _ in range(a.rounds):
        t0 = time.process_time()
        for ch in chunks:
            run(ch)
        times.append((time.process_time() - t0) / len(evs) * 1e9)
    base = []
    for _ in range(a.rounds):  # the loop alone: a stage that does nothing
        t0 = time.process_time()
        for ch in chunks:
            (lambda es: [])(ch)
        base.append((time.process_time() - t0) / len(evs) * 1e9)
    ref = attribute_read_ns(chunks, "data", a.rounds)  # calibration
    per = statistics.median(times) / ref
    print(f"calibration: a Python loop reading one attribute: {ref:.1f} ns/event; "
          f"the 10 rules cost {per:.0f} of those")
    print(f"10 rules: {statistics.median(times):.0f} ns/event (median of {a.rounds}; best {min(times):.0f}); "
          f"empty stage {statistics.median(base):.1f} ns/event; {len(evs)} events, chunks of 2048")
    counts = run.spec.merge([run.snapshot()])
    for name, c in counts.items():  # what the rules did (most events match none)
        print(f"  {name:14} " + " ".join(f"{k}={v}" for k, v in c.items() if v))


if __name__ == "__main__":
    main()
