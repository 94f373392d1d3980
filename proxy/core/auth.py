"""Team keys: how a request is tied to a team (pure).

Team files hold only the sha256 of each key. A request's bearer token is hashed
and looked up by that hash, then compared with `hmac.compare_digest`: the lookup
works on a digest of the secret, so its timing tells nothing about the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import TypeVar

from proxy.core.errors import AuthenticationFailed

KEY_PREFIX = "tg_"
T = TypeVar("T")


def key_hash(secret: str) -> str:
    """The sha256 hex digest stored in a team file."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> str:
    """A fresh team key: `tg_` and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def identify(authorization: str | None, keys: Mapping[str, T]) -> T:
    """The holder of the bearer key in `authorization`; AuthenticationFailed otherwise."""
    token = bearer_token(authorization)
    if token is None:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send your Tollgate team key as "
            "'Authorization: Bearer tg_...'.",
            reason="missing_key",
        )
    digest = key_hash(token)
    found = keys.get(digest)
    # Compare anyway on a miss, so both paths do the same work.
    expected = digest if found is not None else "0" * 64
    if found is None or not hmac.compare_digest(expected, digest):
        raise AuthenticationFailed(
            f"Incorrect API key provided: {redact(token)}. Ask your Tollgate administrator "
            "for your team's key.",
            reason="invalid_key",
        )
    return found


def redact(token: str) -> str:
    """`tg_abcd...wxyz` style, as OpenAI shows keys in errors."""
    return token[:6] + "*" * 4 + token[-4:] if len(token) > 12 else "*" * len(token)
