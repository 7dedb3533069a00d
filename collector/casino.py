"""The documented import path of the casino pack: ``from collector.casino import CasinoEvent, describe``."""

from .packs.casino import (
    CURRENCIES,
    GAMES,
    CasinoEvent,
    Player,
    casino_pipeline,
    describe,
    generate_casino,
)

__all__ = ["CURRENCIES", "GAMES", "CasinoEvent", "Player", "casino_pipeline", "describe", "generate_casino"]
