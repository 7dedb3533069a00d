"""The native batch reader (collector/http/batchread.c) against the Python path it replaces.

For a ``POST /events/batch`` whose events sent no id, ``IdReader.read_native`` must give
what ``IdReader.ids_and_keys`` gives after the heads parse: each event with a generated id
as its first member and otherwise untouched, each event's shard key as the decoder reads
it, and the depth ``json_depth`` measures. Every event it cannot be sure of must make it
decline, so the Python path answers.
"""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

import msgspec
import pytest
from native import native

from collector.http.bodies import json_depth
from collector.http.routes.ingest import IdReader
from collector.http.schemas import BatchRequest
from collector.ids import new_ids
from collector.pipeline import Pipeline, ShardMap

batchread = native("collector.http.batchread")


class Ev(msgspec.Struct):
    id: str = ""
    user: str | int | None = None
    data: dict[str, Any] = {}


def reader(key: str) -> IdReader:
    return IdReader(Pipeline(name="t", event_type=Ev, key=key, id_field="id"))


def raws_of(body: bytes) -> list[msgspec.Raw]:
    return msgspec.json.decode(body, type=BatchRequest).events


def python_path(rd: IdReader, body: bytes) -> tuple[list[Any], list[Any], list[Any]]:
    return rd.ids_and_keys(rd.many.decode(body).events, raws_of(body))


def random_event(rnd: random.Random) -> bytes:
    """An event as a client may spell it: members in any order, spaces around the
    punctuation, escapes and non-ASCII in values, nested values, the key as text, an
    int, null, absent, or twice."""
    members: list[tuple[str, Any]] = []
    for name in rnd.sample(["type", "data", "n", "s", "t"], rnd.randint(1, 5)):
        members.append((name, rnd.choice([
            1, -7, 2.5e3, True, None, "plain", 'q"uote\\n', "ünï ☃",
            {"a": [1, {"b": [[]]}], "c": "}]"}, [[[{"x": "["}]]], {}, [],
        ])))
    kind = rnd.randrange(5)
    if kind < 4:
        members.insert(rnd.randrange(len(members) + 1), ("user", ["u1", 42, -3, None][kind]))
    if rnd.random() < 0.1:
        members.append(("user", f"later{rnd.randrange(9)}"))  # a second member: the decoder keeps it
    sp = rnd.choice(["", " ", "\n  "])
    inner = ("," + sp).join(f"{json.dumps(k)}{sp}:{sp}{json.dumps(v, ensure_ascii=rnd.random() < 0.5)}"
                            for k, v in members)
    return ("{" + inner + sp + "}").encode()


def batch(events: list[bytes], sp: str = "") -> bytes:
    return b'{"events":' + sp.encode() + b"[" + ("," + sp).encode().join(events) + b"]}"


@pytest.mark.parametrize("key", ["id", "user"])
def test_native_reading_gives_what_the_python_path_gives(key: str) -> None:
    rnd = random.Random(7)
    rd = reader(key)
    for _ in range(300):
        body = batch([random_event(rnd) for _ in range(rnd.randint(1, 40))], rnd.choice(["", " ", "\n"]))
        got = rd.read_native(raws_of(body))
        assert got is not None, body
        items, ids, keys, depth = got
        want_items, _, want_keys = python_path(rd, body)
        assert len(items) == len(ids) == len(want_items)
        assert len(set(ids)) == len(ids) and all(len(i) == 36 for i in ids)
        for item, eid, want in zip(items, ids, want_items, strict=True):
            assert item.startswith(b'{"id":"' + eid.encode() + b'",')  # first, as the Python path puts it
            decoded, expected = json.loads(item), json.loads(want)
            assert decoded["id"] == eid
            expected["id"] = eid
            assert decoded == expected
        if key == "id":
            assert keys == ids
        else:
            assert keys == want_keys and [type(k) for k in keys] == [type(k) for k in want_keys]
        for limit in range(1, 10):  # too deep exactly when the depth check says so
            assert (depth + 2 > limit) == (json_depth(body, limit) > limit), (limit, body)


