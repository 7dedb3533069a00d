"""The NATS ingress as the status endpoints show it: ``Views.ingress()`` (counters summed
over the ingresses a reload restarted, the running one's gauges and state), its
Prometheus lines and its place in the OpenAPI document. No server: a stand-in ingress."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from collector.config import NatsIngressConfig, ServerConfig
from collector.daemon.views import INGRESS_FIGURES, Views
from collector.http.openapi import document
from collector.http.promtext import ingress_lines
from collector.http.schemas import IngressStatus
from collector.ingress.nats_records import IngressState, IngressStats


class FakeIngress:
    """What Views reads of a NatsIngress."""

    def __init__(self, connected: bool = True, **counts: int) -> None:
        self.cfg = NatsIngressConfig(stream="S1", durable="d1", subjects=["s1.>"])
        self._stats = IngressStats(**counts)
        self.state = IngressState()
        self.connected = connected

    def stats_dict(self) -> dict[str, int]:
        return msgspec.structs.asdict(self._stats)


def test_the_figures_are_the_ingress_counters() -> None:
    assert set(INGRESS_FIGURES) == set(IngressStats.__struct_fields__)
    assert set(INGRESS_FIGURES) < set(IngressStatus.__struct_fields__)


def test_views_sum_counters_over_reloads_and_keep_the_running_gauges() -> None:
    v = Views()
    assert v.ingress() is None
    old: Any = FakeIngress(fetched=10, acked=9, nakked=1, num_pending=5, messages_inflight=3)
    v.consumer = old
    v.retire_ingress(old)
    stopped = v.ingress()
    assert stopped is not None and stopped.connected is False and stopped.acked == 9 and stopped.num_pending == 0
    new: Any = FakeIngress(fetched=4, acked=4, num_pending=7, num_ack_pending=2, messages_inflight=1)
    new.state.info_at = time.monotonic() - 0.5
    new.state.error("fetch: TimeoutError: x")
    v.consumer = new
    s = v.ingress()
    assert s is not None
    assert (s.fetched, s.acked, s.nakked) == (14, 13, 1)
    assert (s.num_pending, s.num_ack_pending, s.messages_inflight) == (7, 2, 1)
    assert s.connected and s.stream == "S1" and s.durable == "d1" and s.subjects == ["s1.>"]
    assert s.consumer_info_age_s is not None and 0.4 < s.consumer_info_age_s < 5
    assert s.last_error == "fetch: TimeoutError: x" and s.last_error_age_s is not None
    new.connected = False
    s2 = v.ingress()
    assert s2 is not None and s2.connected is False


def test_prometheus_lines_carry_stream_and_durable() -> None:
    v = Views()
    ing: Any = FakeIngress(acked=3, num_pending=2)
    v.consumer = ing
    s = v.ingress()
    assert s is not None
    text = "\n".join(ingress_lines(s))
    assert 'collector_ingress_acked_total{stream="S1",durable="d1"} 3' in text
    assert 'collector_ingress_connected{stream="S1",durable="d1"} 1' in text
    assert 'collector_ingress_num_pending{stream="S1",durable="d1"} 2' in text
    assert "# TYPE collector_ingress_messages_inflight gauge" in text
    assert "consumer_info_age" not in text  # never read yet


def test_openapi_lists_the_ingress() -> None:
    doc = document(ServerConfig())
    assert set(doc["paths"]["/ingress"]["get"]["responses"]) == {"200", "404"}
    comp = doc["components"]["schemas"]
    assert {"connected", "stream", "durable", "fetched", "acked", "nakked", "terminated", "messages_inflight",
            "num_pending", "num_ack_pending", "consumer_info_age_s", "last_error"} <= set(comp["IngressStatus"]["properties"])
    assert comp["Metrics"]["properties"]["ingress"]["anyOf"][0] == {"$ref": "#/components/schemas/IngressStatus"}
    assert "ingress" in comp["Health"]["properties"]


def test_subject_template_partitions_a_field() -> None:
    import pytest

    from collector.errors import ConfigError
    from collector.sinks.nats import SubjectTemplate, partition

    t = SubjectTemplate("cs.{event}.{user_id:p4}")
    assert t.fields == ["event", "user_id"] and not t.constant
    subjects = {t.render({"event": "page_view_start", "user_id": f"u{i}"}) for i in range(200)}
    assert subjects == {f"cs.page_view_start.{p}" for p in range(4)}
    # stable: one key, one partition, whatever the process (FNV-1a, not the salted hash)
    assert partition("u1", 4) == partition("u1", 4) == 3 and partition("", 3) == 0x811C9DC5 % 3
    assert t.render({"event": "x", "user_id": "a.b"}) == f"cs.x.{partition('a.b', 4)}"
    assert SubjectTemplate("events.{type}").render({"type": "a.b"}) == "events.a_b"
    for bad in ("x.{a:q3}", "x.{a:p0}", "x.{a:p}"):
        with pytest.raises(ConfigError, match="pN"):
            SubjectTemplate(bad)
