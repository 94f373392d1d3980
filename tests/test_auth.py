"""Team keys: hashing, fresh keys, and identifying the holder of a bearer key."""

from __future__ import annotations

import hashlib

import pytest

from proxy.core.auth import KEY_PREFIX, identify, key_hash, new_key
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
