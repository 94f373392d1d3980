"""Team keys: hashing, fresh keys, and identifying the holder of a bearer key."""

from __future__ import annotations

import hashlib

import pytest

from proxy.core.auth import KEY_PREFIX, carries_key, identify, key_hash, new_key, without_keys
from proxy.core.errors import AuthenticationFailed

KEY = "tg_design_0123456789abcdefghij"


@pytest.fixture
def keys() -> dict[str, str]:
    return {key_hash(KEY): "design", key_hash("tg_research_key_zyxwvu"): "research"}


def test_key_hash_is_the_sha256_hex_digest() -> None:
    assert key_hash(KEY) == hashlib.sha256(KEY.encode()).hexdigest()
    assert len(key_hash(KEY)) == 64
    assert set(key_hash(KEY)) <= set("0123456789abcdef")


def test_new_key_has_the_tollgate_prefix_and_enough_entropy() -> None:
    key = new_key()
    assert key.startswith(KEY_PREFIX) and KEY_PREFIX == "tg_"
    assert len(key) >= len(KEY_PREFIX) + 43


def test_new_keys_are_unique() -> None:
    assert len({new_key() for _ in range(200)}) == 200


@pytest.mark.parametrize("header", [f"Bearer {KEY}", f"bearer {KEY}", f"Bearer   {KEY}  "])
def test_identify_finds_the_holder_of_the_key(keys: dict[str, str], header: str) -> None:
    assert identify(header, keys) == "design"


def test_identify_tells_teams_apart(keys: dict[str, str]) -> None:
    assert identify("Bearer tg_research_key_zyxwvu", keys) == "research"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {KEY}",
        KEY,
        f"Token {KEY}",
        "Bearer tg_unknown_key_000000",
    ],
    ids=["none", "empty", "no-token", "blank-token", "basic", "no-scheme", "token", "unknown"],
)
def test_identify_refuses_missing_malformed_or_unknown_keys(
    keys: dict[str, str], header: str | None
) -> None:
    with pytest.raises(AuthenticationFailed) as caught:
        identify(header, keys)
    error = caught.value
    assert error.status == 401
    assert error.code == "invalid_api_key"
    assert error.body()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "secret",
    ["tg_unknown_key_0123456789abcdef", new_key(), "sk-proj-abcdefghijklmnopqrstuvwxyz", "short"],
)
def test_error_message_never_contains_the_full_key(keys: dict[str, str], secret: str) -> None:
    with pytest.raises(AuthenticationFailed) as caught:
        identify(f"Bearer {secret}", keys)
    assert secret not in caught.value.message
    assert secret not in str(caught.value.body())


def test_hash_of_the_key_is_not_accepted_as_the_key(keys: dict[str, str]) -> None:
    with pytest.raises(AuthenticationFailed):
        identify(f"Bearer {key_hash(KEY)}", keys)


# -- a key written into a query or a header -------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        f"api-key={KEY}",
        f"key={KEY.replace('_', '%5F')}",
        f"key={KEY.replace('_', '%255F')}",  # encoded twice
        f"q=Bearer+{KEY}",
        f"auth=Bearer%20{KEY}%20",
        KEY,
        f"{KEY}=1",
        f"x=prefix{KEY}suffix",
    ],
)
def test_the_callers_own_key_is_found_however_it_is_written(text: str) -> None:
    assert carries_key(text, KEY)


def test_another_teams_key_is_found_as_a_whole_value_or_word(keys: dict[str, str]) -> None:
    other = "tg_research_key_zyxwvu"
    assert carries_key(f"api-key={other}", KEY, keys)
    assert carries_key(f"api-key={other.replace('_', '%5F')}", None, keys)
    assert carries_key(f"q=Bearer%20{other}", None, keys)
    assert not carries_key("limit=10", KEY, keys)
    assert not carries_key(f"api-key={other}", KEY)  # unknown without the team keys


def test_a_query_loses_only_the_parameters_that_carry_a_key(keys: dict[str, str]) -> None:
    query = f"limit=10&api-key={KEY}&after=file%2Dabc&key=tg_research_key_zyxwvu&order=asc"
    assert without_keys(query, KEY, keys) == "limit=10&after=file%2Dabc&order=asc"
    assert without_keys(f"api-key={KEY}", KEY, keys) == ""
    assert without_keys("", KEY, keys) == ""
    assert without_keys("a=1&b=2", KEY, keys) == "a=1&b=2"
