"""``GET /openapi.json``: an OpenAPI 3.1 document generated from the server's Structs.

The request and response schemas come from :func:`msgspec.json.schema_components`
over the very Structs the server decodes and encodes with (:mod:`collector.http.schemas`)
and the pipeline's event Struct (the ``generic`` pack's by default), so the document
cannot drift from the code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from ..packs.generic import GenericEvent
from ..pipeline import event_structs, event_type_name
from ..stages.rules import COUNTERS as RULE_COUNTERS
from .schemas import (
    BatchResponse,
    EnrichmentStats,
    ErrorResponse,
    EventResponse,
    Health,
    IngressStatus,
    ItemResult,
    Metrics,
    ProcessorMetrics,
    ProcessorStatus,
)

if TYPE_CHECKING:
    from ..config import ServerConfig

__all__ = ["document"]

_REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _json(*names: str) -> dict[str, Any]:
    schema: dict[str, Any] = _ref(names[0]) if len(names) == 1 else {"anyOf": [_ref(n) for n in names]}
    return {"content": {"application/json": {"schema": schema}}}


def document(cfg: ServerConfig, event_type: Any = GenericEvent) -> dict[str, Any]:
    """The OpenAPI document for a server with these limits, taking ``event_type`` events."""
    ev = event_type_name(event_type)
    EventBatch = msgspec.defstruct(
        "EventBatch",
        [("events", Annotated[list[event_type], msgspec.Meta(max_length=cfg.max_batch_items)])],
        forbid_unknown_fields=True,
    )
    (schemas, components) = msgspec.json.schema_components(
        [event_type, EventBatch, EventResponse, BatchResponse, ItemResult, ErrorResponse, Metrics, Health,
         EnrichmentStats, ProcessorStatus, ProcessorMetrics, IngressStatus],
        ref_template=_REF,
    )
    if len(event_structs(event_type)) > 1:
        # a tagged union: one component, any of the members, chosen by the tag
        ev = "Event"
        components[ev] = schemas[0]
    # a batch is validated item by item (per-item results in a 202), so
    # the array admits anything and says that each item is meant to be an event
    components["EventBatch"]["properties"]["events"]["items"] = {
        "anyOf": [_ref(ev), {"description": "anything else is reported as `invalid` in `results`"}]
    }
    counters = {"type": "object", "required": list(RULE_COUNTERS), "additionalProperties": False,
                "properties": {c: {"type": "integer", "minimum": 0} for c in RULE_COUNTERS}}
    components["FilterStats"] = {
        "type": "object", "required": ["filters"], "additionalProperties": False,
        "properties": {"filters": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": counters}}},
    }
    retry = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait before retrying"}}

    def ingest(req: str, ok: str, many: bool) -> dict[str, Any]:
        item = "BatchResponse" if many else "EventResponse"
        responses: dict[str, Any] = {
            "202": {"description": "stored: every configured sink holds the event (batch: answered per item in "
                    "`results`, whatever each item's fate; only `accepted` items are stored in every sink, "
                    "`deadlettered` ones are held by the dead-letter sink)", **_json(item)},
            "400": {"description": "malformed JSON, empty body, nesting deeper than the limit, or a body that is "
                    "not valid for its Content-Encoding", **_json("ErrorResponse")},
            "401": {"description": "missing or unknown bearer token (when auth is on)"
                    + ("" if many else "; or status `unauthorized`: the auth stage refused the event's own "
                       "token (`reason` says why; not stored)"),
                    **(_json("ErrorResponse") if many else _json(item, "ErrorResponse"))},
            "413": {"description": "body (before or after decompression) or item count over the limit",
                    **_json("ErrorResponse")},
            "415": {"description": "Content-Type is not application/json, or Content-Encoding is not gzip, "
                    "deflate or identity", **_json("ErrorResponse")},
            "422": {"description": "schema errors, each naming its field (batch: only an invalid envelope); "
                    "`POST /events`: status `deadlettered` when a store refused the event's data (the reason names "
                    "the sink; the dead-letter sink holds it; resent unchanged it would be refused again)",
                    **_json(item, "ErrorResponse")},
            "503": {"description": "overloaded or stopping: retry after Retry-After; `POST /events`: status "
                    "`deadlettered` when the sink gave up after its retries (the dead-letter sink holds it; a "
                    "retry after Retry-After is stored)", "headers": retry, **_json(item, "ErrorResponse")},
        }
        if not many:
            responses["200"] = {"description": "an event with this id was already accepted (`duplicate`), or a "
                                "filter rule dropped it (`filtered`, `reason` names the rule)", **_json(item)}
        return {
            "summary": ok,
            # not a header parameter: the document cannot say that the body is then
            # compressed, and generated requests would send plain JSON under the header
            "description": "The body may be sent with `Content-Encoding: gzip` or `deflate`; it is "
                           "inflated first, and max_body_bytes bounds both sizes.",
            "requestBody": {"required": True, **_json(req)},
            "responses": responses,
            "security": [{}, {"bearer": []}],
        }

    health = {
        "200": {"description": "ok", **_json("Health")},
        "503": {"description": "not ok", **_json("Health")},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "collector", "version": _version(),
                 "description": "Event ingest (seed 004): validate, dedup, enrich, store."},
        "paths": {
            "/events": {"post": ingest(ev, "Accept one event", False)},
            "/events/batch": {"post": ingest("EventBatch", f"Accept up to {cfg.max_batch_items} events", True)},
            "/metrics": {"get": {"summary": "Processing statistics (JSON; Prometheus text with Accept: text/plain)",
                                 "responses": {"200": {"description": "metrics", **_json("Metrics"),
                                                       }}}},
            "/metrics/prometheus": {"get": {"summary": "Prometheus text exposition",
                                            "responses": {"200": {"description": "metrics",
                                                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/health": {"get": {"summary": "Liveness", "responses": health}},
            "/ready": {"get": {"summary": "Readiness (workers up, sinks reachable, the NATS ingress connected)",
                               "responses": health}},
            "/ingress": {"get": {
                "summary": "The NATS JetStream [source]: connected, stream, durable, messages fetched / acked / "
                           "nakked / terminated, in flight, the consumer's pending and ack-pending, last error",
                "responses": {"200": {"description": "the ingress", **_json("IngressStatus")},
                              "404": {"description": "the daemon has no [source]", **_json("ErrorResponse")}}}},
            "/aggregates": {"get": {"summary": "Every aggregate stage's values, merged over the workers",
                                    "responses": {"200": {"description": "name → value", **_obj()}}}},
            "/processor/aggregation": {"get": {
                "summary": "One aggregate (seed 003), optionally one group and a time range",
                "parameters": [
                    {"name": "aggregator", "in": "query", "required": True, "schema": {"type": "string", "minLength": 1}},
                    {"name": "key", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "start", "in": "query", "required": False, "schema": {"type": "number"}},
                    {"name": "end", "in": "query", "required": False, "schema": {"type": "number"}},
                ],
                "responses": {"200": {"description": "the value", **_obj()},
                              "400": {"description": "a missing or malformed parameter", **_json("ErrorResponse")},
                              "404": {"description": "no such aggregate", **_json("ErrorResponse")}}}},
            "/processor/filters": {"get": {
                "summary": "Filter statistics (seed 003): per Rules stage, per rule, its counters summed over the workers",
                "responses": {"200": {"description": "stage name → rule name → counters", **_json("FilterStats")}}}},
            "/processor/enrichment": {"get": {
                "summary": "Enrichment statistics (seed 003): per lookup, success rate, cache and Redis hits, "
                           "misses, errors by kind, breaker state, call latencies; summed over the workers",
                "responses": {"200": {"description": "per-lookup figures", **_json("EnrichmentStats")}}}},
            "/processor/status": {"get": {
                "summary": "Processor status (seed 003): health of workers, sinks, enrichment sources and Redis",
                "responses": {"200": {"description": "`ok`, or `degraded` (a sink, source or Redis server down)",
                                      **_json("ProcessorStatus")},
                              "503": {"description": "`unhealthy`: a worker down or silent, or stopping",
                                      **_json("ProcessorStatus")}}}},
            "/metrics/processor": {"get": {
                "summary": "Processor metrics (seed 003): processed, enriched, filtered, deduplicated totals, "
                           "processing durations, cache hit ratio, worker utilisation",
                "responses": {"200": {"description": "the figures", **_json("ProcessorMetrics")}}}},
            "/materialized": {"get": {"summary": "The pack's materialized view (seed 001's casino figures)",
                                      "responses": {"200": {"description": "the view", **_obj()},
                                                    "404": {"description": "the pack declares no such view",
                                                            **_json("ErrorResponse")}}}},
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _obj() -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"type": "object"}}}}


def _version() -> str:
    from ..version import __version__

    return __version__
