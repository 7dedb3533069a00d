"""The daemon's wiring of issues 11 and 14: ``[[sources]]``/``[[enrich]]`` from its TOML,
and ``collector serve --source nats://…`` consuming a JetStream stream.

Real daemon processes (``tests/test_daemon.start_daemon``), the built-in rates service,
the real NATS server for the ingress (its stream deleted after); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _need, wait_until
from ledger import Ledger
from test_daemon import Daemon, start_daemon, with_kill

from collector.config import DaemonConfig, NatsIngressConfig
from collector.daemon import apply_overrides
from collector.errors import ConfigError
from collector.sources.rates import DEFAULT_RATES, RatesService

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]

SOURCES = """
[[sources]]
name = "segments"
kind = "map"
data = {{ USD = "americas", GBP = "europe", EUR = "eurozone" }}

[[sources]]
name = "fx"
kind = "rates"
url = "{rates_url}"

[[enrich]]
source = "segments"
key = "user_id"
target = "segment"

[[enrich]]
source = "fx"
key = "user_id"
target = "data"
name = "rate"
"""


def check_config(tmp: Path, text: str) -> subprocess.CompletedProcess[str]:
    f = tmp / "check.toml"
    f.write_text(text)
    return subprocess.run([sys.executable, "-m", "collector", "check-config", str(f)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_enrich_steps_from_the_toml_fill_the_stored_rows(tmp_path: Path) -> None:
    """A map source and a rates source named in [[enrich]] steps enrich the generic pack's events."""
    svc = RatesService()
    with svc.running():
        d = start_daemon(tmp_path, SOURCES.format(rates_url=svc.url) + "\n[pipeline]\nenrich_latency = 0\n", workers=1)
        try:
            currencies = ["USD", "GBP", "EUR"] * 10
            evs = [{"id": f"fx-{i}", "type": "user_action", "source": "web", "user_id": c, "data": {"n": i}}
                   for i, c in enumerate(currencies)]
            for i in range(0, len(evs), 10):
                status, body = d.post("/events/batch", {"events": evs[i:i + 10]})
                assert status == 202 and body["accepted"] == 10, body
            rows = {r["id"]: r for r in d.stored()}
            assert sorted(rows) == sorted(e["id"] for e in evs)
            seg = {"USD": "americas", "GBP": "europe", "EUR": "eurozone"}
            for e in evs:
                r = rows[e["id"]]
                assert r["segment"] == seg[e["user_id"]], r  # the map step replaced the pack's segment lookup
                assert str(r["data"]) == DEFAULT_RATES[e["user_id"]], r  # the rate (a Decimal, stored as text)
        finally:
            assert d.stop() == 0


def test_check_config_names_the_path_of_a_bad_source_or_step(tmp_path: Path) -> None:
    ok = check_config(tmp_path, SOURCES.format(rates_url="http://127.0.0.1:1/latest"))
    assert ok.returncode == 0, ok.stderr
    assert "lookup rate: data from user_id via 'fx'" in ok.stdout

    typo = check_config(tmp_path, '[[sources]]\nname = "s"\nkind = "http"\nurll = "http://x/{key}"\n')
    assert typo.returncode == 2
    assert "`urll`" in typo.stderr and "$.sources[0]" in typo.stderr and "check.toml" in typo.stderr, typo.stderr

    unknown = check_config(tmp_path, SOURCES.format(rates_url="http://x/latest").replace('source = "fx"', 'source = "fxx"'))
    assert unknown.returncode == 2
    assert "$.enrich[1].source" in unknown.stderr and "'fxx'" in unknown.stderr, unknown.stderr

    field = check_config(tmp_path, SOURCES.format(rates_url="http://x/latest").replace('target = "data"', 'target = "rate"'))
    assert field.returncode == 2
    assert "$.enrich[1].target" in field.stderr and "'rate'" in field.stderr and "GenericEvent" in field.stderr

    src = check_config(tmp_path, '[source]\nkind = "kafka"\n')
    assert src.returncode == 2 and "$.source.kind" in src.stderr, src.stderr


def test_source_flags_override_the_source_table() -> None:
    cfg = apply_overrides(DaemonConfig(), {"source": "nats://h:4222", "stream": "S", "subject": ["S.>"], "durable": "D"})
    assert cfg.source == NatsIngressConfig(url="nats://h:4222", stream="S", subjects=["S.>"], durable="D")
    base = DaemonConfig(source=NatsIngressConfig(batch=7))
    assert apply_overrides(base, {"stream": "T"}).source == NatsIngressConfig(batch=7, stream="T")
    with pytest.raises(ConfigError, match="need --source"):
        apply_overrides(DaemonConfig(), {"stream": "S"})
    with pytest.raises(ConfigError, match="nats://"):
        apply_overrides(DaemonConfig(), {"source": "kafka://h:9092"})