@pytest.mark.parametrize("event", [
    b'{"id":"mine","user":"u"}',  # sent its id: kept, by the Python path
    b'{"user":"u","id":null}',
    b"{}",  # no member to put the id before
    b'{"\\u0069d":"x"}',  # an escaped name may spell the id
    b"[1]", b"1", b'"s"', b"null",  # not objects: answered invalid by the Python path
])
@pytest.mark.parametrize("key", ["id", "user"])
def test_native_reading_declines_what_only_the_python_path_may_answer(event: bytes, key: str) -> None:
    rd = reader(key)
    body = batch([b'{"user":"a"}', event, b'{"user":"b"}'])
    assert rd.read_native(raws_of(body)) is None


@pytest.mark.parametrize("value", [b"1.5", b"1e3", b"true", b'{"a":1}', b"[1]", b'"\\u0061"',
                                   b"123456789012345678901234567890"])
def test_native_reading_declines_a_key_it_cannot_read_as_the_decoder_does(value: bytes) -> None:
    body = batch([b'{"user":' + value + b',"n":1}'])
    assert reader("user").read_native(raws_of(body)) is None
    # ... unless the key is the id, which it generates (the member is then any data)
    assert reader("id").read_native(raws_of(body)) is not None


def test_native_ids_are_uuid7_text_as_new_ids_makes_them_and_wrap_as_its_counter_does() -> None:
    raws = raws_of(batch([b'{"a":1}'] * 3))
    got = batchread.with_ids(raws, b'"id"', "0192f0e1-2b3c-7abc-8def-", 0xFFFF_FFFF_FFFE, None)
    assert got is not None
    items, ids, _, _ = got
    assert ids == ["0192f0e1-2b3c-7abc-8def-fffffffffffe", "0192f0e1-2b3c-7abc-8def-ffffffffffff",
                   "0192f0e1-2b3c-7abc-8def-000000000000"]
    assert [json.loads(i) for i in items] == [{"id": i, "a": 1} for i in ids]
    made = reader("id").read_native(raws)
    assert made is not None
    for eid in made[1] + new_ids(2):  # the same layout as the Python generator's
        u = uuid.UUID(eid)
        assert str(u) == eid and u.version == 7 and u.variant == uuid.RFC_4122
        # the node bits (version group and 4th group) are the process's; the time (48-bit
        # ms) may have ticked between the two calls on a slow host
        assert eid[14:23] == made[1][0][14:23]
        assert abs(int(eid[:8] + eid[9:13], 16) - int(made[1][0][:8] + made[1][0][9:13], 16)) < 5_000


