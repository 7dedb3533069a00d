"""Peer (e): the benchmark job as a Bytewax 0.21 dataflow (run by ``python -m bytewax.run``).

Configured through the environment by :class:`collector.benchmarks.peers.BytewaxPeer`:
``COLLECTOR_BENCH_BW_DIR`` holds ``part<i>.jsonl`` and ``dicts.json``;
``COLLECTOR_BENCH_BW_PROC`` is this process's index. Each process lists only its own
partition, so the parts are spread one per process whatever Bytewax's hashing says.
The flow writes ``start-<part>`` (first read) and ``end-<worker>`` (close, with CPU
seconds, peak RSS and counts) so the harness times the data path only.
"""

from __future__ import annotations

import os
import time
from itertools import islice
from typing import Any

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from collector.benchmarks.common import peak_rss
from collector.playback import PlaybackEvent

DIR = os.environ.get("COLLECTOR_BENCH_BW_DIR", ".")
PROC = int(os.environ.get("COLLECTOR_BENCH_BW_PROC", "0"))
BATCH = 2048

with open(os.path.join(DIR, "dicts.json"), "rb") as _f:
    _d = msgspec.json.decode(_f.read())
REGIONS: dict[str, str] = _d["regions"]
MODELS: dict[str, str] = _d["models"]
_dec = msgspec.json.Decoder(PlaybackEvent)
_cpu0: list[float] = []  # CPU seconds at the first read: start-up is not the job's cost


class _Part(StatefulSourcePartition[bytes, None]):
    def __init__(self, name: str) -> None:
        self.name = name
        self.f = open(os.path.join(DIR, f"{name}.jsonl"), "rb")  # noqa: SIM115 - closed in close()
        self.started = False

    def next_batch(self) -> list[bytes]:
        if not self.started:
            self.started = True
            _cpu0.append(time.process_time())
            with open(os.path.join(DIR, f"start-{self.name}"), "w") as f:
                f.write(repr(time.time()))
        lines = list(islice(self.f, BATCH))
        if not lines:
            raise StopIteration
        return lines

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self.f.close()


class _Source(FixedPartitionedSource[bytes, None]):
    def list_parts(self) -> list[str]:
        return [f"part{PROC}"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _Part:
        return _Part(for_part)


class _SinkPart(StatelessSinkPartition[Any]):
    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.by_region: dict[str, int] = {}
        self.by_device: dict[str, int] = {}

    def write_batch(self, items: list[Any]) -> None:
        for kind_key, count in items:
            kind, _, key = kind_key.partition(":")
            (self.by_region if kind == "r" else self.by_device)[key] = count

    def close(self) -> None:
        out = {
            "t": time.time(),
            "cpu": time.process_time() - (_cpu0[0] if _cpu0 else 0.0),
            "rss": peak_rss(),
            "by_region": self.by_region,
            "by_device": self.by_device,
        }
        with open(os.path.join(DIR, f"end-{PROC}-{self.worker}"), "wb") as f:
            f.write(msgspec.json.encode(out))


class _Sink(DynamicSink[Any]):
    def build(self, step_id: str, worker_index: int, worker_count: int) -> _SinkPart:
        return _SinkPart(worker_index)


def _enrich(line: bytes) -> PlaybackEvent:
    e = _dec.decode(line)
    e.region = REGIONS[e.user_id]
    e.model = MODELS[e.device_type]
    return e


flow = Dataflow("collector-bench")
_events = op.map("enrich", op.input("in", flow, _Source()), _enrich)
_by_region = op.count_final("by_region", _events, lambda e: "r:" + e.region)
_by_device = op.count_final("by_device", _events, lambda e: "d:" + e.device_type)
op.output("out", op.merge("merge", _by_region, _by_device), _Sink())
