"""Aggregates and pairing counters in a real daemon's Prometheus text (``GET /metrics``
with ``Accept: text/plain``), read from the supervisor's merged partials: the current
window's values as ``collector_aggregate_value``, bounded per aggregate by
``max_series``, and ``collector_pairs_*``. Two workers; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from conftest import wait_until
from paths import SUPPORT
from test_daemon import Daemon, _cli, start_daemon

CONFIG = '[pipeline]\npack = "stateful_pack:pipeline"\n'
LINE = re.compile(r"^(collector_(?:aggregate|pairs)_\w+(?:\{[^}]*\})?) (\S+)$")


def prometheus(d: Daemon) -> tuple[dict[str, float], str]:
    """The aggregate and pairing samples of the exposition, and its whole text."""
    status, _, body = d.request("GET", "/metrics", headers={"Accept": "text/plain"})
    assert status == 200
    text = body.decode()
    out = {}
    for ln in text.splitlines():
        m = LINE.match(ln)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out, text


def ev(i: int, type_: str, user: str, region: str = "eu", pv: str | None = None) -> dict[str, Any]:
    return {"id": f"e{i}", "type": type_, "user": user, "region": region, "pv": pv}


def test_aggregates_and_pairing_counters_in_the_prometheus_text(tmp_path: Path, no_leaks: None) -> None:
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(SUPPORT), os.environ.get("PYTHONPATH")]))}
    d = start_daemon(tmp_path, CONFIG, env=env, workers=2)
    try:
        plays = [ev(i, "play", f"u{i % 8}", "eu" if i % 4 else "us") for i in range(40)]  # u0..u7: 5 each
        plays += [ev(100 + i, "play", "u0") for i in range(3)] + [ev(200 + i, "play", "u1") for i in range(2)]
        pairs = [ev(300 + i, "start", f"p{i}", pv=f"v{i}") for i in range(4)]  # p0..p3 start
        pairs += [ev(400 + i, "end", f"p{i}", pv=f"v{i}") for i in range(3)]  # p0..p2 end: 3 pairs, p3 waits
        pairs += [ev(500, "end", "p9", pv="v9")]  # an end without a start: an orphan after 0.5 s
        status, body = d.post("/events/batch", {"events": plays + pairs})
        assert status == 202 and body["accepted"] == 53, body
        total = 53

        def settled() -> bool:
            p, _ = prometheus(d)
            return (p.get('collector_aggregate_value{aggregate="total",fn="count",window="global"}') == total
                    and p.get('collector_pairs_orphan_ends_total{stage="pair"}') == 1)

        wait_until(settled, 15, what="both workers' partials in the Prometheus text")
        p, text = prometheus(d)
        assert all(w["events"] > 0 for w in d.get("/metrics")[1]["workers"])  # users on both workers
        # a grouped aggregate: one series per group
        assert p['collector_aggregate_value{aggregate="by_region",fn="count",window="global",key="eu"}'] == 30 + 5 + 8
        assert p['collector_aggregate_value{aggregate="by_region",fn="count",window="global",key="us"}'] == 10
        assert p['collector_aggregate_groups{aggregate="by_region"}'] == 2
        # top_k: its K items, largest first, exact (sharded by user)
        tops = [(m.group(1), v) for k, v in p.items()
                if (m := re.fullmatch(r'collector_aggregate_value\{aggregate="top_users",fn="top_k",window="global",'
                                      r'key="(\w+)"\}', k))]
        assert sorted(tops, key=lambda kv: -kv[1]) == [("u0", 8), ("u1", 7), *tops[2:]] and len(tops) == 3
        # past its max_series: no values, the group count and truncated instead
        assert not any(k.startswith('collector_aggregate_value{aggregate="by_user"') for k in p)
        assert p['collector_aggregate_groups{aggregate="by_user"}'] >= 6  # u0..u7, p0..p3, p9 over 2 workers
        assert p['collector_aggregate_truncated{aggregate="by_user"}'] == 1
        assert p['collector_aggregate_truncated{aggregate="by_region"}'] == 0
        # a tumbling window: the current hour's count and its start
        assert p['collector_aggregate_value{aggregate="per_hour",fn="count",window="tumbling"}'] == total
        start = p['collector_aggregate_window_start_seconds{aggregate="per_hour"}']
        assert start % 3600 == 0 and start <= time.time() < start + 3600 + 60
        # prometheus=False: not shown at all (still an aggregate)
        assert 'aggregate="hidden"' not in text and d.get("/aggregates")[1]["hidden"] == {"play": 45, "start": 4,
                                                                                            "end": 4}
        assert p['collector_aggregate_events_total{aggregate="total"}'] == total
        assert p['collector_aggregate_matched_total{aggregate="top_users"}'] == 45
        assert p['collector_aggregate_skipped_total{aggregate="by_region",reason="missing_key"}'] == 0
        assert "# TYPE collector_aggregate_value gauge" in text
        # pairing: paired, the waiting start, the orphan end
        assert p['collector_pairs_paired_total{stage="pair"}'] == 3
        assert p['collector_pairs_pending{stage="pair",half="start"}'] == 1
        assert p['collector_pairs_pending{stage="pair",half="end"}'] == 0
        assert p['collector_pairs_expired_total{stage="pair"}'] == 0
        assert p['collector_pairs_duplicates_total{stage="pair",half="start"}'] == 0
        assert "# TYPE collector_pairs_paired_total counter" in text and "# TYPE collector_pairs_pending gauge" in text
        m = d.get("/metrics")[1]
        assert m["pairs"]["pair"]["paired"] == 3 and m["pairs"]["pair"]["orphan"] == 1
        assert d.get("/aggregates")[1]["pair"]["pending"] == 1
        # a duplicate start of the waiting key is counted under half="start"
        assert d.post("/events", ev(600, "start", "p3", pv="v3"))[1]["status"] == "accepted"
        wait_until(lambda: prometheus(d)[0].get('collector_pairs_duplicates_total{stage="pair",half="start"}') == 1,
                   10, what="the duplicate start")
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]


def test_check_config_declares_aggregates_and_pairs_and_names_bad_paths(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[stages]]\nkind = "aggregate"\nname = "per_minute"\nfn = "sum"\nvalue = "amount"\n'
                   'by = ["type", "source"]\nwindow = { kind = "tumbling", size = 60, time_field = "ts" }\n'
                   '[[stages]]\nkind = "pair"\nstart_type = "open"\nend_type = "close"\nkey = ["user"]\n')
    r = _cli("check-config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "aggregate per_minute: sum of amount by type, source, tumbling 60 s (event time: ts)" in r.stdout
    assert "pair pair: open + close on user, ttl 43200 s, store memory" in r.stdout
    for table, why in [
        ('kind = "aggregate"\nname = "x"\nwindow = { kind = "hopping", size = 60, hop = -5 }',
         "`$.stages[0].window.hop`: Expected `float` > 0.0"),
        ('kind = "aggregate"\nname = "x"\nwindow = { kind = "tumbling", sise = 60 }',
         "`$.stages[0].window.sise`: unknown field (its fields: lateness, retention, size, time_field)"),
        ('kind = "pair"\norphan_tll = 5', "`$.stages[0].orphan_tll`: unknown field of a 'pair' stage"),
        ('kind = "pair"\nttl = "12h"', "`$.stages[0].ttl`: Expected `float`, got `str`"),
    ]:
        cfg.write_text(f"[[stages]]\n{table}\n")
        r = _cli("check-config", str(cfg))
        assert r.returncode == 2 and why in r.stderr, (table, r.stderr)
