"""The one native part: collector.worker.keyroute, the shard="key" NDJSON router.

Everything else is in pyproject.toml. The extension is optional: without a C compiler
the package installs all the same and workers route NDJSON ranges in Python (slower;
see docs/performance.md).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "collector.worker.keyroute",
            ["collector/worker/keyroute.c"],
            optional=True,
        )
    ]
)
