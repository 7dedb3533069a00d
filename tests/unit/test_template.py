"""Templates (collector.template) and the Render stage on seed 001's description examples."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from collector.errors import ConfigError
from collector.stages import Render
from collector.template import compile_template, format_date, format_money

GAMES = {100: "Rocket Dice", 101: "It's bananas!"}
BET = (
    'Player #{player_id}[ ({player.email})] placed a bet of {amount:money:currency}'
    '[currency!=EUR| ({amount_eur:money:EUR})] on a game "{game_id:map:games}" on {created_at:date}.'
)


@pytest.mark.parametrize(("minor", "cur", "text"), [
    (500, "USD", "5 USD"), (468, "EUR", "4.68 EUR"), (10000, "EUR", "100 EUR"), (0, "GBP", "0 GBP"),
    (12345678, "BTC", "0.12345678 BTC"), (100000000, "BTC", "1 BTC"), (1999, "NZD", "19.99 NZD"), (-250, "EUR", "-2.5 EUR"),
])
def test_money_in_major_units_without_trailing_zeros(minor: int, cur: str, text: str) -> None:
    assert format_money(minor, cur) == text


@pytest.mark.parametrize(("value", "text"), [
    ("2022-01-10T12:34:56.789+00", "January 10th, 2022 at 12:34 UTC"),
    ("2022-03-03T12:12:12+00", "March 3rd, 2022 at 12:12 UTC"),
    ("2022-02-02T23:45:07.89+00", "February 2nd, 2022 at 23:45 UTC"),
    ("2022-05-11T01:00:00+02:00", "May 10th, 2022 at 23:00 UTC"),  # converted to UTC: the 10th
    ("2022-05-21T00:00:00Z", "May 21st, 2022 at 00:00 UTC"),
    ("2022-05-13T00:00:00Z", "May 13th, 2022 at 00:00 UTC"),
])
def test_dates_are_rendered_in_utc_with_ordinals(value: str, text: str) -> None:
    assert format_date(value) == text


def test_the_seeds_examples_with_optional_sections_and_guards() -> None:
    bet = compile_template(BET, {"games": GAMES})
    start = compile_template(
        'Player #{player_id}[ ({player.email})] started playing a game "{game_id:map:games}" on {created_at:date}.',
        {"games": GAMES})
    deposit = compile_template(
        "Player #{player_id}[ ({player.email})] made a deposit of {amount:money:currency}"
        "[currency!=EUR| ({amount_eur:money:EUR})] on {created_at:date}.")
    assert start({"player_id": 10, "game_id": 100, "created_at": "2022-01-10T12:34:56.789+00"}) == (
        'Player #10 started playing a game "Rocket Dice" on January 10th, 2022 at 12:34 UTC.')
    assert bet({"player_id": 11, "game_id": 101, "amount": 500, "currency": "USD", "amount_eur": 468,
                "created_at": "2022-02-02T23:45:07.89+00", "player": {"email": "john@example.com"}}) == (
        "Player #11 (john@example.com) placed a bet of 5 USD (4.68 EUR) on a game \"It's bananas!\" "
        "on February 2nd, 2022 at 23:45 UTC.")
    assert deposit({"player_id": 12, "amount": 10000, "currency": "EUR", "amount_eur": 10000,
                    "created_at": "2022-03-03T12:12:12+00", "player": {"email": ""}}) == (
        "Player #12 made a deposit of 100 EUR on March 3rd, 2022 at 12:12 UTC.")
    # a failed conversion (amount_eur 0) hides the EUR part rather than saying "0 EUR"
    assert "(0 EUR)" not in bet({"player_id": 1, "game_id": 100, "amount": 5, "currency": "BTC",
                                 "amount_eur": 0, "created_at": "2022-01-01T00:00:00Z"})


@pytest.mark.parametrize(("text", "why"), [
    ("{x:nope}", "unknown formatter 'nope'"), ("[open", "never closed"), ("a]", "closes no section"),
    ("{a b}", "not a field path"), ("{g:map:zz}", "unknown map 'zz'"), ("}", "unmatched"),
    ("{amount:money}", "money needs the currency"),
])
def test_bad_templates_fail_at_compile_time_naming_the_position(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        compile_template(text, name="t")


class Ev(msgspec.Struct):
    type: str
    player_id: int
    created_at: str
    description: str = ""


def test_render_stage_picks_the_template_by_type_and_never_drops_an_event() -> None:
    run: Any = Render(target="description", by="type", templates={
        "login": "Player #{player_id} logged in on {created_at:date}.",
        "*": "Player #{player_id} did {type}.",
    }).build()
    evs = [Ev("login", 1, "2022-01-10T12:34:56Z"), Ev("logout", 2, "2022-01-10T12:34:56Z"),
           Ev("login", 3, "not a date")]
    assert run(evs) == []
    assert [e.description for e in evs] == [
        "Player #1 logged in on January 10th, 2022 at 12:34 UTC.", "Player #2 did logout.", ""]
