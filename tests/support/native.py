"""The optional C extensions in tests: imported, or the test module skipped with why."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def native(module: str) -> ModuleType:
    """``module`` (a C extension built at install), or skip the calling test module.

    A machine without a C compiler installs without the extensions (their Python paths
    run instead); CI, which sets ``COLLECTOR_REQUIRE_SERVICES=1``, must have built them,
    so there the ImportError fails the module instead.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("COLLECTOR_REQUIRE_SERVICES") == "1":
            raise
        pytest.skip(f"{module} was not built (no C compiler at install)", allow_module_level=True)
