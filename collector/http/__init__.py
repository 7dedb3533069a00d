"""The HTTP face of the daemon: ingest, metrics, health and the OpenAPI document."""
