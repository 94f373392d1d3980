"""Background responses, followed to their end.

A Responses API request with `background: true` is answered at once (`queued`) and runs
upstream afterwards; OpenAI bills it when it ends. Its reservation is held in the ledger
meanwhile (`Ledger.hold`: never reclaimed at its bound), and the followers poll
`GET /v1/responses/{id}` with the company key until the response is terminal, then settle
it from the usage it reports (`settlement.metered`): a cancelled or failed response
without usage releases its reservation.

A process that stops leaves its held reservations in the ledger; the housekeeping of a
live process adopts them (`Ledger.adopt`), and its followers pick them up (`adopted`) from
their rows, so a restart loses nothing.

A response still pending `STUCK_AFTER_S` after its request is logged as a warning (then
every `STUCK_LOG_EVERY_S` while it lasts), with its reservation: one that never ends keeps
its room held, never silently.

A poll answered 401 or 403 (the company key revoked, or no longer allowed in the project the
response was created under) is a configuration fault the operator fixes, and the response
may still run and be billed upstream: it is never settled for it, and is asked again
(`Refusals`: logged as an error when it starts and every `REFUSED_LOG_EVERY_S` while it
lasts, counted in the `tollgate_background_responses_refused` gauge until a poll reads the
response, or a 404, again), as a batch is (`proxy.web.batch_follow`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from proxy.core import settlement
from proxy.core.errors import LedgerError, MalformedAnswer, RequestError
from proxy.core.models import Entry, Settlement, Usage, usd_text
from proxy.core.settlement import Bound
from proxy.doors import ResponsesDoor
from proxy.ledger import HeldEntry
from proxy.ledger.base import OUTCOME_UNKNOWN
from proxy.upstream.answer import BROKEN_OFF
from proxy.web.projects import created_under

if TYPE_CHECKING:
    from proxy.web.exchange import Exchange
    from proxy.web.runtime import Runtime

log = logging.getLogger("tollgate.requests")

POLL_S = 1.0
"""How often a followed response is asked for its status."""
PICK_UP_S = 10.0
"""How often the ledger is asked for held reservations this process owns but does not
follow (adopted from a stopped process, or left by a settlement that failed)."""
GONE = "response_not_found"
"""The error code of a held response the upstream no longer knows (deleted): its outcome
is unknown, so it is charged its bound, flagged."""
REFUSED = (401, 403)
"""The answers to a poll that refuse the company key, not the object polled."""
REFUSED_LOG_EVERY_S = 300.0
"""How often an object whose polls keep being refused is logged again (it is polled every
second)."""
ERROR_BYTES = 64 * 1024
"""How much of a refused poll's answer is read for its error code."""
LOST_MARGIN_S = 3600.0
"""How long past a batch's span (`BATCH_SPAN_S`) after its create the batch found for a
create whose answer was lost is still looked for on the ledger: a create's clock and
OpenAI's may differ, and a batch may be finalized late."""
STUCK_AFTER_S = 3600.0
"""How long after its request a followed response may still be pending (`queued`,
`in_progress`) before it is logged as one that may never end: its reservation stays held
meanwhile, room its team cannot spend."""
STUCK_LOG_EVERY_S = 3600.0
"""How often a response that stays pending past `STUCK_AFTER_S` is logged again."""


class Followed(Protocol):
    """Something upstream that ends later, its reservation held until then."""

    async def poll(self, runtime: Runtime) -> bool:
        """Ask the upstream how it is; settle it if it ended. True once settled."""
        ...


