"""``GET /aggregates``, ``/processor/aggregation``, ``/processor/filters`` and ``/materialized``.

::

    GET /aggregates ─────────────────────────── backend.aggregates() ─► {name: value}
    GET /processor/filters ── each Rules stage of backend.pipeline() ─► backend.aggregate(stage)
    GET /processor/aggregation?aggregator=N&key=K&start=S&end=E ─► backend.aggregate(...)
    GET /materialized (and /views/NAME) ─────── backend.view(name) ─► the view's JSON

Reads merge the workers' last published partials in the supervisor: they never wait for
a worker, and are at most one snapshot interval (0.25 s) behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from ..protocol import Request, Response, error
from ..schemas import json_encoder

if TYPE_CHECKING:
    from ..backend import Backend

__all__ = ["AggregateRoutes", "plain"]


def plain(value: Any) -> Any:
    """JSON-ready values: tuple group keys (``by`` several fields) joined with ``|``."""
    if isinstance(value, dict):
        return {("|".join(map(str, k)) if isinstance(k, tuple) else k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class AggregateRoutes:
    """The aggregate read handlers."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def get_aggregates(self, req: Request) -> Response:
        """Every aggregate of the pipeline, by name."""
        return Response(200, json_encoder.encode(plain(self.backend.aggregates())))

    def get_aggregation(self, req: Request) -> Response:
        """One aggregate (seed 003): ``aggregator`` names it; ``key``, ``start``, ``end`` narrow it."""
        q = {k: v[-1] for k, v in parse_qs(req.query, keep_blank_values=True).items()}
        unknown = sorted(set(q) - {"aggregator", "key", "start", "end"})
        if unknown:
            return error(400, "unknown_parameter", f"unknown query parameter(s) {unknown}; known: aggregator, key, start, end")
        name = q.get("aggregator")
        if not name:
            return error(400, "missing_parameter", "name the aggregate: ?aggregator=NAME (GET /aggregates lists them)")
        window: dict[str, float] = {}
        for p in ("start", "end"):
            if p in q:
                try:
                    window[p] = float(q[p])
                except ValueError:
                    return error(400, "bad_parameter", f"{p} must be epoch seconds, got {q[p]!r}")
        key: Any = q.get("key")
        try:
            value = self.backend.aggregate(name, key, **window)
            if key is not None and value is None and key.lstrip("-").isdigit():
                value = self.backend.aggregate(name, int(key), **window)  # keys are often ints
        except KeyError as e:
            return error(404, "unknown_aggregate", str(e.args[0]))
        return Response(200, json_encoder.encode({"aggregator": name, "key": key, "value": plain(value)}))

    def get_filters(self, req: Request) -> Response:
        """Seed 003's filter statistics: per ``Rules`` stage, per rule, its counters."""
        stages = [st.name for st in self.backend.pipeline().stages if getattr(st, "is_rules", False)]
        return Response(200, json_encoder.encode({"filters": {n: self.backend.aggregate(n) for n in stages}}))

    def get_view(self, name: str) -> Response:
        """A materialized view by name (404 when the pipeline declares none of that name)."""
        try:
            doc = self.backend.view(name)
        except KeyError as e:
            return error(404, "unknown_view", str(e.args[0]))
        return Response(200, json_encoder.encode(plain(doc)))

    def get_materialized(self, req: Request) -> Response:
        """Seed 001's ``GET /materialized``: the view named ``materialized``."""
        return self.get_view("materialized")
