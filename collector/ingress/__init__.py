"""Ingress: the ways events reach an engine besides a direct ``handle()`` call.

::

    many small callers ──► coalescer.Coalescer ──► one ahandle() per loop turn ──► engine
                                                   each caller ◄── its SliceResult

Each module here owns no engine: it is handed one and feeds it. Nothing is imported
here, so ``import collector.ingress`` stays cheap; import the module you need.
"""