# ---------------------------------------------------------------------- --source nats://


@pytest.mark.services
def test_serve_with_a_nats_source_stores_every_published_id(tmp_path: Path) -> None:
    """--source nats://: published ids all stored (ledger), /metrics shows the ingress, a reload
    restarts it on the new engine, HTTP ingest goes on, SIGTERM exits 0 with nothing unacked."""
    nats = pytest.importorskip("nats")
    from test_nats import Names, consumer_state, events, jetstream

    url = _need(os.environ.get("COLLECTOR_NATS_URL") or "nats://127.0.0.1:4222", 4222, "NATS")
    names = Names()
    assert nats is not None

    def publish(evs: list[dict[str, object]], led: Ledger, per_message: int) -> None:
        f = tmp_path / "in.ndjson"
        f.write_text("".join(json.dumps(e) + "\n" for e in evs))
        ids = [str(e["id"]) for e in evs]
        led.send(ids)
        r = subprocess.run([sys.executable, "-m", "collector", "publish", "--file", str(f), "--to", url,
                            "--subject", f"{names.prefix}.file", "--per-message", str(per_message)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        led.acked.update(ids)  # every PubAck came: the stream holds them

    async def main() -> None:
        async with jetstream(url, names) as js:
            d: Daemon | None = None
            try:
                d = start_daemon(tmp_path, "[pipeline]\nenrich_latency = 0\n", workers=1, args=[
                    "--source", url, "--stream", names.stream, "--subject", f"{names.prefix}.>",
                    "--durable", names.durable])
                dd = d
                wait_until(lambda: any(r.get("event") == "ingress_started" for r in dd.logs()), 30,
                           what="the ingress to start")
                led = Ledger()
                first = events(400)
                await asyncio.to_thread(publish, first, led, 1)
                wait_until(lambda: len(dd.stored()) >= 400, 60, what="the first 400 events stored")
                # stored comes before acked: a message is acked once its operation completed
                wait_until(lambda: dd.get("/metrics")[1]["ingress"]["acked"] >= 400, 10, what="every message acked")
                status, m = d.get("/metrics")
                assert status == 200 and m["ingress"]["acked"] == 400 and m["ingress"]["events"] == 400, m["ingress"]
                ing = m["ingress"]
                assert ing["connected"] is True and ing["stream"] == names.stream and ing["durable"] == names.durable
                assert ing["messages_inflight"] == 0 and ing["terminated"] == 0 and ing["nakked"] == 0, ing
                # the consumer info is read in the background, at most once a second: wait
                # for one read after the last ack reached the server
                wait_until(lambda: (lambda i: i["num_pending"] == 0 and i["num_ack_pending"] == 0)(dd.get("/ingress")[1]),
                           10, what="the consumer info to show no pending and no ack-pending message")
                status, ing = d.get("/ingress")
                assert status == 200 and ing["num_pending"] == 0 and ing["num_ack_pending"] == 0, ing
                status, ready = d.get("/ready")
                assert status == 200 and ready["ingress"]["connected"] is True, ready
                status, _, prom = d.request("GET", "/metrics/prometheus")
                lab = f'{{stream="{names.stream}",durable="{names.durable}"}}'.encode()
                assert b"collector_ingress_acked_total" + lab + b" 400" in prom, prom[-2000:]
                assert b"collector_ingress_connected" + lab + b" 1" in prom
                assert b"collector_ingress_num_pending" + lab in prom

                # HTTP ingest alongside
                status, body = d.post("/events", {"id": "http-1", "type": "user_action", "source": "web"})
                assert status == 202, body

                # a reload that replaces the engine stops the ingress and starts one on the new engine
                d.cfg.write_text("[pipeline]\nenrich_latency = 0\n[engine]\nchunk_size = 512\n")
                d.proc.send_signal(signal.SIGHUP)
                wait_until(lambda: any(r.get("event") == "reloaded" for r in dd.logs()), 60, what="the reload")
                assert sum(r.get("event") == "ingress_started" for r in d.logs()) == 2
                second = events(500)
                await asyncio.to_thread(publish, second, led, 10)  # NDJSON: 10 events per message
                wait_until(lambda: len(dd.stored()) >= 901, 60, what="all events stored")
                status, m = d.get("/metrics")
                assert m["ingress"]["acked"] == 450 and m["ingress"]["events"] == 900, m["ingress"]

                assert d.stop() == 0
                stored = [r["id"] for r in d.stored()]
                assert "http-1" in stored
                verdict = led.check([i for i in stored if i != "http-1"])
                verdict.assert_clean()
                assert verdict.stored == 900 and verdict.duplicated == 0, verdict
                st = await consumer_state(js, names)
                assert st.num_ack_pending == 0 and st.num_pending == 0, st
                stopping = [r for r in d.logs() if r.get("event") == "stopped"]
                assert stopping and stopping[-1]["clean"] is True
            finally:
                if d is not None and d.proc.poll() is None:
                    with_kill(d.proc)

    asyncio.run(main())


def test_aggregate_stages_from_the_toml_are_read_over_http(tmp_path: Path) -> None:
    """[[stages]] adds an aggregate to the generic pack; GET /aggregates and
    /processor/aggregation read it merged over both workers (at most 0.25 s behind)."""
    cfg = ('[[stages]]\nkind = "aggregate"\nname = "by_type"\nfn = "count"\nby = "type"\n'
           '[[stages]]\nkind = "aggregate"\nname = "top_users"\nfn = "top_k"\nby = "user_id"\nk = 2\n'
           "[pipeline]\nenrich_latency = 0\n")
    d = start_daemon(tmp_path, cfg, workers=2)
    try:
        types = ["user_action"] * 30 + ["sensor_data"] * 20 + ["system_log"] * 10
        evs = [{"type": t, "source": "web", "user_id": f"u{i % 3}", "data": {}} for i, t in enumerate(types)]
        for i in range(0, len(evs), 20):
            status, body = d.post("/events/batch", {"events": evs[i:i + 20]})
            assert status == 202 and body["accepted"] == 20, body
        wait_until(lambda: d.get("/aggregates")[1].get("by_type") == {"user_action": 30, "sensor_data": 20,
                                                                       "system_log": 10}, 10, what="the partials")
        status, one = d.get("/processor/aggregation?aggregator=by_type&key=sensor_data")
        assert status == 200 and one["value"] == 20
        status, top = d.get("/processor/aggregation?aggregator=top_users")
        assert status == 200 and [n for _, n in top["value"]] == [20, 20]
        assert d.get("/processor/aggregation?aggregator=nope")[0] == 404
    finally:
        assert d.stop() == 0


@pytest.mark.services
def test_ready_and_ingress_show_a_nats_outage(tmp_path: Path) -> None:
    """A private nats-server under a daemon's --source: stopped, /ready answers 503 and
    /ingress says disconnected (with the error); started again, both recover."""
    import shutil
    import socket

    exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.path.exists(exe):
        if os.environ.get("COLLECTOR_REQUIRE_SERVICES") == "1":
            pytest.fail("nats-server binary not found (COLLECTOR_REQUIRE_SERVICES=1)")
        pytest.skip("nats-server binary not found")
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"

    def server() -> subprocess.Popen[bytes]:
        cmd = [exe, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "js")]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        with socket.socket() as sk:
            return sk.connect_ex(("127.0.0.1", port)) == 0

    srv = server()
    d: Daemon | None = None
    try:
        wait_until(up, 15, what="private nats-server up")
        d = start_daemon(tmp_path, "[pipeline]\nenrich_latency = 0\n", workers=1,
                         args=["--source", url, "--stream", "OUTAGE", "--subject", "outage.>", "--durable", "o"])
        dd = d
        status, ready = d.get("/ready")
        assert status == 200 and ready["ingress"]["connected"] is True and ready["ingress"]["stream"] == "OUTAGE"
        srv.terminate()
        srv.wait(15)
        wait_until(lambda: dd.get("/ready")[0] == 503, 15, what="/ready 503 while NATS is down")
        status, ready = d.get("/ready")
        assert ready["status"] == "not_ready" and "NATS ingress is not connected" in ready["detail"], ready
        status, ing = d.get("/ingress")
        assert status == 200 and ing["connected"] is False and ing["last_error"], ing
        assert d.get("/health")[0] == 200  # alive: HTTP ingest still works
        srv = server()
        wait_until(up, 15, what="private nats-server up again")
        wait_until(lambda: dd.get("/ready")[0] == 200, 30, what="/ready 200 once reconnected")
        assert d.get("/ingress")[1]["connected"] is True
        assert d.stop() == 0
    finally:
        if d is not None:
            with_kill(d.proc)
        if srv.poll() is None:
            srv.terminate()
            srv.wait(15)
