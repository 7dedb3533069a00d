"""The native shard="key" router (collector/worker/keyroute.c) against ShardMap.

Every line it routes must reach the owner ShardMap gives the decoded event's key, or
per-key state (dedup, aggregates, a cache entry) would be split between workers; every
line it cannot be sure of must make it decline, so the Python router decides.
"""

from __future__ import annotations

import random
import uuid
from array import array
from typing import Annotated

import msgspec
import pytest
from native import native

from collector.pipeline import ShardMap
from collector.protocol import ndjson_lines
from collector.worker.ranges import native_key

keyroute = native("collector.worker.keyroute")


class Ev(msgspec.Struct):
    user_id: str
    n: int = 0
    meta: dict[str, object] = {}


class IntEv(msgspec.Struct):
    uid: int
    note: str = ""


class MaybeEv(msgspec.Struct, rename="camel"):
    user_name: str | None = None
    x: int = 0


def owners_by_decoding(lines: list[bytes], T: type, key: str, n: int) -> list[int]:
    dec = msgspec.json.Decoder(T)
    return [ShardMap(n).of(getattr(dec.decode(ln), key)) for ln in lines]


def check_split(payload: bytes, T: type, key: str, n: int) -> None:
    """Every non-blank line once, at its owner, untouched, at its index."""
    lines = ndjson_lines(payload)
    want = owners_by_decoding(lines, T, key, n)
    spec = native_key(T, key)
    assert spec is not None
    for me in range(n):
        got = keyroute.split(payload, spec[0], n, me, spec[1])
        assert got is not None
        count, own, own_pos, parts = got
        assert count == len(lines)
        seen: dict[int, int] = {}
        own_lines = [msgspec.json.encode(x) for x in msgspec.json.decode(own)]
        for i, ln in zip(array("I", own_pos), own_lines, strict=True):
            assert msgspec.json.decode(ln) == msgspec.json.decode(lines[i])
            seen[i] = me
        for w, part, pos in parts:
            assert w != me
            plines = part.split(b"\n")
            for i, ln in zip(array("I", pos), plines, strict=True):
                assert ln == lines[i]  # the line as it came, not encoded again
                seen[i] = w
        assert seen == dict(enumerate(want))


def test_routes_every_line_to_the_owner_shardmap_gives_its_decoded_key() -> None:
    rnd = random.Random(5)
    users = [f"user-{i}" for i in range(300)] + ["ünïcode-ключ", "", "a b", "x/y"]
    lines = []
    for i in range(3000):
        u = rnd.choice(users)
        shape = i % 5
        if shape == 0:
            ev = {"user_id": u, "n": i}
        elif shape == 1:  # members before the key, nested values holding braces and quotes
            ev = {"n": i, "meta": {"a": [1, {"b": "}\"]["}], "c": "q\\\"x"}, "user_id": u}
        elif shape == 2:
            ev = {"meta": {"deep": [[[{}]]], "t": True, "f": None, "num": -1.5e3}, "user_id": u}
        else:
            ev = {"n": i, "user_id": u}
        text = msgspec.json.encode(ev)
        if i % 7 == 0:  # whitespace JSON allows, and \r\n endings
            text = text.replace(b":", b" :\t ").replace(b",", b" , ") + b"\r"
        lines.append(text)
        if i % 11 == 0:
            lines.append(b"   ")  # blank: not an event, not counted
    payload = b"\n".join(lines) + b"\n"
    for n in (2, 3, 5):
        check_split(payload, Ev, "user_id", n)


def test_int_keys_none_and_a_missing_key_with_a_none_default() -> None:
    ints = b"\n".join(msgspec.json.encode({"uid": u, "note": "x"}) for u in (0, 1, -7, 2**40, 123456789, -0 + 5))
    check_split(ints, IntEv, "uid", 2)
    check_split(ints, IntEv, "uid", 3)
    maybe = b"\n".join([b'{"userName":"ann"}', b'{"userName":null}', b'{"x":1}', b'{}', b'{"x":2,"userName":"bo"}'])
    check_split(maybe, MaybeEv, "user_name", 2)
    check_split(maybe, MaybeEv, "user_name", 3)


