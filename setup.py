"""The native parts, each an optional C extension; everything else is in pyproject.toml.

- collector.worker.keyroute: the shard="key" NDJSON router (workers);
- collector.http.batchread: the POST /events/batch reader (the daemon's supervisor);
- collector.stages.idwindow: the dedup window's remembered ids (workers).

The first two share collector/native/jsonscan.h. Without a C compiler the package installs all
the same and each falls back to its Python path (slower; see docs/performance.md).
"""

from setuptools import Extension, setup

NATIVE = ["collector/native"]
SHARED = ["collector/native/crc32.h", "collector/native/jsonscan.h"]

setup(
    ext_modules=[
        Extension(
            "collector.worker.keyroute",
            ["collector/worker/keyroute.c"],
            include_dirs=NATIVE,
            depends=SHARED,
            optional=True,
        ),
        Extension(
            "collector.http.batchread",
            ["collector/http/batchread.c"],
            include_dirs=NATIVE,
            depends=SHARED,
            optional=True,
        ),
        Extension("collector.stages.idwindow", ["collector/stages/idwindow.c"], optional=True),
    ]
)
