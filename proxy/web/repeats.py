"""Retries never pay twice: a repeat of a request is answered from its first attempt.

OpenAI takes no idempotency key, and the official SDKs retry a request that timed out
(or lost its connection) while its image was still rendering: OpenAI bills both. A
request is a repeat when it comes from the same team, to the same path, with the same
content (`Door.digest`: its parsed fields and file bytes, whatever the framing), within
`retries.window_s` of the first (or while the first is still in flight), and it either
carries the same `Idempotency-Key` or is an SDK retry (`x-stainless-retry-count` ≥ 1).
The ledger decides who was first, for every worker and replica (`Ledger.first_attempt`):

    first in flight              the repeat waits for it to end, then as below; if its
                                 process dies, or it outlives its deadline, as one not kept
    first streaming, kept so far the repeat follows it: the events so far, then the rest
                                 as they come (`proxy.web.kept_streams`)
    first answered, answer kept  the repeat gets the kept answer, `x-tollgate-replay-of`,
                                 recorded with outcome `replayed` at no cost
    background response created  as answered (its create's answer, kept or not: the
                                 repeat never waits for the response to end)
    first sent, never answered   its 502/504 again, `replayed` at no cost (`failed_again`):
                                 OpenAI may have billed the first, and would bill a resend
    first charged, answer not    `409 answer_not_kept`, `replayed` at no cost (`not_kept`):
    kept (`charged`)             keyed, or a charged failure; never sent again
    anything else                the repeat is forwarded as a new request (a first that
                                 failed without a charge; one whose client got its answer
                                 and that carried no key)

Attempts that arrive together (on two workers or replicas) would each find no first: a
repeat's reservation checks again, in its own transaction, that the latest attempt is the
one it looked at (`RepeatGuard`); if another reserved meanwhile it is not reserved
(`RepeatArrived`) and goes back to wait for that one.

An attempt's answer is kept (`Ledger.keep_answer`, within `retries.store_bytes`) when its
client was gone before it ended — what a retry follows — or when it carried an
`Idempotency-Key`; it is kept before the attempt is settled (or held), so a repeat that
sees the first settled finds its answer. A stream is kept as it goes, once it is sure to
be kept. An `Idempotency-Key` reused with another content is
`409 idempotency_conflict`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy.core.errors import (
    AnswerNotKept,
    IdempotencyConflict,
    RequestError,
    UpstreamFailure,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.core.models import Entry, Settlement
from proxy.ledger import FirstAttempt, KeptAnswer, KeptTail, Owner, RepeatGuard
from proxy.ledger.base import this_host
from proxy.web.housekeeping import dead
from proxy.web.kept_streams import Recorder, follow
from proxy.web.observe import observe
from proxy.web.runtime import Runtime

RETRY_HEADER = "x-stainless-retry-count"
KEY_HEADER = "idempotency-key"
REPLAY_HEADER = "x-tollgate-replay-of"
WAIT_S = 0.1
"""How often a repeat asks the ledger whether its first attempt has ended, or kept some of
its stream already."""
OWNER_CHECK_S = 1.0
"""How often a waiting repeat asks whether its first attempt's process is still alive."""
RACES = 8
"""How many times a repeat goes back to wait for an attempt of its request that reserved
while it was looking (`RepeatArrived`) before it is refused with a 503."""
HERE = Owner("", this_host(), os.getpid())
NOT_REPLAYED = frozenset({"content-length", "transfer-encoding", "x-tollgate-request-id"})


@dataclass(frozen=True, slots=True)
class Marks:
    """What a request's repeats match, and whether it says it is one."""

    content: str
    """The digest of its team, path and content."""
    key: str | None
    """The digest of its team and `Idempotency-Key`, when it sent one."""
    repeat: bool
    """It carries a key, or is an SDK retry: it may repeat an earlier request."""


def repeatable(request: Request) -> bool:
    """Whether a request may be repeated, or repeat another: an SDK's (it sends its retry
    count, 0 the first time) or one with a key. A request with neither is always new
    (users may really want two images) and its content is never digested."""
    headers = request.headers
    return RETRY_HEADER in headers or bool(headers.get(KEY_HEADER))


