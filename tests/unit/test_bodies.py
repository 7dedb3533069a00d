"""Request bodies before they are read as events: the nesting depth check."""

from __future__ import annotations

import pytest

from collector.http.bodies import json_depth


@pytest.mark.parametrize("depth", range(1, 12))
def test_json_depth_says_deeper_exactly_when_the_body_is(depth: int) -> None:
    # brackets inside strings and escaped quotes do not count
    body = b'{"s":"[{\\"}]",' + b'"a":[' * (depth - 1) + b"1" + b"]" * (depth - 1) + b"}"
    for limit in range(1, 14):
        assert (json_depth(body, limit) > limit) == (depth > limit), (depth, limit)
