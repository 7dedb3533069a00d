"""Ingress: the ways events reach an engine besides a direct ``handle()`` call.

::

    many small callers ──► coalescer.Coalescer ──► one ahandle() per loop turn ──► engine
                                                   each caller ◄── its SliceResult
    NATS JetStream ──► nats.NatsIngress (pull consumer) ──► ahandle() ──► engine
                       ack each message only after the sinks committed its events
                       (nats_setup: connect, stream and consumer; nats_settle: ack / nak /
                        term / dead-letter per message; nats_records: counters, records)

Each module here owns no engine: it is handed one and feeds it. Nothing is imported
here, so ``import collector.ingress`` stays cheap; import the module you need.
"""
