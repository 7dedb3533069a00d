"""Per-lookup words of the shared-memory stats: written per chunk, summed on read,
kept when a worker is replaced (collector.sources.metrics)."""

from __future__ import annotations

from types import SimpleNamespace

from collector import stats as S
from collector.protocol import LookupSummary
from collector.sources.fetch import ERROR_KINDS, error_kind
from collector.sources.guard import CircuitBreaker
from collector.sources.metrics import LookupMeter, percentile, read_sources


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def test_meter_writes_counters_kinds_breaker_and_latencies_that_survive_a_replaced_worker() -> None:
    clock = Clock()
    with S.StatsBlock(2) as block:
        br = CircuitBreaker(failures=2, reset_timeout=10, clock=clock)
        rt = SimpleNamespace(fetcher=SimpleNamespace(kinds=[0] * len(ERROR_KINDS)), breaker=br)
        m = LookupMeter(block.slots[0], 1, rt)  # the pipeline's second lookup
        rt.fetcher.kinds[ERROR_KINDS.index("http_status")] = 2
        br.failure()
        br.failure()  # opens
        m.record(LookupSummary(calls=3, hits=7, misses=5, coalesced=1, failures=5, keys_fetched=6,
                               breaker_opens=1, short_circuited=1, errors=2, latencies=[0.0015, 0.004, 0.2]))
        assert rt.fetcher.kinds == [0] * len(ERROR_KINDS), "the kinds are handed over once"
        out = read_sources(block, [("client_one", "client"), ("users", "http")])
        assert out["client_one"].events == 0 and out["client_one"].breaker is None
        u = out["users"]
        assert (u.calls, u.cache_hits, u.misses, u.coalesced, u.failures) == (3, 7, 5, 1, 5)
        assert u.keys_per_call == 2.0 and u.short_circuited == 1 and u.success_rate == round(1 - 5 / 12, 6)
        assert u.errors["http_status"] == 2 and sum(u.errors.values()) == 2
        assert u.breaker == "open" and u.breaker_workers == {"closed": 1, "open": 1, "half_open": 0}
        assert u.breaker_transitions == {"open": 1, "half_open": 0, "closed": 0}
        assert u.latency_ms["count"] == 3 and u.latency_ms["p50"] == 5.0 and u.latency_ms["p99"] == 250.0

        clock.t += 11  # half-open; a probe succeeds: closed
        assert br.allow()
        br.success()
        m.record(LookupSummary(calls=1, hits=1, latencies=[0.001]))
        u = read_sources(block, [("client_one", "client"), ("users", "http")])["users"]
        assert u.breaker == "closed" and u.breaker_transitions == {"open": 1, "half_open": 1, "closed": 1}

        # the worker is replaced: its counters move to the supervisor's slot, its gauge goes
        block.supervisor.absorb(block.slots[0])
        block.slots[0].reset()
        again = read_sources(block, [("client_one", "client"), ("users", "http")])["users"]
        assert (again.calls, again.cache_hits, again.errors, again.latency_ms["count"]) == (
            u.calls, u.cache_hits, u.errors, u.latency_ms["count"])
        assert again.breaker_workers == {"closed": 2, "open": 0, "half_open": 0}
        assert block.read().lookup_calls == 0  # the totals of the chunk figures are separate words


def test_percentile_is_a_bucket_upper_bound() -> None:
    b = [(1.0, 0), (2.0, 9), (5.0, 1), (float("inf"), 0)]
    assert percentile(b, 0.5) == 2.0 and percentile(b, 0.99) == 5.0
    assert percentile([(1.0, 0), (float("inf"), 3)], 0.5) == 1.0
    assert percentile([(1.0, 0)], 0.5) == 0.0


def test_error_kinds() -> None:
    from collector.sources.base import SourceError

    assert ERROR_KINDS[error_kind(TimeoutError())] == "timeout"
    assert ERROR_KINDS[error_kind(ConnectionRefusedError())] == "connection"
    assert ERROR_KINDS[error_kind(SourceError("HTTP 500", "http_status"))] == "http_status"
    assert ERROR_KINDS[error_kind(SourceError("bad", "invalid"))] == "invalid"
    assert ERROR_KINDS[error_kind(ValueError("x"))] == "other"


def test_failure_policy_counters_are_per_lookup_words_with_the_policy_shown() -> None:
    from collector import Lookup
    from collector.sources.metrics import policy_of

    with S.StatsBlock(2) as block:
        rt = SimpleNamespace()  # a client-method lookup: no fetcher, no breaker
        m0 = LookupMeter(block.slots[0], 0, rt)
        m1 = LookupMeter(block.slots[1], 0, rt)
        m0.record(LookupSummary(failures=3, kept=1, dead_lettered=2, held=2, recovered=0, log_suppressed=4))
        m1.record(LookupSummary(failures=0, held=5, recovered=5))
        lk = Lookup(name="p", key="k", target="t", method="m", on_missing="keep", on_error="hold", then="dead_letter")
        assert policy_of(lk) == {"not_found": "keep", "error": "hold", "then": "dead_letter"}
        assert policy_of(Lookup(name="p", key="k", target="t", method="m")) == {"not_found": "keep", "error": "keep"}
        u = read_sources(block, [("p", "client", policy_of(lk))])["p"]
        assert (u.kept, u.dead_lettered, u.held, u.recovered, u.log_suppressed) == (1, 2, 7, 5, 4)
        assert u.policy["error"] == "hold" and u.failures == 3
        block.supervisor.absorb(block.slots[0])  # a replaced worker's counts are kept
        block.slots[0].reset()
        assert read_sources(block, [("p", "client")])["p"].dead_lettered == 2
