"""Team keys: how a request is tied to a team (pure).

Team files hold only the sha256 of each key. A request's bearer token is hashed
and looked up by that hash, then compared with `hmac.compare_digest`: the lookup
works on a digest of the secret, so its timing tells nothing about the secret.

A team key is Tollgate's credential and never OpenAI's: a client that also writes it into
its URL (`?api-key=tg_...`, as some clients do for other gateways) or into a header
would have it sent upstream, into OpenAI's logs. `carries_key` finds it there, as sent
or percent-encoded, so that what carries it is left out of what is forwarded.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Container, Mapping
from typing import TypeVar
from urllib.parse import unquote_plus

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


WORD = re.compile(r"[A-Za-z0-9_\-]{8,}")
"""A run of characters a key from `new_key` is written in, long enough to be one."""
DECODINGS = 4
"""How many times a text is percent-decoded, as readers further on may each decode it."""


def carries_key(text: str, token: str | None, keys: Container[str] = ()) -> bool:
    """Whether `text` (a query parameter, a header's value) holds a team key, as sent or
    percent-encoded: the caller's own `token` anywhere in it, or a key whose sha256 is in
    `keys` as the whole text, either side of its `=`, or a word of it.

    `carries_key("api-key=tg_abc%5Fdef", "tg_abc_def")` is True."""
    forms = [text]
    for _ in range(DECODINGS):
        plain = unquote_plus(forms[-1])
        if plain == forms[-1]:
            break
        forms.append(plain)
    if token and any(token in form for form in forms):
        return True
    if not keys:
        return False
    words = {w for form in forms for w in (form, *form.split("=", 1), *WORD.findall(form))}
    return any(key_hash(word) in keys for word in words)


def without_keys(query: str, token: str | None, keys: Container[str] = ()) -> str:
    """`query` (as sent, percent-encoded) without the parameters that carry a team key
    (`carries_key`); the others kept as they were sent, in their order."""
    if not query:
        return query
    # `;` splits parameters too for some readers: a piece holding one is kept or left out
    # whole, so whatever reads it finds no key in what is kept.
    return "&".join(p for p in query.split("&") if not carries_key(p, token, keys))
