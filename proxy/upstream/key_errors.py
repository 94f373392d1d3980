"""Error answers that refuse or quote the company key, replaced before a team sees them.

OpenAI's 401 quotes a piece of the key it refused (`Incorrect API key provided:
sk-pro***kb0A`), and another error may quote it too: such an answer is replaced by
Tollgate's own (`KeyRefused`), its status and plain `type` and `code` kept. Every other
error answer passes as it came, its first bytes read ahead to look for the key (`Peeked`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.core.scrubbing import Scrubber
from proxy.upstream.answer import BROKEN_OFF, Answer

log = logging.getLogger("tollgate")

KEY_REFUSED = 401
"""The status of an answer that refuses the company key: never passed on as it came, as
OpenAI's own quotes a piece of the key (`Incorrect API key provided: sk-pro***kb0A`)."""
ERROR_PEEK = 64 * 1024
"""How much of an error answer is read before it is passed on, to find a key it quotes."""
PLAIN_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)


async def vetted(answer: Answer, scrubber: Scrubber) -> Answer:
    """An error answer as it may reach a team: Tollgate's own (`KeyRefused`) when it refuses
    the company key (401) or quotes the key, whole or a piece of it; else as it came, its
    first `ERROR_PEEK` bytes read ahead (`Peeked`)."""
    head, chunks = b"", answer.chunks()
    rest: AsyncIterator[bytes] | None = chunks
    broken: Exception | None = None
    try:
        async for chunk in chunks:
            head += chunk
            if len(head) >= ERROR_PEEK:
                break
        else:
            rest = None
    except BROKEN_OFF as exc:
        broken, rest = exc, None
    except BaseException:
        # Cancelled while read ahead (the exchange's deadline, a stop): nobody else holds
        # the answer to close it, and its connection would stay out of the pool.
        await answer.aclose()
        raise
    if answer.status != KEY_REFUSED and not scrubber.quoted_in(head):
        return Peeked(answer, head, rest, broken)
    await answer.aclose()
    refused = KeyRefused(answer, head, scrubber)
    # The id as it came, scrubbed: an upstream that echoes the key may echo it there too.
    upstream_id = scrubber.text(answer.headers.get("x-request-id", "(no id)"))
    log.warning(
        "the upstream answered %d (%s) quoting or refusing the company key, request %s: "
        "the team got Tollgate's own error; check upstream.api_key",
        answer.status, refused.code, upstream_id,
    )  # fmt: skip
    return refused


class Peeked:
    """An answer whose first bytes were read ahead: they come first, then the rest."""

    def __init__(
        self,
        answer: Answer,
        head: bytes,
        rest: AsyncIterator[bytes] | None,
        broken: Exception | None,
    ) -> None:
        self.status = answer.status
        self.headers = answer.headers
        self._answer = answer
        self._head = head
        self._rest = rest
        self._broken = broken

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._head:
            yield self._head
        if self._broken is not None:
            raise self._broken
        if self._rest is not None:
            async for chunk in self._rest:
                yield chunk

    async def aclose(self) -> None:
        await self._answer.aclose()


class KeyRefused:
    """Tollgate's own answer, in OpenAI's error shape, to an upstream error that refuses or
    quotes the company key: the same status, and OpenAI's `type` and `code` when they are
    plain names (`invalid_api_key`), so SDKs and the ledger read it as before; the message
    is Tollgate's, and names no piece of the key. The upstream's headers are kept (its
    request id, rate-limit and retry headers), but for those of its body, which is replaced;
    they are scrubbed as every answer's are."""

    def __init__(self, answer: Answer, body: bytes, scrubber: Scrubber) -> None:
        self.status = answer.status
        error = _error_of(body)
        self.type = _plain(error.get("type"), scrubber) or "invalid_request_error"
        self.code = _plain(error.get("code"), scrubber) or (
            "invalid_api_key" if answer.status == KEY_REFUSED else "upstream_error"
        )
        if answer.status == KEY_REFUSED:
            message = (
                "The upstream (OpenAI) refused the API key Tollgate sends on the company's "
                "behalf: your Tollgate key was accepted. Ask the Tollgate operators to check "
                "`upstream.api_key`."
            )
        else:
            message = (
                f"The upstream (OpenAI) answered {answer.status} ({self.code}) with a message "
                "that quotes the API key Tollgate sends on the company's behalf; Tollgate does "
                "not pass it on. Ask the Tollgate operators, with this answer's "
                "x-tollgate-request-id."
            )
        self._body = json.dumps(
            {"error": {"message": message, "type": self.type, "param": None, "code": self.code}}
        ).encode()
        kept = [
            (k, v)
            for k, v in answer.headers.items()
            if k.lower() not in ("content-type", "content-length", "content-encoding")
            and k.lower() != "transfer-encoding"
        ]
        kept.append(("content-type", "application/json"))
        self.headers = CIMultiDictProxy(CIMultiDict(kept))

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    async def aclose(self) -> None:
        pass  # the upstream's answer was closed when this one replaced it


def _error_of(body: bytes) -> dict[str, Any]:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return {}
    return error if isinstance(error, dict) else {}


def _plain(value: Any, scrubber: Scrubber) -> str | None:
    """`value` when it is a plain name (an error `type` or `code`) that is not the key,
    else None."""
    if isinstance(value, str) and PLAIN_CODE.fullmatch(value) and scrubber.text(value) == value:
        return value
    return None