def marks(request: Request, team: str, path: str, digest: bytes) -> Marks:
    """The marks of a `repeatable` request."""
    retry = request.headers.get(RETRY_HEADER)
    key = request.headers.get(KEY_HEADER)
    content = hashlib.sha256(f"{team}\0{path}\0".encode() + digest).hexdigest()
    key_digest = hashlib.sha256(f"{team}\0{key}".encode()).hexdigest() if key else None
    # ASCII only: header values are latin-1, where `²` is a digit to isdigit, not to int.
    count = int(retry) if retry is not None and retry.isascii() and retry.isdigit() else 0
    return Marks(content, key_digest, bool(key) or count >= 1)


async def first_of(runtime: Runtime, team: str, found: Marks, now: float) -> FirstAttempt | None:
    """The first attempt `found` repeats, if there is one within the window, or still in
    flight (a window shorter than a rendering would otherwise have each retry that comes
    after it sent, and billed, again while the first still renders)."""
    config = runtime.config
    window = now - config.retries.window_s
    in_flight = now - config.upstream.deadline_s - config.upstream.timeout_s
    since = min(window, in_flight)
    if found.key is not None:
        first = await runtime.ledger.first_attempt(team, since, key=found.key)
    else:
        first = await runtime.ledger.first_attempt(team, since, content=found.content)
    if first is None or (first.started_at < window and (first.settled or first.held)):
        return None  # it ended before the window: this is a new request
    if first.content_digest != found.content:  # by key: the key's first asked otherwise
        raise IdempotencyConflict(
            "This Idempotency-Key was used for a request with another content. Use a new "
            "key for a new request."
        )
    return first


async def replay(
    runtime: Runtime,
    entry: Entry,
    team: str,
    found: Marks,
    headers: dict[str, str],
) -> Response | RepeatGuard:
    """The answer to a repeat from its first attempt, recorded as `replayed`; else, when it
    must be forwarded as a new request, the guard its reservation checks (`RepeatGuard`:
    no other attempt may have reserved since this one looked)."""
    clock = runtime.clock
    now = clock()
    first = await first_of(runtime, team, found, now)
    since = now - runtime.config.retries.window_s

    def forward(past: FirstAttempt | None) -> RepeatGuard:
        request_id = past.request_id if past is not None else None
        return RepeatGuard(team, since, found.content, found.key, request_id)

    if first is None:
        return forward(None)
    # The first's own process ends it at its deadline, then settles it within the
    # settlement's retries (`upstream.timeout_s`): an answer it read whole just before the
    # deadline is kept after it, and a repeat forwarded meanwhile would be billed again.
    upstream = runtime.config.upstream
    checked = clock()
    deadline = min(entry.started_at, began(first, checked)) + upstream.deadline_s
    deadline += upstream.timeout_s
    lost: str | None = None  # the first attempt whose process was found dead
    while True:
        # Read after `first`: an answer kept before the first settled (or was held) is seen.
        tail = await runtime.ledger.kept_tail(first.request_id, -1)
        if tail is not None and tail.answer.team == team:
            if not tail.answer.live:
                return await replayed(runtime, entry, first.request_id, tail.answer, headers)
            if tail.answer.body:
                return await followed(runtime, entry, first, tail, headers, deadline)
        if first.settled and unanswered(first):
            return await failed_again(runtime, entry, team, first, headers)
        if (first.settled or first.held) and charged(first, found.key is not None):
            return await not_kept(runtime, entry, team, first, headers)
        if first.settled or first.held:
            # It ended without a charge, or its client got its answer (and it carried no
            # key), or it is such a background response whose create was answered: this
            # repeat is a new request.
            return forward(first)
        now = clock()
        if lost == first.request_id or now >= deadline:
            # Its process died (and it did not end just before), or it outlived its
            # deadline and its settlement: it is reclaimed at its bound (flagged), as OpenAI
            # may have billed it, so this repeat is not sent again.
            return await not_kept(runtime, entry, team, first, headers, LOST)
        if now - checked >= OWNER_CHECK_S:
            checked = now
            if await gone(runtime, first.owner):
                lost = first.request_id
                first = await first_of(runtime, team, found, clock()) or first
                continue  # read once more: it may have ended as its process stopped
        await asyncio.sleep(WAIT_S)
        first = await first_of(runtime, team, found, clock()) or first


