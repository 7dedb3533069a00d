"""The handlers, one module per job: :mod:`.ingest` (events in) and :mod:`.status`
(metrics, health, readiness, the OpenAPI document). :class:`collector.http.app.App`
puts them in its route table."""
