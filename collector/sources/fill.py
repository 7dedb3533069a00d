"""``compile_fill``: the generated per-lookup cache pass over a chunk's events.

::

    events ─► fill(events, get, MISS, misses) ─► hit: e.<target> = v
                                               └► miss: misses[key].append(e)

Both runtimes (:mod:`.lookup` for client methods, :mod:`.source_runtime` for sources)
build one per lookup; :class:`~collector.sources.runtime.Enricher` calls it per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .cache import FAIL, SKIP

__all__ = ["compile_fill"]


def compile_fill(
    key: str, target: str, skip: bool = False, key_fields: tuple[str, ...] = (), collect: bool = False
) -> Callable[..., Any]:
    """``for e in events: hit → e.<target> = v, miss → misses[k].append(e)``.

    Generated once per lookup (as dataclasses does) because attribute access with
    a constant name is several times cheaper than getattr/setattr on the hot path.
    Field names were checked against the Struct's fields, so they are identifiers.
    With ``skip``, a cached ``SKIP`` (not found) or ``FAIL`` (failed recently) is a hit
    that leaves the field alone, and the function returns ``(hits, failed, skipped)``
    (events of a cached failed, and not-found, key); with
    ``key_fields`` the key is the tuple ``(e.<key>, e.<f>, ...)``. With ``skip``, an event
    whose key field is None is not looked up at all (a deposit has no game, a game_start
    no currency): its field keeps its default and nothing is counted. With ``collect``
    (and ``skip``: a step with a failure policy), the function takes two more dicts,
    ``nf`` and ``err``, and groups the events of cached not-found and failed keys in them
    (key → events), for the policy to act on, and returns ``(hits, failed)``. Without it
    (a step that only keeps, and logs nothing) those events are counted, not grouped.
    """
    names = (key, *key_fields)
    assert all(n.isidentifier() for n in names) and target.isidentifier()
    kexpr = f"e.{key}" if not key_fields else "(" + ", ".join(f"e.{n}" for n in names) + ")"
    setter = f"            e.{target} = v\n"
    if skip and collect:
        group = "                g = {d}.get(k)\n                if g is None:\n                    {d}[k] = [e]\n" \
                "                else:\n                    g.append(e)\n"
        setter = (
            "            if v is SKIP:\n" + group.format(d="nf")
            + "            elif v is FAIL:\n                failed += 1\n" + group.format(d="err")
            + f"            else:\n                e.{target} = v\n"
        )
    elif skip:
        setter = (
            "            if v is SKIP:\n                skipped += 1\n"
            "            elif v is FAIL:\n                failed += 1\n"
            f"            else:\n                e.{target} = v\n"
        )
    # hits are counted after the loop (events - skipped - missed): no addition per hit,
    # the common case; ``misses`` is the caller's fresh dict for this chunk
    src = (
        f"def fill(events, get, MISS, misses{', nf, err' if collect else ''}):\n"
        "    nones = failed = skipped = 0\n"
        "    for e in events:\n"
        + (f"        if e.{key} is None:\n            nones += 1\n            continue\n" if skip else "")
        + f"        k = {kexpr}\n"
        "        v = get(k, MISS)\n"
        "        if v is MISS:\n"
        "            m = misses.get(k)\n"
        "            if m is None:\n"
        "                misses[k] = [e]\n"
        "            else:\n"
        "                m.append(e)\n"
        "        else:\n"
        f"{setter}"
        "    hits = len(events) - nones - (sum(map(len, misses.values())) if misses else 0)\n"
        f"    return {('hits, failed' if collect else 'hits, failed, skipped') if skip else 'hits'}\n"
    )
    ns: dict[str, Any] = {"SKIP": SKIP, "FAIL": FAIL}
    exec(src, ns)
    fill: Callable[..., Any] = ns["fill"]
    return fill