class Followers:
    """What this process follows to its end, by the request id of its held reservation:
    background responses (`ResponseFollow`) and batches (`proxy.web.batch_follow.BatchFollow`).

    `follow` adds one; `run` polls every one of them each `POLL_S` seconds (at once when
    one is added) until it ends and is settled."""

    def __init__(self, poll_s: float = POLL_S, pick_up_s: float = PICK_UP_S) -> None:
        self.poll_s = poll_s
        self.pick_up_s = pick_up_s
        self.following: dict[str, Followed] = {}
        self._wake = asyncio.Event()

    def follow(self, request_id: str, followed: Followed) -> None:
        self.following[request_id] = followed
        self._wake.set()

    def nudge(self) -> None:
        """Poll now (a cancel was forwarded: something may have ended)."""
        self._wake.set()

    async def run(self, current: Callable[[], Runtime]) -> None:
        """Poll until cancelled; `current()` is the runtime in force (a reload may change the
        upstream client)."""
        picked_up = -self.pick_up_s
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            runtime = current()
            if loop.time() - picked_up >= self.pick_up_s:
                picked_up = loop.time()
                await self.pick_up(runtime)
            await self.poll_all(runtime)
            try:
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def pick_up(self, runtime: Runtime) -> None:
        """Follow the held reservations this process owns but does not follow yet."""
        try:
            for request_id, upstream_id in await runtime.ledger.held():
                if request_id in self.following:
                    continue
                found = await runtime.ledger.held_entry(request_id)
                if found is None:
                    continue  # settled meanwhile
                if request_id in self.following:
                    continue  # its request held it just now, and follows it itself
                followed = adopted(runtime, found, upstream_id)
                if followed is None:
                    await charge_bound(runtime, found, upstream_id)
                    continue
                self.following[request_id] = followed
                runtime.metrics.started()  # in flight here now: its settlement ends it
                log.info("following %s (%s), held by a stopped process", upstream_id, request_id)
        except LedgerError as exc:
            log.error("cannot read the held reservations: %s; will try again", exc)
        await self.pick_up_lost(runtime)

    async def pick_up_lost(self, runtime: Runtime) -> None:
        """Follow the batches found for creates charged their bound when their answers were
        lost (`Ledger.lost_batches`) that no follower of this process follows: the process
        that found one stopped, or it was found by a repeat. Each is resolved to its lines'
        cost when it ends (`LostBatchFollow`); replicas that follow one alike resolve it to
        the same cost."""
        from proxy.web.batch_follow import BATCH_SPAN_S, LostBatchFollow  # see `adopted`

        try:
            since = runtime.clock() - BATCH_SPAN_S - LOST_MARGIN_S
            for held, batch_id in await runtime.ledger.lost_batches(since):
                if held.entry.id in self.following:
                    continue
                project = created_under(runtime, held)
                self.following[held.entry.id] = LostBatchFollow(held.entry, batch_id, None, project)
                log.info(
                    "following %s, found for %s after its answer was lost",
                    batch_id, held.entry.id,
                )  # fmt: skip
        except LedgerError as exc:
            log.error("cannot read the batches found for lost creates: %s", exc)

    async def poll_all(self, runtime: Runtime) -> None:
        """Poll everything followed once; drop what was settled."""
        if not self.following:
            return
        pending = list(self.following.items())
        # One that fails in a way its poll did not foresee is asked again next time: it must
        # not end the loop, which would leave every other one held for good (this process
        # still beats its heartbeat, so no other adopts them).
        ended = await asyncio.gather(
            *(followed.poll(runtime) for _, followed in pending), return_exceptions=True
        )
        for (request_id, _), done in zip(pending, ended, strict=True):
            if isinstance(done, BaseException):
                if not isinstance(done, Exception):
                    raise done
                log.error("following %s failed: %r; will try again", request_id, done)
            elif done:
                self.following.pop(request_id, None)


