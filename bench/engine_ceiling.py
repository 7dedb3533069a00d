"""The engine against its ceiling, same run: ``python bench/engine_ceiling.py [N] [more options]``.

Kept for its command line; the comparison lives in ``collector bench inmem`` (see
collector/benchmarks/inmem.py), which this runs as::

    collector bench inmem --input ndjson --workers 2 --chunk-sizes 2048 --peers bde --events N

N NDJSON playback events (default 1,000,000), ``shard="key"`` and ``shard="chunk"``
with 2 workers, against the ceiling (d) (2 processes, each decoding its half of the
lines, enriching and counting, no IPC), the single-process msgspec loop (b) and
Bytewax (e), in alternating rounds, medians of 5, with the ratios. Further options
go to ``collector bench`` as they are (``--repeats 7``, ``--input json,ndjson``).
"""

from __future__ import annotations

import sys

from collector.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    n = args.pop(0) if args and args[0].isdigit() else "1000000"
    sys.exit(main(["bench", "inmem", "--input", "ndjson", "--workers", "2", "--chunk-sizes", "2048",
                   "--peers", "bde", "--events", n, *args]))
