"""StatsBlock.read: the sums it takes in C (one integer per slot) and the sums it reuses
between reads, checked against figures computed here word by word."""

from __future__ import annotations

import pytest

from collector import stats as S


def test_counters_near_the_word_limit_and_negative_gauges_stay_in_their_words() -> None:
    with S.StatsBlock(2) as block:
        a, b, sup = block.slots
        a.add(S.EVENTS, 2**62 + 5)
        b.add(S.EVENTS, 2**62 + 7)
        sup.add(S.EVENTS, 3)  # a replaced worker's, or events rejected before any worker saw them
        for s, n in ((a, 1), (b, 2), (sup, 4)):
            s.add(S.FAILED, n)
            s.add(S.LOOKUP_FAILURES, 10 * n)
            s.add(S.LAT_SUM_US, 1000 * n)
            s.add(S.LAT_COUNT, n)
        a.set(S.INFLIGHT, -5)  # a gauge between two counters: never summed, never spilled
        b.set(S.INFLIGHT, 2**63 - 1)
        st = block.read([True, True])
        assert st.total_events == 2**63 + 15
        assert (st.failed_events, st.lookup_failures) == (7, 70)
        assert st.avg_latency_ms == pytest.approx(1.0)
        assert [w.inflight for w in st.workers] == [-5, 2**63 - 1]
        assert [w.events for w in st.workers] == [2**62 + 5, 2**62 + 7]


def test_sinks_sum_over_slots_and_take_the_slowest_workers_last_commit() -> None:
    with S.StatsBlock(2) as block:
        a, b, sup = block.slots
        a.sink_add(0, rows=10, batches=1, latency_s=0.002)
        b.sink_add(0, rows=20, batches=2, latency_s=0.005)
        b.sink_add(3, errors=1, retries=2)
        sup.sink_add(0, rows=7, batches=1)  # what a replaced worker committed
        st = block.read()
        assert [(k.index, k.rows, k.batches, k.errors, k.retries) for k in st.sinks] == [(0, 37, 4, 0, 0), (3, 0, 0, 1, 2)]
        assert st.sinks[0].last_commit_ms == pytest.approx(5.0)


def test_a_read_after_a_change_sees_it_and_reads_hand_out_their_own_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [500.5]
    monkeypatch.setattr(S.time, "monotonic", lambda: now[0])
    with S.StatsBlock(2) as block:
        block.started = 400.0
        a = block.slots[0]
        a.count_processed(100, 1, 0.001)
        first = block.read()
        again = block.read()  # nothing changed: the same figures, in new lists
        assert again == first
        assert again.latency_buckets_ms is not first.latency_buckets_ms and again.workers is not first.workers
        first.latency_buckets_ms.clear()
        first.sinks.append(S.SinkStats(9, 1, 1, 0, 0, 0.0))
        assert block.read().latency_buckets_ms == again.latency_buckets_ms and block.read().sinks == []
        a.count_processed(50, 0, 0.001)  # a worker acks a chunk between two reads
        st = block.read()
        assert (st.total_events, st.failed_events, st.chunks) == (150, 1, 2)
        assert st.workers[0].events == 150 and sum(n for _, n in st.latency_buckets_ms) == 2
        now[0] = 507.5  # the same bytes, a later second: the events left the rate window
        assert block.read().processed_per_sec == 0.0 and block.read().total_events == 150


def test_a_worker_busy_every_second_of_its_ring_counts_the_window_only(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.5]
    monkeypatch.setattr(S.time, "monotonic", lambda: now[0])
    with S.StatsBlock(2) as block:
        block.started = 900.0
        for sec in range(993, 1001):  # seconds 993 .. 1000 each counted 10 * (sec - 990) events
            now[0] = sec + 0.5
            block.slots[0].count_processed(10 * (sec - 990), 0, 0.001)
        block.slots[1].count_processed(7, 0, 0.001)  # second 1000 only
        st = block.read()
        window = sum(10 * (sec - 990) for sec in range(995, 1001))  # [1000 - 5, 1000]
        assert st.workers[0].processed_per_sec == pytest.approx(window / 5.5)
        assert st.processed_per_sec == pytest.approx((window + 7) / 5.5)
