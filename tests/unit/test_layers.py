"""The layer rule of LAYOUT.md, checked on the source (an AST walk, imports inside functions too).

A module imports only from its own layer or a lower one (within layer 2: stats <
sources/stages/sinks < packs; within layer 4: engine < ingress < daemon), ``worker/``
and ``http/`` never import each other, no two modules import each other, and no module
imports another module's ``_private`` name. Today's exceptions are in WAIVERS, each
with its reason; a waiver that is no longer needed fails too, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "collector"

# top-level name under collector/ → (group, rank); the same group may always import itself
LAYERS = {
    **dict.fromkeys(
        ("errors", "config", "logs", "registry", "ids", "protocol", "pipeline", "results", "retry", "template",
         "version"),
        ("core", 1.0),
    ),
    **dict.fromkeys(("shm", "stats", "arena"), ("stats", 2.0)),  # shared memory: segments, counters, payloads
    **{name: (name, 2.1) for name in ("sources", "enrich", "stages", "sinks")},
    **dict.fromkeys(("packs", "playback", "generic", "casino", "clickstream"), ("packs", 2.2)),  # playback, generic, casino, clickstream: facades
    "worker": ("worker", 3.0),
    "http": ("http", 3.0),
    **dict.fromkeys(("engine", "supervisor"), ("engine", 4.0)),
    **dict.fromkeys(("ingress", "ingest"), ("ingress", 4.1)),  # ingest: the README's facade
    "daemon": ("daemon", 4.2),
    **dict.fromkeys(("", "__main__", "cli", "commands", "benchmarks"), ("top", 5.0)),  # "": collector/__init__
}

WAIVERS: dict[tuple[str, str], str] = {}


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = ["collector", *p.relative_to(ROOT).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(mod: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """(module imported, name imported or "") for every import of a collector module."""
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "collector"]
        elif isinstance(node, ast.ImportFrom):
            base = pkg.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(x for x in (base, node.module) if x)
            if target.split(".")[0] != "collector":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub, "") if sub in known else (target, a.name))
    return found


def layer(mod: str) -> tuple[str, float]:
    parts = mod.split(".")
    if len(parts) == 3 and parts[2] == "config" and parts[1] in ("sources", "stages", "sinks"):
        # a family's config Structs are layer 1: plain msgspec descriptions (they may import
        # only layer 1), so the daemon's configuration can hold their tagged unions
        return ("core", 1.0)
    head = parts[1] if len(parts) > 1 else ""
    assert head in LAYERS, f"{mod}: place it in a layer (tests/unit/test_layers.py LAYERS)"
    return LAYERS[head]


def test_layers_cycles_and_private_names() -> None:
    known = modules()
    graph = {m: imports(m, p, known) for m, p in known.items()}
    edges = {(m, d) for m, deps in graph.items() for d, _ in deps}
    problems: dict[tuple[str, str], str] = {}
    for mod, deps in graph.items():
        group, rank = layer(mod)
        for dep, name in deps:
            dgroup, drank = layer(dep)
            if dgroup != group and (drank > rank or {group, dgroup} == {"worker", "http"}):
                problems[mod, dep] = f"{mod} ({group}, layer {rank}) imports {dep} ({dgroup}, layer {drank})"
            elif dep != mod and (dep, mod) in edges:
                problems[min(mod, dep), max(mod, dep)] = f"{mod} and {dep} import each other"
            elif name.startswith("_") and not name.startswith("__") and dep != mod:
                problems[mod, dep] = f"{mod} imports the private name {dep}.{name}"
    left = [why for key, why in sorted(problems.items()) if key not in WAIVERS]
    assert not left, "\n".join(left)
    stale = sorted(set(WAIVERS) - set(problems))
    assert not stale, f"waivers no longer needed (drop them): {stale}"
