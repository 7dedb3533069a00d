"""The daemon: engine + HTTP server on one uvloop loop, driven by signals and systemd.

::

    signals ──(handlers only queue)──► queue ─┐
                                              ▼
    main loop (≤ 1 s per turn): handle_term / handle_int / handle_hup
              ─► WATCHDOG=1 only while every worker's heartbeat is fresh
              ─► STATUS=<events/s, queue, workers> every few seconds
    HttpServer ─► App ─► (Collector, Coalescer) ◄── swapped by a reload

Start: workers up, port bound, then ``READY=1``. SIGTERM/SIGINT: ``STOPPING=1``, stop
accepting, finish in-flight requests, drain the engine and its sinks, exit 0 (1 if the
``shutdown_timeout`` ran out). SIGHUP: re-read the config; server options apply at once;
changes that need new workers start a new collector, switch new requests to it, then
drain the old one, so no request fails during a reload. A config that does not load is
logged and the running one kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from ..config import DaemonConfig, build_pipeline, engine_options, load_config
from ..errors import ConfigError, WorkerBootError
from .notify import Notifier

__all__ = ["EX_CONFIG", "Daemon", "run_daemon"]

log = logging.getLogger("collector.daemon")

EX_CONFIG = 78  # sysexits: bad configuration (the unit's RestartPreventExitStatus)
_COUNTERS = ("events_received", "events_processed", "events_failed", "duplicates_dropped",
             "deadlettered", "redelivered_chunks", "worker_restarts")


class Daemon:
    """One daemon process. ``await Daemon(cfg, path).run()`` returns the exit code."""

    def __init__(self, config: DaemonConfig, config_path: str | None = None, *, notifier: Notifier | None = None,
                 port_file: str | None = None, overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        self.overrides = overrides or {}
        self.config_path = config_path
        self.notify = notifier or Notifier()
        self.port_file = port_file
        self.collector: Any = None
        self.coalescer: Any = None
        self.server: Any = None
        self.app: Any = None
        self.port = 0
        self.stopping = False
        self.rejected = 0  # items the server refused before the engine (not JSON objects)
        self.started = time.monotonic()
        self.base = dict.fromkeys(_COUNTERS, 0)  # counters of collectors retired by reloads
        self.retiring: list[Any] = []  # collectors a reload is draining
        self.signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._probes: Any = None  # sinks built in the supervisor for /ready's probes
        self._probe_cache: tuple[float, dict[str, bool]] | None = None
        self._sink_prev: dict[str, tuple[int, int]] = {}  # name → (batches, errors) at the last /ready
        self._names: dict[int, str] = {}

    # ------------------------------------------------------------------ engine
    async def _new_engine(self, cfg: DaemonConfig) -> tuple[Any, Any]:
        from ..ingest import Coalescer
        from ..supervisor import Collector

        cfg.resolved_data_dir().mkdir(parents=True, exist_ok=True)
        pipeline = build_pipeline(cfg)
        c = Collector(pipeline, **engine_options(cfg))
        await c.astart()
        from ..sinks import sink_names

        self._names = dict(enumerate(sink_names(pipeline)))
        return c, Coalescer(c, max_batch=cfg.engine.chunk_size * 4, max_ops=cfg.engine.coalesce_ops)

    def engine(self) -> tuple[Any, Any]:
        """The current (collector, coalescer)."""
        return self.collector, self.coalescer

    def sink_names(self) -> dict[int, str]:
        """Sink index in the stats → its name."""
        return self._names

    def pipeline(self) -> Any:
        """The pipeline of the engine now serving."""
        return self.collector.pipeline

    async def submit(self, items: list[Any], keys: list[Any]) -> Any:
        """Events in, through the current coalescer."""
        return await self.coalescer.submit(items, keys)

    def count_rejected(self) -> None:
        """One item refused before the engine."""
        self.rejected += 1

    def stats(self) -> Any:
        """The current engine's statistics."""
        return self.collector.stats()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, drain; the process exit code."""
        from ..http import App, HttpServer

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)  # handlers only queue
        try:
            self.collector, self.coalescer = await self._new_engine(self.config)
        except (WorkerBootError, ConfigError) as e:
            log.error("cannot start: %s", e, extra={"fields": {"event": "boot_failed"}})
            self.notify.status(f"boot failed: {e}"[:200])
            return EX_CONFIG
        self.app = App(self, self.config)
        self.server = HttpServer(self.app, self.config.server)
        self.app.attach(self.server)
        try:
            self.port = await self.server.start()
        except OSError as e:
            log.error("cannot listen on %s:%s: %s", self.config.server.host, self.config.server.port, e,
                      extra={"fields": {"event": "bind_failed"}})
            await self.collector.aclose(timeout=5)
            return EX_CONFIG
        if self.port_file:
            Path(self.port_file).write_text(str(self.port))
        n = self.collector.nworkers
        log.info("listening on http://%s:%d with %d workers", self.config.server.host, self.port, n,
                 extra={"fields": {"event": "listening", "host": self.config.server.host, "port": self.port,
                                   "workers": n, "pid": os.getpid(),
                                   "data_dir": str(self.config.resolved_data_dir())}})
        # what startup built (modules, config, the engine) lives as long as the process:
        # out of the cyclic GC's reach, each full collection walks only what traffic made
        gc.collect()
        gc.freeze()
        self.notify.ready(self.status_line())
        code = await self.main_loop()
        return code

    async def main_loop(self) -> int:
        """Signals, watchdog and status, one turn at most every second."""
        interval = 1.0
        if self.notify.watchdog_interval:
            interval = min(interval, self.notify.watchdog_interval)
        last_status = 0.0
        last_stats = time.monotonic()
        while True:
            try:
                sig = await asyncio.wait_for(self.signals.get(), interval)
            except TimeoutError:
                sig = None
            if sig in (signal.SIGTERM, signal.SIGINT):
                return await self.handle_term(sig)
            if sig == signal.SIGHUP:
                await self.handle_hup()
            # fresher than the kill timeout: a stuck worker stops the pings well before
            # the supervisor gets round to killing it, so systemd sees it too
            if self.collector.heartbeats_fresh(max_age=5 * self.collector.heartbeat_interval):
                self.notify.watchdog()
            now = time.monotonic()
            if now - last_status >= 5.0:
                last_status = now
                self.notify.status(self.status_line())
            every = self.config.log.stats_interval
            if every and now - last_stats >= every:
                last_stats = now
                self.log_stats()
            if not self.collector.running:  # halted after a fatal error (a worker keeps dying)
                log.error("the engine stopped: %s", getattr(self.collector, "_fatal", None),
                          extra={"fields": {"event": "engine_halted"}})
                await self.handle_term(signal.SIGTERM)
                return 1

    async def handle_term(self, sig: signal.Signals) -> int:
        """Stop accepting, finish requests, drain engine and sinks; 0 if all in time."""
        t0 = time.monotonic()
        timeout = self.config.engine.shutdown_timeout
        self.stopping = True
        self.notify.stopping()
        st = self.collector.stats()
        log.info("%s: stopping; %d events in flight", sig.name, st.inflight_events,
                 extra={"fields": {"event": "stopping", "signal": sig.name, "inflight": st.inflight_events}})
        self.server.stop_accepting()
        clean = await self.server.drain(timeout)
        left = max(1.0, timeout - (time.monotonic() - t0))
        await self.coalescer.aclose()
        await self._close_probes()
        final = self.metrics()
        await self.collector.aclose(timeout=left)
        elapsed = time.monotonic() - t0
        log.info("stopped in %.2f s; %d events received, %d processed, %d failed", elapsed,
                 final.events_received, final.events_processed, final.events_failed,
                 extra={"fields": {"event": "stopped", "events_received": final.events_received,
                                   "events_processed": final.events_processed, "events_failed": final.events_failed,
                                   "clean": clean}})
        self.notify.close()
        return 0 if clean and elapsed <= timeout else 1

    async def handle_hup(self) -> None:
        """Reload the config file; replace the engine only when something it uses changed."""
        if self.config_path is None:
            log.info("SIGHUP: no config file (embedded defaults); nothing to reload")
            return
        self.notify.reloading()
        try:
            new = _override(load_config(self.config_path), self.overrides)
        except ConfigError as e:
            log.error("reload failed, keeping the running config: %s", e, extra={"fields": {"event": "reload_failed"}})
            self.notify.ready(f"reload failed: {e}"[:200])
            return
        old = self.config
        if (new.server.host, new.server.port) != (old.server.host, old.server.port):
            log.warning("server.host/port changed: that needs a restart; the other changes apply now")
        self.app.configure(new)
        engine_changed = (new.engine, new.pipeline, new.sinks, new.deadletter, new.data_dir) != (
            old.engine, old.pipeline, old.sinks, old.deadletter, old.data_dir)
        self.config = new
        if engine_changed:
            try:
                fresh = await self._new_engine(new)
            except (WorkerBootError, ConfigError) as e:
                log.error("reload: the new workers did not start, keeping the old ones: %s", e,
                          extra={"fields": {"event": "reload_failed"}})
                self.config = old
                self.app.configure(old)
                self.notify.ready(self.status_line())
                return
            retired, retired_co = self.collector, self.coalescer
            # /metrics sums the draining engine too, so no counter dips during a reload
            self.retiring.append(retired)
            self.collector, self.coalescer = fresh  # new requests go to the new engine from here
            await self._close_probes()
            await retired_co.aclose()
            deadline = time.monotonic() + new.engine.shutdown_timeout
            while retired.inflight_events and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            last = self._metrics_of(retired)
            for k in _COUNTERS:
                self.base[k] += last[k]
            self.retiring.remove(retired)
            await retired.aclose(timeout=max(1.0, deadline - time.monotonic()))
        log.info("reloaded %s (%s)", self.config_path, "new workers" if engine_changed else "server options only",
                 extra={"fields": {"event": "reloaded", "engine_replaced": engine_changed}})
        self.notify.ready(self.status_line())

    # ------------------------------------------------------------------ views
    def _metrics_of(self, collector: Any) -> dict[str, Any]:
        st = collector.stats()
        return {
            "events_received": st.received_events,
            "events_processed": st.total_events - st.failed_events,
            "events_failed": st.failed_events,
            "duplicates_dropped": st.duplicates_dropped,
            "deadlettered": st.deadlettered,
            "redelivered_chunks": st.redelivered_chunks,
            "worker_restarts": st.worker_restarts,
            "_stats": st,
        }

    def metrics(self) -> Any:
        """The ``/metrics`` JSON, summed over the engines this daemon ran."""
        from ..http.schemas import Metrics

        cur = self._metrics_of(self.collector)
        st = cur.pop("_stats")
        tot = {k: cur[k] + self.base[k] for k in _COUNTERS}
        for c in self.retiring:
            old = self._metrics_of(c)
            for k in _COUNTERS:
                tot[k] += old[k]
        tot["events_received"] += self.rejected
        tot["events_failed"] += self.rejected
        srv = self.server
        http = {str(k): v for k, v in sorted(srv.by_status.items())} if srv is not None else {}
        return Metrics(
            events_received=tot["events_received"],
            events_processed=tot["events_processed"],
            events_failed=tot["events_failed"],
            average_processing_latency_ms=round(st.avg_latency_ms, 3),
            current_queue_depth=st.inflight_events,
            active_workers=sum(1 for w in st.workers if w.alive),
            events_per_second=round(st.processed_per_sec, 1),
            uptime_seconds=round(time.monotonic() - self.started, 3),
            duplicates_dropped=tot["duplicates_dropped"],
            deadlettered=tot["deadlettered"],
            redelivered_chunks=tot["redelivered_chunks"],
            worker_restarts=tot["worker_restarts"],
            http_requests=http,
            workers=[{"index": w.index, "pid": w.pid, "alive": w.alive, "events": w.events, "failed": w.failed,
                      "events_per_second": round(w.processed_per_sec, 1), "inflight": w.inflight,
                      "heartbeat_age_s": round(w.heartbeat_age, 3), "avg_latency_ms": round(w.avg_latency_ms, 3)}
                     for w in st.workers],
            sinks=[{"name": self._names.get(s.index, str(s.index)), "rows": s.rows, "batches": s.batches,
                    "errors": s.errors, "retries": s.retries, "last_commit_ms": s.last_commit_ms} for s in st.sinks],
        )

    def health(self) -> Any:
        """Liveness: workers alive and heartbeats fresh."""
        from ..http.schemas import Health

        c = self.collector
        alive = sum(c.workers_alive())
        fresh = c.heartbeats_fresh()
        ok = c.running and fresh and not self.stopping
        detail = None if ok else ("stopping" if self.stopping else "a worker is down or silent")
        return Health("ok" if ok else "unhealthy", alive, c.nworkers, fresh, None, detail)

    async def ready(self) -> Any:
        """Readiness: healthy, and every sink answers its probe."""
        from ..http.schemas import Health

        h = self.health()
        sinks = await self.probe_sinks()
        ok = h.status == "ok" and all(sinks.values())
        detail = h.detail or (None if ok else "a sink is unreachable: " + ", ".join(k for k, v in sinks.items() if not v))
        return Health("ready" if ok else "not_ready", h.workers_alive, h.workers, h.heartbeats_fresh, sinks, detail)

    async def probe_sinks(self) -> dict[str, bool]:
        """Each sink's health: its own probe (``SELECT 1`` for SQL sinks, from the
        supervisor, at most once a second) and what the workers last saw.

        The workers' view is read from the stats (no message to workers): a sink whose
        error count grew since its last successful batch is reported down.
        """
        probed = await self._probe()
        st = self.collector.stats()
        prev = self._sink_prev
        out: dict[str, bool] = {}
        cur: dict[str, tuple[int, int]] = {}
        for s in st.sinks:
            name = self._names.get(s.index, str(s.index))
            p = prev.get(name)
            cur[name] = (s.batches, s.errors)
            out[name] = not (p is not None and s.errors > p[1] and s.batches == p[0]) and not (s.errors and not s.batches)
        for name in self._names.values():
            out.setdefault(name, True)
            cur.setdefault(name, (0, 0))
            out[name] = out[name] and probed.get(name, True)
        self._sink_prev = cur
        return out

    async def _probe(self) -> dict[str, bool]:
        now = time.monotonic()
        if self._probe_cache is not None and now - self._probe_cache[0] < 1.0:
            return self._probe_cache[1]
        if self._probes is None:
            from ..sinks import build_sinkset

            p = self.collector.pipeline
            # the same sink configs, never opened for writing: only health() is called
            self._probes = build_sinkset(list(p.sinks), event_type=p.event_type, id_field=p.id_field, worker=-1)
        res: dict[str, bool] = await self._probes.health()
        self._probe_cache = (time.monotonic(), res)
        return res

    async def _close_probes(self) -> None:
        probes, self._probes, self._probe_cache = self._probes, None, None
        if probes is not None:
            with contextlib.suppress(Exception):
                await probes.close()

    def log_stats(self) -> None:
        """One ``stats`` log line: the counters of /metrics."""
        m = self.metrics()
        fields = {k: getattr(m, k) for k in ("events_received", "events_processed", "events_failed",
                                              "current_queue_depth", "events_per_second", "duplicates_dropped",
                                              "deadlettered", "worker_restarts")}
        log.info("stats: %s", self.status_line(), extra={"fields": {"event": "stats", **fields}})

    def status_line(self) -> str:
        """One short line for ``systemctl status``."""
        st = self.collector.stats()
        alive = sum(1 for w in st.workers if w.alive)
        return (f"{st.processed_per_sec:,.0f} events/s, {st.inflight_events} in flight, "
                f"{alive}/{len(st.workers)} workers, port {self.port}")


def run_daemon(config_path: str | None, *, overrides: dict[str, Any] | None = None, port_file: str | None = None) -> int:
    """Load the config (with CLI overrides), set up JSON logs, run the daemon on uvloop."""
    import uvloop

    from ..logs import setup_logging

    try:
        cfg = load_config(config_path)
        if overrides:
            cfg = _override(cfg, overrides)
    except ConfigError as e:
        setup_logging("INFO", json=True)
        log.error("%s", e, extra={"fields": {"event": "config_error"}})
        return EX_CONFIG
    os.environ["COLLECTOR_LOG_FORMAT"] = "json"  # spawned workers log JSON lines too
    setup_logging(cfg.log.level, json=True)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(Daemon(cfg, config_path, port_file=port_file, overrides=overrides).run())


def _override(cfg: DaemonConfig, o: dict[str, Any]) -> DaemonConfig:
    import msgspec

    server = cfg.server
    engine = cfg.engine
    if o.get("host") is not None:
        server = msgspec.structs.replace(server, host=o["host"])
    if o.get("port") is not None:
        server = msgspec.structs.replace(server, port=o["port"])
    if o.get("workers") is not None:
        engine = msgspec.structs.replace(engine, workers=o["workers"])
    out = msgspec.structs.replace(cfg, server=server, engine=engine)
    if o.get("data_dir") is not None:
        out = msgspec.structs.replace(out, data_dir=o["data_dir"])
    return out
