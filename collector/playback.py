"""Kept import path (documented): the ``playback`` pack lives in :mod:`collector.packs.playback`."""

from .packs.playback import (
    InMemoryClient,
    PlaybackEvent,
    SimulatedClient,
    generate_events,
    model_of,
    playback_pipeline,
    region_of,
)

__all__ = ["InMemoryClient", "PlaybackEvent", "SimulatedClient", "generate_events", "model_of", "playback_pipeline",
           "region_of"]