def began(first: FirstAttempt, now: float) -> float:
    """When `first` began on this process's clock, `now` being that clock just after it was
    read: its age on the ledger's clock, never its `started_at`, which its own replica's
    wall clock wrote (a minute behind this one's, a repeat's wait ended a minute early,
    while it still rendered). A row reserved before the ledger recorded its clock: its
    `started_at`."""
    return first.started_at if first.age_s is None else now - first.age_s


def unanswered(first: FirstAttempt) -> bool:
    """Whether a settled first attempt got no answer from the upstream after it was sent (a
    reset, a silence past `timeout_s`, its deadline): charged its bound, as OpenAI may have
    billed it. Sending its repeat would pay for the same request again."""
    return first.outcome == "upstream_error" and first.cost_nanos > 0 and first.status in (502, 504)


def charged(first: FirstAttempt, keyed: bool) -> bool:
    """Whether an ended (or held) first attempt whose answer is not kept was charged, so
    that sending its repeat could pay for the same request twice: with an
    `Idempotency-Key`, any first charged or held (its answer was to be kept: it was larger
    than `retries.store_bytes`, pushed out by newer answers, or the ledger refused it);
    without one (an SDK retry), a first charged for a failure (a stream broken off after
    it was sent, whose client read it to its end). A first that succeeded, carried no key
    and whose client got its answer is not kept: its repeat is a new request."""
    if first.held:
        return keyed
    if first.cost_nanos <= 0:
        return False
    return keyed or first.outcome == "upstream_error"


CHARGED = "was charged, as OpenAI may have billed it, and its answer was not kept for a replay"
LOST = (
    "was in flight when its Tollgate process stopped, or outlived its deadline: it is "
    "charged its bound, as OpenAI may have billed it, and has no answer to replay"
)


async def not_kept(
    runtime: Runtime,
    entry: Entry,
    team: str,
    first: FirstAttempt,
    headers: dict[str, str],
    why: str = CHARGED,
) -> Response:
    """A repeat of a `charged` first attempt whose answer is not kept, or of one that will
    never end (`LOST`: its process died, or it outlived its deadline and its settlement,
    and is reclaimed at its bound): `409 answer_not_kept` (`x-should-retry: false`),
    recorded as `replayed` at no cost, never forwarded."""
    failure = AnswerNotKept(
        f"The first attempt of this request ({first.request_id}) {why}: Tollgate does not "
        "send it again. Send it as a new request (without a retry count or with a new "
        "Idempotency-Key) to pay for another."
    )
    return await replayed(
        runtime, entry, first.request_id, refusal(runtime, team, first, failure), headers
    )


async def failed_again(
    runtime: Runtime,
    entry: Entry,
    team: str,
    first: FirstAttempt,
    headers: dict[str, str],
    found: str = "",
) -> Response:
    """A repeat of an `unanswered` first attempt: its failure again, recorded as `replayed`
    at no cost, never forwarded (the SDKs retry a 502 or 504; OpenAI may have billed the
    first already, and would bill the repeat too). `found`: a sentence naming what the
    first made upstream after all, which the team can read."""
    kind: type[UpstreamFailure] = UpstreamTimeout if first.status == 504 else UpstreamUnavailable
    failure = kind(
        f"The first attempt of this request ({first.request_id}) got no answer from the "
        "upstream after it was sent, and OpenAI may have billed it: Tollgate does not send "
        f"it again.{found} Send it as a new request (without a retry count or with a new "
        "Idempotency-Key) to pay for another.",
        maybe_billed=True,
    )
    return await replayed(
        runtime, entry, first.request_id, refusal(runtime, team, first, failure), headers
    )


def refusal(runtime: Runtime, team: str, first: FirstAttempt, failure: RequestError) -> KeptAnswer:
    """`failure` as the answer a repeat of `first` is replayed, in OpenAI's error shape."""
    return KeptAnswer(
        first.request_id,
        team,
        failure.status,
        (("content-type", "application/json"), *failure.headers().items()),
        json.dumps(failure.body()).encode(),
        False,
        runtime.clock(),
    )