def test_native_reading_is_refused_bad_arguments() -> None:
    raws = raws_of(batch([b'{"a":1}']))
    with pytest.raises(ValueError):
        batchread.with_ids(raws, b"", "p-", 0, None)  # a quoted name is needed
    with pytest.raises(ValueError):
        batchread.with_ids(raws, b'"id"', "p" * 65, 0, None)
    with pytest.raises(ValueError):
        batchread.with_ids(raws, b'"id"', "p-", 0, b"")
    with pytest.raises(TypeError):
        batchread.with_ids(tuple(raws), b'"id"', "p-", 0, None)
    with pytest.raises(ValueError):
        batchread.with_ids(raws, b'"id"', "p-", 0, None, 2, 2)  # the owner is a worker index
    with pytest.raises(ValueError):
        batchread.with_ids(raws, b'"id"', "p-", 0, None, 0, 0)


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_ids_made_for_an_owner_are_the_shard_functions_for_that_worker_on_both_paths(workers: int) -> None:
    """With ``owner = (worker, workers)`` every generated id is one that ``ShardMap`` (the
    pipeline's shard function, zlib's crc32) gives to ``worker``; the C reader takes them
    in counter order from its block, skipping the others, and says None when its block
    runs out; the Python path gives ids of the same worker; ids the client sent are kept."""
    shards = ShardMap(workers)
    raws = raws_of(batch([b'{"a":1}'] * 60))
    for owner in range(workers):
        got = batchread.with_ids(raws, b'"id"', "0192f0e1-2b3c-7abc-8def-", 0xFFFF_FFFF_FF00, None, owner, workers,
                                 4000)
        assert got is not None
        ids = got[1]
        counters = [int(i[-12:], 16) for i in ids]
        assert len(set(ids)) == 60 and shards.of_many(ids) == [owner] * 60
        # in order from the block (wrapping as the counter does), none of this worker's skipped
        block = [(0xFFFF_FFFF_FF00 + j) & 0xFFFF_FFFF_FFFF for j in range(4000)]
        mine = [c for c in block if shards.of(f"0192f0e1-2b3c-7abc-8def-{c:012x}") == owner]
        assert counters == mine[:60]
        # 60 values cannot all be this worker's: the block runs out, the Python path takes over
        assert batchread.with_ids(raws, b'"id"', "0192f0e1-2b3c-7abc-8def-", 0, None, owner, workers, 60) is None
        rd = reader("id")
        native_ids = rd.read_native(raws, (owner, workers))
        assert native_ids is not None and shards.of_many(native_ids[1]) == [owner] * 60
        body = batch([b'{"a":1}', b'{"id":"client-1","a":2}', b'{"a":3}'])
        _, ids2, keys = rd.ids_and_keys(rd.many.decode(body).events, raws_of(body), (owner, workers))
        assert ids2[1] == "client-1" and keys == ids2
        assert shards.of(ids2[0]) == owner and shards.of(ids2[2]) == owner
        assert shards.of_many(rd.new_ids(500, (owner, workers))) == [owner] * 500
    # the key is not the id: the key decides the worker, ids are not steered (counter order)
    got = reader("user").read_native(raws_of(batch([b'{"user":"u"}'] * 4)), (1, workers))
    assert got is not None
    first = int(got[1][0][-12:], 16)
    assert [int(i[-12:], 16) for i in got[1]] == list(range(first, first + 4))


@pytest.mark.parametrize("n", [0, 1, 9, 10, 100, 1000])
def test_the_all_accepted_answer_is_what_msgspec_encodes_for_the_results(n: int) -> None:
    """``accepted(ids, layout)`` writes the 202 body of a batch whose every event was
    stored, byte for byte the encoded ``BatchResponse`` (the layout is cut from what
    msgspec encodes); ids it cannot write plainly make it decline (the server then
    encodes the Structs)."""
    from itertools import repeat

    from collector.http.routes.ingest import _ACCEPTED as layout
    from collector.http.schemas import BatchResponse, ItemResult, json_encoder

    ids = new_ids(n)
    if n > 2:
        ids[1] = "client-sent ~ plain"
    want = json_encoder.encode(BatchResponse(n, 0, 0, 0, list(map(ItemResult, range(n), repeat("accepted"), ids))))
    assert batchread.accepted(ids, layout) == want
    assert json.loads(want)["accepted"] == n
    for bad in ('a"b', "a\\b", "é", "tab\there", "\x7f", 7, None):
        assert batchread.accepted([*ids, bad], layout) is None, bad
    with pytest.raises(TypeError):
        batchread.accepted(tuple(ids), layout)
    with pytest.raises(TypeError, match="layout"):
        batchread.accepted(ids, layout[:5])


