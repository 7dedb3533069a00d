"""Plugin look-up: a name, or an import string, to the object it names.

Each plugin family (sinks, packs, and later sources and stages) keeps a table of
name → ``"module:attr"`` in its ``__init__.py``. :func:`load` resolves a name through
it and imports only the module that name needs, so an unused driver is never imported;
a name containing ``:`` is itself an import string, so a third-party kind needs no
table line::

    SINKS = {"sqlite": "collector.sinks.sqlite:SqliteSink", ...}
    cls = registry.load(SINKS, "sqlite", "sink")         # collector.sinks.sqlite imported now
    cls = registry.load(SINKS, "mypkg.sinks:Kafka", "sink")
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

__all__ = ["import_string", "load"]


def import_string(spec: str, what: str = "object") -> Any:
    """Import ``"package.module:attr.path"``; the error says which part was not found."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"{what} import string {spec!r} must look like 'package.module:attr'")
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"{what} {spec!r}: cannot import module {mod_name!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ConfigError(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}") from e
    return obj


def load(table: Mapping[str, str], name: str, family: str) -> Any:
    """The object ``name`` stands for in ``table`` (or ``name`` itself as an import string).

    An unknown name raises :class:`ConfigError` listing the known names.
    """
    if ":" in name:
        return import_string(name, family)
    spec = table.get(name)
    if spec is None:
        known = ", ".join(repr(k) for k in sorted(table))
        raise ConfigError(f"unknown {family} {name!r}: known are {known}, or an import string 'package.module:attr'")
    return import_string(spec, f"{family} {name!r}")