async def replayed(
    runtime: Runtime, entry: Entry, first_id: str, kept: KeptAnswer, headers: dict[str, str]
) -> Response:
    """A repeat answered with the kept answer of its first attempt `first_id`, recorded
    with outcome `replayed` at no cost."""
    answer_headers = await recorded(runtime, entry, first_id, kept, headers)
    if kept.stream:
        body = kept.body
        return StreamingResponse(iter((body,)), kept.status, headers=answer_headers)
    return Response(kept.body, kept.status, headers=answer_headers)


async def followed(
    runtime: Runtime,
    entry: Entry,
    first: FirstAttempt,
    tail: KeptTail,
    headers: dict[str, str],
    deadline: float,
) -> Response:
    """A repeat of a stream still streaming: the events so far, then each later one as the
    first attempt passes it on (`kept_streams.follow`), recorded as `replayed` at once."""
    kept = tail.answer
    answer_headers = await recorded(runtime, entry, first.request_id, kept, headers)

    async def stopped() -> bool:
        return await gone(runtime, first.owner)

    events = follow(runtime, tail, deadline, stopped, OWNER_CHECK_S)
    return StreamingResponse(events, kept.status, headers=answer_headers)


async def recorded(
    runtime: Runtime, entry: Entry, first_id: str, kept: KeptAnswer, headers: dict[str, str]
) -> dict[str, str]:
    """Record a repeat answered from `first_id` (outcome `replayed`, no cost); the headers
    of its answer."""
    now = runtime.clock()
    settlement = Settlement(
        finished_at=now,
        outcome="replayed",
        status=kept.status,
        upstream_request_id=first_id,
        latency_ms=(now - entry.started_at) * 1000,
    )
    await runtime.ledger.record(entry, settlement)
    observe(runtime, entry, settlement, ())
    answer_headers = {k: v for k, v in kept.headers if k.lower() not in NOT_REPLAYED}
    answer_headers.update(headers)
    answer_headers["x-tollgate-cost-usd"] = "0"
    answer_headers[REPLAY_HEADER] = first_id
    return answer_headers


async def gone(runtime: Runtime, owner: str | None) -> bool:
    """Whether the process `owner` that holds a first attempt has stopped (its pid is gone
    on this host, or its heartbeat stopped; housekeeping's rule)."""
    if owner is None:
        return False
    for process in await runtime.ledger.owners():
        if process.id == owner:
            return dead(process, HERE)
    return True  # not among the processes that hold reservations: it is gone


@dataclass(frozen=True, slots=True)
class Keep:
    """When an attempt's answer is kept for its repeats."""

    team: str
    keyed: bool
    """It carried an `Idempotency-Key`: always kept."""
    gone: Callable[[], Awaitable[bool]]
    """Whether its client is gone (then a retry may follow)."""
    store_bytes: int

    def sure(self, listening: bool) -> bool:
        """Whether the answer is sure to be kept by now: keyed, or its client gone (a
        client gone stays gone)."""
        return self.keyed or not listening

    async def wanted(self, listening: bool | None = None) -> bool:
        """Whether to keep the answer: keyed, or its client gone (`listening`, a stream's
        reader, says so; else the connection is asked)."""
        if self.keyed:
            return True
        return not listening if listening is not None else await self.gone()

    async def keep(
        self,
        runtime: Runtime,
        request_id: str,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        """Keep an answer read whole."""
        answer = KeptAnswer(
            request_id, self.team, status, tuple(headers), body, False, runtime.clock()
        )
        await runtime.ledger.keep_answer(answer, self.store_bytes)

    def recorder(
        self, runtime: Runtime, request_id: str, status: int, headers: list[tuple[str, str]]
    ) -> Recorder:
        """What keeps a stream as it goes (`proxy.web.kept_streams`)."""
        head = KeptAnswer(request_id, self.team, status, tuple(headers), b"", True, 0.0)
        return Recorder(runtime, head, self.store_bytes)
