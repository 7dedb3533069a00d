"""Kept import path (the README names ``collector.generic.GenericEvent``): see :mod:`collector.packs.generic`."""

from .ids import new_id, new_ids
from .packs.generic import GenericEvent, SegmentClient, generate_generic, generic_pipeline

__all__ = ["GenericEvent", "SegmentClient", "generate_generic", "generic_pipeline", "new_id", "new_ids"]
