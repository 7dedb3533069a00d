"""Ingress: faces that pull events from outside and hand them to a running engine.

``collector.ingress.nats`` is a NATS JetStream pull consumer (:class:`NatsIngress`):
it acks a message only after the engine's sinks committed its events.
"""