@dataclass
class Refusals:
    """The current run of a followed object's polls that the upstream answered 401 or 403.

    What the object runs and bills cannot be read meanwhile, and it may still run and be
    billed upstream: it is never settled for it, and keeps its reservation held. The run is
    counted in the gauge of its `kind` (`tollgate_batches_refused`,
    `tollgate_background_responses_refused`) while it lasts, and logged by the caller when
    `refused` says so: at its first refusal, then every `REFUSED_LOG_EVERY_S`."""

    kind: Literal["batch", "response"]
    since: float | None = None
    """When the run began (None: the latest poll was not refused)."""
    polls: int = 0
    logged_at: float = -math.inf

    def refused(self, runtime: Runtime) -> bool:
        """One more refused poll; True when it is to be logged now."""
        now = runtime.clock()
        if self.since is None:
            self.since = now
            runtime.metrics.followed_refused(self.kind, True)
        self.polls += 1
        if now - self.logged_at < REFUSED_LOG_EVERY_S:
            return False
        self.logged_at = now
        return True

    def read_again(self, runtime: Runtime) -> int:
        """A poll was answered with the object (or a 404): the refused polls of the run that
        ends (0 when there was none), no longer counted."""
        if self.since is None:
            return 0
        polls = self.polls
        self.since, self.polls, self.logged_at = None, 0, -math.inf
        runtime.metrics.followed_refused(self.kind, False)
        return polls

    def lasted_s(self, runtime: Runtime) -> float:
        return runtime.clock() - (self.since if self.since is not None else runtime.clock())


