"""The handlers, one module per job; :class:`collector.http.app.App` puts them in its
route table, and each reaches the daemon only through :class:`collector.http.Backend`.

::

    App.route ─► ingest.IngestRoutes  POST /events, /events/batch
                  body ─► bodies ─► IdReader (ids, keys) ─► Backend.submit ─► per-item results
              ─► status.StatusRoutes  GET /metrics, /metrics/prometheus, /health, /ready, /openapi.json
                  Backend.metrics / stats / health / ready ─► JSON, promtext, openapi
"""
