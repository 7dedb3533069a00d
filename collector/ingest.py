"""Kept import path (the README's ``collector.ingest.Coalescer``): see :mod:`collector.ingress.coalescer`."""

from .ingress.coalescer import Coalescer, SliceResult

__all__ = ["Coalescer", "SliceResult"]
