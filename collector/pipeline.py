"""What a pipeline is: the event type, its shard key, its enrichment lookups, its sinks.

A :class:`Pipeline` is a plain description. The supervisor reads ``event_type`` and
``key`` to shard; each worker builds the running form (caches, clients, sinks) from it
once at boot. It reaches a worker either pickled once at spawn time (so the client
object inside must be picklable: no open sockets, no locks, no lambdas) or as a
``"module:attr"`` import string naming a Pipeline or a function returning one. Event
data never travels pickled: chunks and acks are msgspec-encoded bytes.

Domain packs (``collector.packs.playback``, ``collector.packs.generic``, ...) are an event Struct
plus a function that returns a Pipeline built from these generic parts.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import mod
from typing import Any

import msgspec

from .errors import ConfigError
from .registry import import_string  # kept here: pipeline.import_string was its first home

__all__ = [
    "FAILURE_POLICIES", "FALLBACKS", "Lookup", "Pipeline", "ShardMap", "event_fields", "event_structs",
    "event_type_name", "import_string", "resolve_pipeline",
]


FAILURE_POLICIES = ("keep", "dead_letter", "hold")  # what a failed lookup does to its event
FALLBACKS = ("keep", "dead_letter")  # what a hold that ran out does


@dataclass(frozen=True)
class Lookup:
    """Enrich ``event.<target>`` with ``client.<method>(event.<key>)``, or from a ``source``.

    With ``source`` (a :class:`collector.sources.base.Source` such as ``HttpSource(...)``,
    or a source config Struct such as ``HttpSourceConfig(...)``), the source's own
    ``cache`` and ``resilience`` settings apply instead of the fields below, and the
    distinct misses of a chunk go out as batched ``get_many`` calls. ``key_fields`` adds
    fields to the key: it is then the tuple ``(event.<key>, event.<f>, ...)`` (the
    ``rates`` source converts ``(currency, amount)`` keys).

    The method may be ``async def`` or a plain blocking function (run on the worker's
    bounded thread pool). Results are cached per worker by key (``ttl`` seconds,
    ``max_entries`` entries, oldest evicted first); concurrent misses for one key share
    one call; each call has ``timeout`` seconds and ``retries`` more tries with
    exponential backoff from ``backoff`` seconds plus jitter. At most ``concurrency``
    calls of this lookup run at once per worker. When ``returns_duration`` is true the
    method returns ``(value, seconds)``, the fetch time as the service reports it.

    **Failure policy** (docs/sources.md, "Failure policies"): what happens to an event
    whose lookup finally fails. ``on_failure`` is ``"keep"`` (the default: ``target``
    keeps its default, the event goes on, counted), ``"dead_letter"`` (the event goes to
    the dead-letter sink instead of the sinks, answered ``deadlettered``) or ``"hold"``
    (the chunk asks the source again, with backoff, for up to ``hold_for`` seconds and
    ``hold_retries`` tries; then ``then``: ``"keep"`` or ``"dead_letter"``).
    ``on_missing`` (the source does not have the key) and ``on_error`` (the call failed,
    no stale value) override it for one outcome; a client method has errors only. With
    ``log`` each event kept at its default gets one log line (step, source, key,
    reason), at most ``log_rate`` lines per second per worker (the rest are counted).
    """

    name: str
    key: str
    target: str
    method: str = ""
    returns_duration: bool = False
    ttl: float = 60.0
    max_entries: int = 100_000
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.05
    concurrency: int = 256
    default: Any = ""
    cache: bool = True
    source: Any = None
    key_fields: tuple[str, ...] = ()
    on_failure: str = "keep"
    on_missing: str = ""  # empty: as on_failure
    on_error: str = ""  # empty: as on_failure
    log: bool = False
    log_rate: float = 100.0
    hold_for: float = 5.0
    hold_retries: int = 10
    hold_backoff: float = 0.1
    then: str = "keep"

    def __post_init__(self) -> None:
        if bool(self.method) == (self.source is not None):
            raise ConfigError(f"lookup {self.name!r}: give either a client `method` or a `source` (got both or neither)")
        if self.source is not None and self.returns_duration:
            raise ConfigError(f"lookup {self.name!r}: returns_duration applies to client methods only")
        for f in (self.key, self.target, *self.key_fields):
            if not f.isidentifier():
                raise ConfigError(f"lookup {self.name!r}: {f!r} is not a field name")
        if self.ttl < 0 or self.timeout <= 0 or self.retries < 0 or self.concurrency < 1:
            raise ConfigError(
                f"lookup {self.name!r}: ttl must be >= 0, timeout > 0, retries >= 0 and "
                f"concurrency >= 1 (got ttl={self.ttl}, timeout={self.timeout}, "
                f"retries={self.retries}, concurrency={self.concurrency})"
            )
        for what in ("on_failure", "on_missing", "on_error", "then"):
            v = getattr(self, what)
            allowed = FALLBACKS if what == "then" else FAILURE_POLICIES
            if v not in allowed and not (v == "" and what in ("on_missing", "on_error")):
                raise ConfigError(f"lookup {self.name!r}: {what} must be one of {', '.join(map(repr, allowed))} (got {v!r})")
        if self.hold_for <= 0 or self.hold_retries < 1 or self.hold_backoff <= 0 or self.log_rate <= 0:
            raise ConfigError(
                f"lookup {self.name!r}: hold_for, hold_backoff and log_rate must be > 0 and hold_retries >= 1 "
                f"(got hold_for={self.hold_for}, hold_backoff={self.hold_backoff}, log_rate={self.log_rate}, "
                f"hold_retries={self.hold_retries})"
            )

    @property
    def may_dead_letter(self) -> bool:
        """Whether the failure policy can send an event to the dead-letter sink."""
        acts = {self.policy_for("not_found"), self.policy_for("error")}
        return "dead_letter" in acts or ("hold" in acts and self.then == "dead_letter")

    def policy_for(self, outcome: str) -> str:
        """The policy for ``"not_found"`` or ``"error"``: ``on_missing`` / ``on_error``, else ``on_failure``."""
        own = self.on_missing if outcome == "not_found" else self.on_error
        return own or self.on_failure


@dataclass(frozen=True)
class Pipeline:
    """A pipeline description: see the module docstring.

    ``key`` is the field the supervisor shards by: every event with one key value goes
    to one worker, so per-key state (caches, dedup windows, pairing) lives there.
    ``id_field`` names the event id used by idempotent sinks and dedup.
    ``count_by`` lists fields whose value counts appear in each batch's statistics.
    ``client`` is the object whose methods the lookups call, or a ``"module:factory"``
    string the worker imports and calls to build it. ``sinks`` are sink configurations
    (see ``collector.sinks``); none means the events are only counted (and returned
    when asked).

    ``shard`` is ``"key"`` (default: events with one key value always go to one
    worker) or ``"chunk"`` (chunks go to whichever worker has room; the supervisor
    never looks inside an NDJSON batch, so it is the fastest; choose it when no stage
    keeps per-key state and a key fetched once per worker is acceptable).
    """

    name: str
    event_type: Any  # a msgspec Struct, or a tagged union of Structs (see event_structs)
    key: str
    id_field: str | None = "id"
    lookups: tuple[Lookup, ...] = ()
    client: Any = None
    count_by: tuple[str, ...] = ()
    sinks: tuple[Any, ...] = ()
    deadletter: Any = None
    stages: tuple[Any, ...] = ()
    views: tuple[Any, ...] = ()  # materialized views over the stateful stages (``name``, ``render``)
    blocking_threads: int = 64
    shard: str = "key"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.shard not in ("key", "chunk"):
            raise ConfigError(f"pipeline {self.name!r}: shard must be 'key' or 'chunk' (got {self.shard!r})")
        fields = set(event_fields(self.event_type))
        for name, where in [(self.key, "key")] + [
            (f, f"count_by[{i}]") for i, f in enumerate(self.count_by)
        ]:
            if name not in fields:
                raise ConfigError(
                    f"pipeline {self.name!r}: {where} names field {name!r}, which "
                    f"{event_type_name(self.event_type)} does not have (fields: {sorted(fields)})"
                )
        if self.client is not None and not isinstance(self.client, str):
            for lk in self.lookups:
                if lk.source is None and not callable(getattr(self.client, lk.method, None)):
                    raise ConfigError(
                        f"pipeline {self.name!r}: lookup {lk.name!r} calls "
                        f"client.{lk.method}(), but the client "
                        f"{type(self.client).__name__} has no method {lk.method!r}"
                    )
        self._check_holding_stages()
        for lk in self.lookups:
            if lk.may_dead_letter and self.deadletter is None:
                raise ConfigError(
                    f"pipeline {self.name!r}: lookup {lk.name!r} dead-letters events whose lookup fails "
                    f"(on_failure={lk.on_failure!r}, on_missing={lk.on_missing!r}, on_error={lk.on_error!r}, "
                    f"then={lk.then!r}), but the pipeline has no dead-letter sink: give it one "
                    "(Pipeline(deadletter=DeadLetterConfig(path=...)); the daemon always has one)"
                )
            for f in (lk.key, lk.target):
                if f not in fields:
                    raise ConfigError(
                        f"pipeline {self.name!r}: lookup {lk.name!r} names field {f!r}, "
                        f"which {event_type_name(self.event_type)} does not have"
                    )

    def _check_holding_stages(self) -> None:
        """A stage that holds events across chunks (``holds``: Order with a buffer) sends
        them straight to the sinks when it releases them, past every later step: it must
        be the last stage, and lookups must run before it (an ``Enrich()`` ahead of it)."""
        stages = [st for st in self.stages if not getattr(st, "is_enrich", False)]
        for i, st in enumerate(stages):
            if not getattr(st, "holds", False):
                continue
            name = getattr(st, "name", type(st).__name__)
            if i != len(stages) - 1:
                raise ConfigError(
                    f"pipeline {self.name!r}: stage {name!r} holds events (max_delay) and releases them "
                    f"straight to the sinks, so it must be the last stage (stage "
                    f"{getattr(stages[-1], 'name', '?')!r} comes after it)"
                )
            enrich_before = any(getattr(s, "is_enrich", False) for s in self.stages[: self.stages.index(st)])
            if self.lookups and not enrich_before:
                raise ConfigError(
                    f"pipeline {self.name!r}: stage {name!r} holds events (max_delay), and the lookups run "
                    "after every stage unless placed: put Enrich() before it ([[stages]] kind = \"enrich\" in a config)"
                )

    def with_sinks(self, *sinks: Any) -> Pipeline:
        """A copy of this pipeline writing to ``sinks``."""
        return _replace(self, sinks=tuple(sinks))


def _replace(p: Pipeline, **changes: Any) -> Pipeline:
    import dataclasses

    return dataclasses.replace(p, **changes)


class ShardMap(dict[Any, int]):
    """key → worker index, computed once per key with a stable hash (crc32).

    The pipeline's shard function: the supervisor routes lists by it and workers route
    the NDJSON ranges they are dealt by it (``shard="key"``), so both agree on a key's
    owner.

    ``map(shards.__getitem__, keys)`` runs in C for known keys; only a new key costs
    Python code. Stable across processes and restarts, unlike ``hash()`` of a str.
    At most ``MAX`` keys are remembered (~40 MB); then the map starts afresh (forgotten
    keys are recomputed, to the same worker).
    """

    MAX = 200_000

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __missing__(self, k: Any) -> int:
        if len(self) >= self.MAX:
            self.clear()
        v = self[k] = self.of(k)
        return v

    @staticmethod
    def hashable(k: Any) -> Any:
        """``k`` as a dict can hold it: a JSON list or object by its repr (as :meth:`of` hashes it)."""
        return repr(k) if isinstance(k, (list, dict)) else k

    def of(self, k: Any) -> int:
        """The worker of ``k`` without remembering it (keys that never repeat, like ids)."""
        return zlib.crc32(k.encode() if type(k) is str else repr(k).encode()) % self.n

    def of_many(self, keys: Sequence[Any]) -> list[int]:
        """:meth:`of` for each key: in C when every key is a ``str`` (a request's ids),
        about a quarter of a Python call per key."""
        try:
            return list(map(mod, map(zlib.crc32, map(str.encode, keys)), repeat(self.n)))
        except TypeError:  # a key that is not text: each by its repr, as of() does
            return list(map(self.of, keys))


def resolve_pipeline(spec: Pipeline | str | Callable[[], Pipeline]) -> Pipeline:
    """A Pipeline from itself, an import string, or a no-argument factory."""
    obj: Any = spec
    if isinstance(obj, str):
        obj = import_string(obj, "pipeline")
    if callable(obj) and not isinstance(obj, Pipeline):
        obj = obj()
    if not isinstance(obj, Pipeline):
        raise ConfigError(f"{spec!r} is not a collector.Pipeline (got {type(obj).__name__})")
    return obj


def field_getter(names: Sequence[str]) -> Callable[[Any], Any]:
    """``operator.attrgetter`` for Structs (kept here so stages share one definition)."""
    from operator import attrgetter

    return attrgetter(*names)


def event_structs(event_type: Any) -> tuple[type[msgspec.Struct], ...]:
    """The Struct types an event type stands for: itself, or each member of a tagged
    union (``ClickEvent = ElementClick | PageViewStart | ...``, tagged on one field)."""
    import types
    import typing

    if isinstance(event_type, type) and issubclass(event_type, msgspec.Struct):
        return (event_type,)
    if typing.get_origin(event_type) in (typing.Union, types.UnionType):
        members = typing.get_args(event_type)
        if members and all(isinstance(m, type) and issubclass(m, msgspec.Struct) for m in members):
            return tuple(members)
    raise ConfigError(f"an event type is a msgspec Struct or a tagged union of Structs (got {event_type!r})")


def struct_field(struct: Any, name: str) -> tuple[Any, tuple[Any, ...]] | None:
    """Struct field ``name`` as ``msgspec.inspect`` describes it, with the types it accepts
    (a union's members, each unwrapped from ``Annotated`` metadata); None when the
    Struct has no such field."""
    info = msgspec.inspect.type_info(struct)
    for f in getattr(info, "fields", ()):
        if f.name == name:
            # Annotated[..., Meta(description=...)] comes wrapped in Metadata: around the
            # whole union, or around one member
            t = f.type.type if isinstance(f.type, msgspec.inspect.Metadata) else f.type
            options = t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)
            return f, tuple(o.type if isinstance(o, msgspec.inspect.Metadata) else o for o in options)
    return None


def event_fields(event_type: Any) -> tuple[str, ...]:
    """The top-level fields every event of ``event_type`` has, in declaration order.

    For a tagged union: the fields all members share, plus the tag field (each member
    exposes it, e.g. as a read-only property, so ``event.<tag field>`` reads it)."""
    structs = event_structs(event_type)
    first = structs[0]
    common = [f for f in first.__struct_fields__ if all(f in s.__struct_fields__ for s in structs[1:])]
    tag_field = first.__struct_config__.tag_field
    if len(structs) > 1 and tag_field and tag_field not in common:
        common.append(tag_field)
    return tuple(common)


def event_type_name(event_type: Any) -> str:
    """A readable name of an event type (``A | B | C`` for a union without one)."""
    name = getattr(event_type, "__name__", None)
    if isinstance(name, str) and name not in ("Union", "UnionType"):
        return name
    return " | ".join(s.__name__ for s in event_structs(event_type))