@pytest.mark.parametrize(
    "line",
    [
        b'{"user_id":"user-\\u0031"}',  # decodes to another text than the bytes: ShardMap hashes the text
        b'{"user\\u005fid":"user-1"}',  # an escaped member name that spells the key
        b'{"user_id":"a","user_id":"b"}',  # a duplicate member: the decoder keeps the last
        b'{"n":1}',  # the key is required and missing
        b'[1,2]',  # not an object
        b'{"user_id":5}',  # a value the field's type does not take
        b'{"user_id":"unterminated}',
    ],
)
def test_declines_a_range_with_a_line_it_cannot_be_sure_of(line: bytes) -> None:
    name, kinds = native_key(Ev, "user_id") or (b"", 0)
    good = b'{"user_id":"user-1"}\n'
    assert keyroute.split(good * 3, name, 2, 0, kinds) is not None
    assert keyroute.split(good + line + b"\n" + good, name, 2, 0, kinds) is None


def test_int_keys_it_declines() -> None:
    name, kinds = native_key(IntEv, "uid") or (b"", 0)
    for v in (b"-0", b"1.0", b"1e3", b"01", b"true", b'"1"', b"null"):
        assert keyroute.split(b'{"uid":' + v + b"}", name, 2, 0, kinds) is None, v


class Described(msgspec.Struct):
    k: Annotated[str | int, msgspec.Meta(description="documented keys are still plain text")]


def test_native_key_only_for_struct_keys_whose_text_is_what_shardmap_hashes() -> None:
    class U(msgspec.Struct):
        k: uuid.UUID

    class Arr(msgspec.Struct, array_like=True):
        k: str

    class C(msgspec.Struct):
        k: Annotated[str, msgspec.Meta(min_length=1)]

    assert native_key(U, "k") is None  # repr(UUID(...)) is not the JSON text
    assert native_key(Arr, "k") is None
    assert native_key(dict, "k") is None
    assert native_key(Ev, "missing") is None
    assert native_key(C, "k") == (b'"k"', keyroute.KIND_STR)
    assert native_key(Described, "k") == (b'"k"', keyroute.KIND_STR | keyroute.KIND_INT)
    assert native_key(MaybeEv, "user_name") == (
        b'"userName"', keyroute.KIND_STR | keyroute.KIND_NONE | keyroute.KIND_MISSING
    )


def test_bad_arguments_are_a_value_error_not_a_crash() -> None:
    with pytest.raises(ValueError, match="bad worker count"):
        keyroute.split(b"{}", b'"k"', 0, 0, 1)
    with pytest.raises(ValueError, match="bad worker count"):
        keyroute.split(b"{}", b'"k"', 2, 2, 1)
    assert keyroute.split(b"", b'"k"', 2, 1, 1) == (0, b"[]", b"", [])
    assert keyroute.split(memoryview(b'{"k":"a"}'), b'"k"', 1, 0, 1) == (1, b'[{"k":"a"}]', array("I", [0]).tobytes(), [])


def test_a_part_encoded_by_the_python_router_parses_in_one_pass() -> None:
    """msgspec's encode_lines ends with a newline: the array form must not get "[a,b,]"
    (valid events would then be parsed one by one, 2.5x slower)."""
    from collector.worker.decoding import ChunkDecoder

    evs = [Ev(f"u{i}", i) for i in range(3)]
    d = ChunkDecoder(Ev)
    lines = msgspec.json.Encoder().encode_lines(evs)
    assert bytes(d.as_array(lines)) == b"[" + b",".join(msgspec.json.encode(e) for e in evs) + b"]"
    assert bytes(d.as_array(lines[:-1])) == bytes(d.as_array(lines))
    assert d.decode(lines, True) == (evs, None, [])