def error_code(body: bytes) -> str:
    """The `error.code` of an error answer, for a log line (its message may quote a key)."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "(no code)"
    plain = isinstance(code, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", code, re.ASCII)
    return code if plain else "(no code)"


@dataclass
class Seen:
    """What the polls of a followed response saw before it ended."""

    stuck_logged_at: float = -math.inf
    """When it was last logged as pending past `STUCK_AFTER_S`."""


@dataclass(frozen=True, slots=True)
class ResponseFollow:
    """A background response (or one whose stream broke off), settled when it ends."""

    exchange: Exchange
    response_id: str
    refusals: Refusals = field(default_factory=lambda: Refusals("response"), compare=False)
    seen: Seen = field(default_factory=lambda: Seen(), compare=False)

    async def poll(self, runtime: Runtime) -> bool:
        exchange, response_id = self.exchange, self.response_id
        try:
            answer = await runtime.upstream.send(
                f"/responses/{response_id}", b"", "", (), method="GET", project=exchange.project
            )
        except RequestError as exc:
            log.warning("following %s: %s; will ask again", response_id, exc.message)
            return False
        meter = exchange.door.answer_meter() if answer.status == 200 else None
        refused, error = answer.status in REFUSED, b""
        try:
            try:
                async for chunk in answer.chunks():
                    if meter is not None:
                        meter.feed(chunk)
                    elif refused and len(error) < ERROR_BYTES:
                        error += chunk[: ERROR_BYTES - len(error)]
            finally:
                await answer.aclose()
            found = meter.finish() if meter is not None else None
        except (*BROKEN_OFF, MalformedAnswer) as exc:
            log.warning("following %s: unreadable answer (%s); will ask again", response_id, exc)
            return False
        if refused:
            self.refused(runtime, answer.status, error)
            return False
        if answer.status in (200, 404):
            polls = self.refusals.read_again(runtime)
            if polls:
                log.warning(
                    "following %s (%s): the upstream reads it again after %d refused polls",
                    response_id, exchange.entry.id, polls,
                )  # fmt: skip
        if answer.status == 404:
            verdict = settlement.unknown(exchange.bound, GONE)
        elif found is None:
            return False
        elif found.pending:
            self.pending(runtime, found.status)
            return False
        else:
            verdict = settlement.metered(exchange.bound, found)
        exchange.response_id = response_id
        try:
            await exchange.settle(verdict, answer.status, exchange.upstream_id)
        except LedgerError as exc:  # settle logs its own failures; be sure the loop lives
            log.error("settling %s failed: %s", response_id, exc)
            return False
        return True

    def pending(self, runtime: Runtime, status: str | None) -> None:
        """A poll found it still pending: logged once it has been for `STUCK_AFTER_S`, then
        every `STUCK_LOG_EVERY_S`, as its reservation stays held for as long."""
        seen, entry, now = self.seen, self.exchange.entry, runtime.clock()
        age = now - entry.started_at
        if age < STUCK_AFTER_S or now - seen.stuck_logged_at < STUCK_LOG_EVERY_S:
            return
        seen.stuck_logged_at = now
        log.warning(
            "following response %s (%s, team %s): still %s %.1f h after its request; its "
            "reservation of $%s stays held until it ends: cancel it (POST "
            "/v1/responses/{id}/cancel) if it never will",
            self.response_id, entry.id, entry.team, status, age / 3600,
            usd_text(entry.estimated_nanos),
        )  # fmt: skip

    def refused(self, runtime: Runtime, status: int, body: bytes) -> None:
        """A poll answered 401 or 403: the company key is refused, and whether the response
        ended, and what it billed, cannot be read. It is never settled for it (it may still
        run and be billed): logged, at most every `REFUSED_LOG_EVERY_S`, and counted."""
        refusals, entry = self.refusals, self.exchange.entry
        if not refusals.refused(runtime):
            return
        log.error(
            "following response %s (%s, team %s): the upstream refuses the company key (%d %s) "
            "for %d polls over %.0f s; its reservation of $%s stays held, as it may still run "
            "and be billed: fix upstream.api_key or the project it was created under (%s)",
            self.response_id, entry.id, entry.team, status, error_code(body), refusals.polls,
            refusals.lasted_s(runtime), usd_text(entry.estimated_nanos),
            self.exchange.project or "the key's default",
        )  # fmt: skip


async def charge_bound(runtime: Runtime, held: HeldEntry, upstream_id: str) -> None:
    """Settle at its bound, flagged, a held reservation whose models the price book no
    longer has (a reload took them away): it cannot be priced when it ends, and held it
    would keep its room reserved for good. Its bound is the most it may cost."""
    entry = held.entry
    log.error(
        "cannot follow %s (%s): its models are no longer in the price book; charged its "
        "bound, flagged outcome_unknown: see `tollgate ledger flagged`",
        upstream_id,
        entry.id,
    )
    charged = Settlement(
        finished_at=runtime.clock(),
        outcome="upstream_error",
        status=0,
        usage=held.usage,
        cost_nanos=entry.estimated_nanos,
        flagged=True,
        error_code=OUTCOME_UNKNOWN,
        response_id=upstream_id,
    )
    await runtime.ledger.settle(entry.id, charged)
    runtime.alerts.settled(entry)  # a threshold it crosses is announced, as for any charge


def adopted(runtime: Runtime, held: HeldEntry, upstream_id: str) -> Followed | None:
    """What follows a held reservation adopted from its row (None: it cannot be priced)."""
    from proxy.web.batch_follow import BatchFollow  # both import the runtime, which imports this
    from proxy.web.exchange import Exchange

    entry = held.entry
    project = created_under(runtime, held)
    if entry.endpoint == "batches":
        return BatchFollow(entry, upstream_id, None, project)
    bound = adopted_bound(runtime, entry, held.usage)
    if bound is None:
        return None
    exchange = Exchange(runtime, ResponsesDoor(), entry, bound, {}, project=project)
    return ResponseFollow(exchange, upstream_id)


def adopted_bound(runtime: Runtime, entry: Entry, usage: Usage) -> Bound | None:
    """The bound of a held reservation, rebuilt from its row: its models' prices as the
    book has them now (`Bound.repriced`), its reserved cost and usage."""
    book = runtime.config.prices
    # A request that makes no image records no image model: its image part, which bounds
    # nothing, is priced with the default one, as it was when it was sent.
    name = entry.model if entry.model is not None else runtime.config.default_model
    model = book.find(name)
    mainline = book.find_mainline(entry.mainline_model or "")
    if model is None or mainline is None:
        return None
    return Bound(
        model,
        entry.n or 0,
        entry.quality or "auto",
        entry.size or "auto",
        entry.estimated_nanos,
        usage,
        mainline,
        min(mainline.cost(usage.as_bound()), entry.estimated_nanos),
        repriced=True,
    )
