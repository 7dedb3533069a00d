"""Moved to :mod:`collector.sources.runtime` (with ``cache`` and ``guard``); kept for imports."""

from .sources.runtime import Enricher, LookupRuntime, SourceRuntime, build_enricher

__all__ = ["Enricher", "LookupRuntime", "SourceRuntime", "build_enricher"]
