"""The daemon: engine + HTTP server on one uvloop loop, driven by signals and systemd.

::

    signals ──(handlers only queue)──► queue ─┐
                                              ▼
    main loop (≤ 1 s per turn): handle_term / handle_int / handle_hup
              ─► WATCHDOG=1 only while every worker's heartbeat is fresh
              ─► STATUS=<events/s, queue, workers> every few seconds
    HttpServer ─► App ─► Views ─► (Collector, Coalescer) ◄── swapped by a reload (Views.swap)

Start: workers up, port bound, then ``READY=1``. SIGTERM/SIGINT: ``STOPPING=1``, stop
accepting, finish in-flight requests, drain the engine and its sinks, exit 0 (1 if the
``shutdown_timeout`` ran out). SIGHUP: re-read the config; server options apply at once;
changes that need new workers start a new collector, switch new requests to it, then
drain the old one, so no request fails during a reload. A config that does not load is
logged and the running one kept.

With a ``[source]`` (``--source nats://…``) a JetStream ingress feeds the engine too:
started once the engine is up, stopped (its batches settled) before the engine drains
on SIGTERM, and before the swap on a reload, then started again on the new engine.
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

import msgspec

from ..config import DaemonConfig, NatsIngressConfig, engine_options, load_config
from ..engine import Collector
from ..errors import ConfigError, WorkerBootError
from ..http import App, HttpServer
from ..ingress.coalescer import Coalescer
from ..ingress.nats import NatsIngress, run_ingress
from ..packs import build_pipeline
from .notify import Notifier
from .views import Views

__all__ = ["EX_CONFIG", "Daemon", "apply_overrides"]

log = logging.getLogger("collector.daemon")

EX_CONFIG = 78  # sysexits: bad configuration (the unit's RestartPreventExitStatus)


class Daemon:
    """One daemon process. ``await Daemon(cfg, path).run()`` returns the exit code."""

    server: HttpServer  # set by run()
    app: App

    def __init__(self, config: DaemonConfig, config_path: str | None = None, *, notifier: Notifier | None = None,
                 port_file: str | None = None, overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        self.overrides = overrides or {}
        self.config_path = config_path
        self.notify = notifier or Notifier()
        self.port_file = port_file
        self.views = Views()  # the engine serving, as the HTTP routes see it
        self.port = 0
        self.signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self.ingress: NatsIngress | None = None  # the [source] consumer feeding the serving engine

    # ------------------------------------------------------------------ engine
    async def _new_engine(self, cfg: DaemonConfig) -> tuple[Collector, Coalescer]:
        cfg.resolved_data_dir().mkdir(parents=True, exist_ok=True)
        pipeline = build_pipeline(cfg)
        c = Collector(pipeline, **engine_options(cfg))
        await c.astart()
        return c, Coalescer(c, max_batch=cfg.engine.chunk_size * 4, max_ops=cfg.engine.coalesce_ops)

    # ------------------------------------------------------------------ ingress
    async def _start_ingress(self, collector: Collector, cfg: DaemonConfig) -> None:
        """Consume ``cfg.source`` into ``collector`` (returns once consuming; raises if it cannot start)."""
        if cfg.source is None:
            return
        s = cfg.source
        self.ingress = self.views.consumer = await run_ingress(collector, s)
        log.info("consuming %s stream %s (%s) as durable %s", s.url, s.stream, ",".join(s.subjects), s.durable,
                 extra={"fields": {"event": "ingress_started", "stream": s.stream, "durable": s.durable}})

    async def _stop_ingress(self, timeout: float) -> bool:
        """Stop the ingress and wait (at most ``timeout`` s) for its batches to settle; True if in time."""
        ing, self.ingress = self.ingress, None
        if ing is None or ing.task is None:
            return True
        ing.stop()
        clean = True
        try:
            await asyncio.wait_for(asyncio.shield(ing.task), timeout)
        except TimeoutError:
            clean = False
            log.error("the ingress did not stop within %.1f s; its unsettled messages are delivered again", timeout,
                      extra={"fields": {"event": "ingress_stop_timeout"}})
            ing.task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(ing.task, 5.0)
        except Exception as e:  # it had failed already: logged, nothing left to settle here
            log.error("the ingress ended with an error: %s", e, extra={"fields": {"event": "ingress_failed"}})
        self.views.retire_ingress(ing)
        return clean

    def _ingress_timeout(self, left: float) -> float:
        src = self.config.source
        return max(1.0, min(left, src.drain_timeout if src is not None else left))

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, drain; the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)  # handlers only queue
        try:
            self.views.serve(*await self._new_engine(self.config))
        except (WorkerBootError, ConfigError) as e:
            log.error("cannot start: %s", e, extra={"fields": {"event": "boot_failed"}})
            self.notify.status(f"boot failed: {e}"[:200])
            return EX_CONFIG
        self.app = App(self.views, self.config)
        self.server = HttpServer(self.app, self.config.server)
        self.app.attach(self.server)
        self.views.server = self.server
        try:
            self.port = await self.server.start()
        except OSError as e:
            log.error("cannot listen on %s:%s: %s", self.config.server.host, self.config.server.port, e,
                      extra={"fields": {"event": "bind_failed"}})
            await self.views.collector.aclose(timeout=5)
            return EX_CONFIG
        try:
            await self._start_ingress(self.views.collector, self.config)
        except Exception as e:  # the server unreachable: 1, so systemd tries again (78 would stop it)
            log.error("cannot start the [source] ingress: %s", e, extra={"fields": {"event": "ingress_failed"}})
            self.server.stop_accepting()
            await self.server.drain(1.0)
            await self.views.collector.aclose(timeout=5)
            return 1
        if self.port_file:
            Path(self.port_file).write_text(str(self.port))
        n = self.views.collector.nworkers
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
            c = self.views.collector
            if c.heartbeats_fresh(max_age=5 * c.heartbeat_interval):
                self.notify.watchdog()
            now = time.monotonic()
            if now - last_status >= 5.0:
                last_status = now
                self.notify.status(self.status_line())
            every = self.config.log.stats_interval
            if every and now - last_stats >= every:
                last_stats = now
                self.log_stats()
            ing = self.ingress
            if ing is not None and ing.task is not None and ing.task.done():  # run() never returns by itself
                err = ing.task.exception() if not ing.task.cancelled() else None
                log.error("the ingress stopped: %s", err, extra={"fields": {"event": "ingress_failed"}})
                await self._stop_ingress(1.0)
            if not c.running:  # halted after a fatal error (a worker keeps dying)
                log.error("the engine stopped: %s", c.fatal_error,
                          extra={"fields": {"event": "engine_halted"}})
                await self.handle_term(signal.SIGTERM)
                return 1

    async def handle_term(self, sig: signal.Signals) -> int:
        """Stop accepting, finish requests, drain engine and sinks; 0 if all in time."""
        t0 = time.monotonic()
        timeout = self.config.engine.shutdown_timeout
        self.views.stopping = True
        self.notify.stopping()
        st = self.views.collector.stats()
        log.info("%s: stopping; %d events in flight", sig.name, st.inflight_events,
                 extra={"fields": {"event": "stopping", "signal": sig.name, "inflight": st.inflight_events}})
        self.server.stop_accepting()
        # the ingress first: its fetched batches settle (acked) while the engine still runs
        clean = await self._stop_ingress(self._ingress_timeout(timeout))
        clean = await self.server.drain(max(1.0, timeout - (time.monotonic() - t0))) and clean
        left = max(1.0, timeout - (time.monotonic() - t0))
        await self.views.coalescer.aclose()
        await self.views.close_probes()
        final = self.views.metrics()
        await self.views.collector.aclose(timeout=left)
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
            new = apply_overrides(load_config(self.config_path), self.overrides)
        except ConfigError as e:
            log.error("reload failed, keeping the running config: %s", e, extra={"fields": {"event": "reload_failed"}})
            self.notify.ready(f"reload failed: {e}"[:200])
            return
        old = self.config
        if (new.server.host, new.server.port) != (old.server.host, old.server.port):
            log.warning("server.host/port changed: that needs a restart; the other changes apply now")
        self.app.configure(new)
        engine_changed = (new.engine, new.pipeline, new.sinks, new.deadletter, new.data_dir, new.sources,
                          new.enrich) != (old.engine, old.pipeline, old.sinks, old.deadletter, old.data_dir,
                                          old.sources, old.enrich)
        source_changed = engine_changed or new.source != old.source
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
            # the old ingress settles its batches on the old engine, then stops
            await self._stop_ingress(self._ingress_timeout(new.engine.shutdown_timeout))
            # new requests go to the new engine from here; /metrics sums the draining
            # engine too, so no counter dips during a reload
            retired, retired_co = self.views.swap(*fresh)
            await self._restart_ingress(new)
            await self.views.close_probes()
            await retired_co.aclose()
            deadline = time.monotonic() + new.engine.shutdown_timeout
            while retired.inflight_events and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            self.views.retire(retired)
            await retired.aclose(timeout=max(1.0, deadline - time.monotonic()))
        elif source_changed:
            await self._stop_ingress(self._ingress_timeout(new.engine.shutdown_timeout))
            await self._restart_ingress(new)
        log.info("reloaded %s (%s)", self.config_path, "new workers" if engine_changed else "server options only",
                 extra={"fields": {"event": "reloaded", "engine_replaced": engine_changed}})
        self.notify.ready(self.status_line())

    async def _restart_ingress(self, cfg: DaemonConfig) -> None:
        try:
            await self._start_ingress(self.views.collector, cfg)
        except Exception as e:  # HTTP ingest goes on; the next reload tries again
            log.error("reload: the [source] ingress did not start: %s", e, extra={"fields": {"event": "ingress_failed"}})

    # ------------------------------------------------------------------ status
    def log_stats(self) -> None:
        """One ``stats`` log line: the counters of /metrics."""
        m = self.views.metrics()
        fields = {k: getattr(m, k) for k in ("events_received", "events_processed", "events_failed",
                                              "current_queue_depth", "events_per_second", "duplicates_dropped",
                                              "deadlettered", "worker_restarts")}
        log.info("stats: %s", self.status_line(), extra={"fields": {"event": "stats", **fields}})

    def status_line(self) -> str:
        """One short line for ``systemctl status``."""
        st = self.views.collector.stats()
        alive = sum(1 for w in st.workers if w.alive)
        return (f"{st.processed_per_sec:,.0f} events/s, {st.inflight_events} in flight, "
                f"{alive}/{len(st.workers)} workers, port {self.port}")


def apply_overrides(cfg: DaemonConfig, o: dict[str, Any]) -> DaemonConfig:
    """``cfg`` with the command line's ``--host``, ``--port``, ``--workers``, ``--data-dir``, ``--pack``
    and ``--source``/``--stream``/``--subject``/``--durable`` applied."""
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
    if o.get("pack") is not None:
        out = msgspec.structs.replace(out, pipeline=msgspec.structs.replace(out.pipeline, pack=o["pack"]))
    src = {k: o[f] for k, f in (("url", "source"), ("stream", "stream"), ("subjects", "subject"),
                                 ("durable", "durable")) if o.get(f)}
    if src:
        if "url" in src and not str(src["url"]).startswith(("nats://", "tls://")):
            raise ConfigError(f"--source {src['url']!r}: only NATS JetStream is supported (nats://HOST:PORT)")
        if out.source is None and "url" not in src:
            raise ConfigError("--stream, --subject and --durable need --source nats://… or a [source] table")
        base = out.source or NatsIngressConfig()
        out = msgspec.structs.replace(out, source=msgspec.structs.replace(base, **src))
    return out