def event_with_id(rnd: random.Random, i: int) -> bytes:
    """A random event (see random_event) that sent its id: text, an int or null, anywhere
    among the members, sometimes twice (the decoder keeps the later)."""
    members = json.loads(random_event(rnd))
    eid = rnd.choice([f"client-{i}", i, -i, None, "ünï-☃"])
    items = list(members.items())
    items.insert(rnd.randrange(len(items) + 1), ("id", eid))
    if rnd.random() < 0.1:
        items.insert(0, ("id", "an earlier copy"))
    sp = rnd.choice(["", " "])
    return ("{" + ("," + sp).join(f"{json.dumps(k)}:{sp}{json.dumps(v, ensure_ascii=False)}" for k, v in items)
            + "}").encode()


def text_event_with_id(rnd: random.Random, i: int) -> bytes:
    """A random event whose id and user are text (non-ASCII too)."""
    e = json.loads(random_event(rnd))
    e["id"], e["user"] = rnd.choice([f"client-{i}", f"ünï-{i}-☃"]), f"u-{rnd.randrange(50)}"
    return json.dumps(e, ensure_ascii=False).encode()


@pytest.mark.parametrize("key", ["id", "user"])
def test_sent_ids_are_read_as_the_python_path_reads_them(key: str) -> None:
    """A batch whose every event sent its id: ``read_sent`` gives the ids and keys the
    heads parse gives (values and types), leaves the items as they are, its depth says
    too deep exactly when ``json_depth`` does, and each key's worker is the shard
    function's (``ShardMap``) when every key is text, else the engine is left to hash."""
    rnd = random.Random(11)
    rd = reader(key)
    text_keys = 0
    for _ in range(300):
        make = event_with_id if rnd.random() < 0.5 else text_event_with_id  # half: every key text
        body = batch([make(rnd, i) for i in range(rnd.randint(1, 40))], rnd.choice(["", " "]))
        workers = rnd.choice([1, 2, 3, 5])
        got = rd.read_sent(raws_of(body), workers)
        assert got is not None, body
        ids, keys, depth, owners = got
        want_items, want_ids, want_keys = python_path(rd, body)
        assert [bytes(r) for r in want_items] == [bytes(r) for r in raws_of(body)]  # nothing generated
        assert ids == want_ids and [type(i) for i in ids] == [type(i) for i in want_ids]
        assert keys == want_keys and [type(k) for k in keys] == [type(k) for k in want_keys]
        if workers > 1 and all(type(k) is str for k in keys):
            text_keys += 1
            assert owners == ShardMap(workers).of_many(keys)
        else:
            assert owners is None
        for limit in range(1, 10):
            assert (depth + 2 > limit) == (json_depth(body, limit) > limit), (limit, body)
    assert text_keys > 10  # the owners were checked, not only their absence


@pytest.mark.parametrize("event", [
    b'{"user":"u"}',  # no id: the Python path makes one (a batch mixing the two)
    b'{"id":"a\\u0041"}',  # an escaped id: the decoder's text, not the bytes
    b'{"id":1.5}', b'{"id":true}', b'{"id":{"a":1}}', b'{"id":["x"]}',
    b'{"id":123456789012345678901234567890}',  # beyond 64 bits
    b'{"\\u0069d":"x"}',
    b"[1]", b'"s"', b"null", b'{ "id":"x"}',
])
def test_sent_ids_declines_what_only_the_python_path_may_answer(event: bytes) -> None:
    body = batch([b'{"id":"a","user":"u"}', event])
    assert reader("id").read_sent(raws_of(body)) is None
    assert reader("user").read_sent(raws_of(body)) is None


def test_sent_ids_is_refused_bad_arguments() -> None:
    raws = raws_of(batch([b'{"id":"a"}']))
    with pytest.raises(ValueError):
        batchread.sent_ids(raws, b"", None)
    with pytest.raises(ValueError):
        batchread.sent_ids(raws, b'"id"', b"")
    with pytest.raises(TypeError):
        batchread.sent_ids(tuple(raws), b'"id"', None)
    with pytest.raises(ValueError):
        batchread.sent_ids(raws, b'"id"', None, 0)  # a worker count
