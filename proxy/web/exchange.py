"""One forwarded request: forward → meter → settle → observe → answer.

The exchange with the upstream runs in its own task, shielded from the client:
a client that disconnects does not stop metering, because OpenAI bills the
generation all the same. Streams are relayed event by event as they arrive.

Every exchange has a total deadline, `upstream.total_timeout_s` after the request
arrived (on the runtime's clock): an upstream still sending then is cut and the
request charged its bound, flagged `deadline_exceeded`. So a live request never
outlives the age at which housekeeping reclaims reservations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

from starlette.responses import Response, StreamingResponse

from proxy.core import settlement
from proxy.core.errors import (
    DeadlineExceeded,
    LedgerError,
    MalformedAnswer,
    RequestError,
    UpstreamUnavailable,
)
from proxy.core.models import Change, Entry, Outcome, Settlement, usd_text
from proxy.core.settlement import Bound, StreamEnd, Verdict
from proxy.doors.base import Door
from proxy.ledger import settle_patiently
from proxy.upstream import response_headers
from proxy.upstream.answer import BROKEN_OFF, Answer
from proxy.web.deadline import ReadDeadline
from proxy.web.follow import ResponseFollow
from proxy.web.observe import observe
from proxy.web.relay import Relay
from proxy.web.repeats import Keep
from proxy.web.responses import error_response, spooled_response
from proxy.web.runtime import Runtime
from proxy.web.spool import Spool

log = logging.getLogger("tollgate.requests")

ERROR_BODY_LIMIT = 1024 * 1024
DEADLINE_MESSAGE = (
    "The upstream's answer did not end within Tollgate's deadline for one request "
    "(upstream.total_timeout_s)."
)
Headers = Iterable[tuple[str, str]]


class _NotHeld(Exception):
    """A 2xx answer being read whole that its spool could not hold: no room in the spool
    memory and no temporary file to spill to (a full disk, too many open files)."""


class Exchange:
    """A request reserved and about to be forwarded: everything its settlement needs."""

    def __init__(
        self,
        runtime: Runtime,
        door: Door[Any],
        entry: Entry,
        bound: Bound,
        headers: dict[str, str],
        changes: tuple[Change, ...] = (),
        remaining_nanos: int | None = None,
        project: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.door = door
        self.entry = entry
        self.bound = bound
        self.headers = headers
        self.changes = changes
        self.remaining_nanos = remaining_nanos
        """Room left in the tightest USD budget with this request's bound reserved."""
        self.project = project
        """The OpenAI project the request is sent under, and its response followed under."""
        self.deadline = entry.started_at + runtime.config.upstream.deadline_s
        """When the exchange must be over, on the runtime's clock."""
        self.sent_at = 0.0
        self.response_id: str | None = None
        """A Responses API answer's response id, once read."""
        self.upstream_id: str | None = None
        self.settled = False
        self.keep: Keep | None = None
        """When set, the answer may be kept for the request's repeats."""

    # -- the two ways through ------------------------------------------------------

    async def whole(self, body: bytes, content_type: str, client_headers: Headers) -> Response:
        """Forward a request whose answer is read whole, then meter, settle and answer it."""
        try:
            answer = await self.send(body, content_type, client_headers)
        except RequestError as exc:
            return error_response(exc, self.after(await self.not_answered(exc)))
        return await self.read(answer)

    async def stream(self, body: bytes, content_type: str, client_headers: Headers) -> Response:
        """Forward a streamed request and pass its events through as they arrive; they are
        metered and settled once the stream ends, whether or not the client is still there."""
        headers = {**self.headers, "x-tollgate-reserved-usd": usd_text(self.entry.estimated_nanos)}
        if self.remaining_nanos is not None:
            headers["x-tollgate-budget-remaining-usd"] = usd_text(max(self.remaining_nanos, 0))
        try:
            answer = await self.send(body, content_type, client_headers)
        except RequestError as exc:
            cost = await self.not_answered(exc)
            return error_response(exc, {**headers, "x-tollgate-cost-usd": usd_text(cost)})
        ok = 200 <= answer.status < 300
        if not ok or "event-stream" not in answer.headers.get("content-type", ""):
            # Errors (and answers that are not streams) are metered like plain answers.
            return await asyncio.shield(self.runtime.spawn(self.read(answer)))
        relay = Relay()
        self.runtime.spawn(self.pump(answer, relay, headers))
        return StreamingResponse(
            relay.events(),
            status_code=answer.status,
            headers={**dict(response_headers(answer)), **headers},
        )

    # -- forward -------------------------------------------------------------------

    async def send(self, body: bytes, content_type: str, client_headers: Headers) -> Answer:
        """Send upstream within the exchange's deadline; DeadlineExceeded when it passes
        (`maybe_billed` once the request may have left)."""
        self.sent_at = time.monotonic()
        left = self.deadline - self.runtime.clock()
        if left <= 0:
            # A body that took the whole deadline to arrive: never sent, nothing billed.
            raise DeadlineExceeded(DEADLINE_MESSAGE)
        try:
            async with asyncio.timeout(left):
                return await self.runtime.upstream.send(
                    self.door.upstream_path, body, content_type, client_headers,
                    project=self.project,
                )  # fmt: skip
        except TimeoutError as exc:  # the deadline: the client's own are translated
            raise DeadlineExceeded(DEADLINE_MESSAGE, maybe_billed=True) from exc

    async def within_deadline(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """`chunks` until the exchange's deadline, then DeadlineExceeded: checked as each
        chunk arrives, and by a timer while the upstream sends none. The timer (one for the
        whole answer, `ReadDeadline`) interrupts only a read, never the consumer's work
        between two chunks."""
        clock, deadline = self.runtime.clock, self.deadline
        reading = aiter(chunks)
        timer = ReadDeadline(deadline - clock())
        try:
            while True:
                try:
                    if clock() >= deadline:
                        raise TimeoutError
                    chunk = await timer.read(reading)
                    if clock() >= deadline:
                        raise TimeoutError  # it came, but too late
                except StopAsyncIteration:
                    return
                except TimeoutError as exc:  # the upstream's own silences are translated
                    raise DeadlineExceeded(DEADLINE_MESSAGE, maybe_billed=True) from exc
                yield chunk
        finally:
            timer.close()

    # -- meter -----------------------------------------------------------------------

    async def read(self, answer: Answer) -> Response:
        """Read a whole answer into a spool, metering it on the way, then settle and answer:
        a 2xx at its metered price, an error answer passed through at nothing, an answer
        that broke off or cannot be read at its bound."""
        ok = 200 <= answer.status < 300
        # An error answer past its first 64 KiB goes to disk (and is passed on empty).
        spool = Spool(memory=self.runtime.spools if ok else None)
        meter = self.door.answer_meter() if ok else None
        upstream_id = answer.headers.get("x-request-id")
        held = True
        try:
            try:
                async for chunk in self.within_deadline(answer.chunks()):
                    if held:
                        try:
                            spool.write(chunk)
                        except OSError as exc:
                            if ok:
                                raise _NotHeld(exc) from exc
                            # An error answer is passed on empty past its first 64 KiB.
                            held = False
                            spool.close()
                    if meter is not None:
                        meter.feed(chunk)
            finally:
                await answer.aclose()
                self.observe_upstream()
            found = meter.finish() if meter is not None else None
        except (*BROKEN_OFF, MalformedAnswer, _NotHeld) as exc:
            spool.close()
            return await self.unreadable(answer, exc)
        if found is None:
            return await self.pass_error(answer, spool)
        self.response_id = found.response_id
        if found.pending and found.response_id is not None:
            return await self.hold(answer, spool, found.response_id)
        verdict = settlement.metered(self.bound, found)
        headers = self.after(verdict.cost_nanos)
        # Kept before the settlement: a repeat that sees this settled finds its answer.
        await self.keep_whole(answer, spool, headers)
        await self.settle(verdict, answer.status, upstream_id)
        return spooled_response(spool, answer, headers)

    async def keep_whole(self, answer: Answer, spool: Spool, headers: dict[str, str]) -> None:
        """Keep this answer, read whole, for the request's repeats, when it is wanted."""
        keep = self.keep
        if keep is None or spool.size > keep.store_bytes or not await keep.wanted():
            return
        kept = [*response_headers(answer), *headers.items()]
        try:
            await keep.keep(self.runtime, self.entry.id, answer.status, kept, spool.read_all())
        except LedgerError as exc:
            log.error("keeping the answer of %s failed: %s", self.entry.id, exc)

    async def hold(self, answer: Answer, spool: Spool, response_id: str) -> Response:
        """A background response that has not ended: its reservation is held in the ledger
        and the followers settle it when it ends (`proxy.web.follow`); the answer carries
        what is reserved, as a stream's does."""
        headers = {**self.headers, "x-tollgate-reserved-usd": usd_text(self.entry.estimated_nanos)}
        if self.remaining_nanos is not None:
            headers["x-tollgate-budget-remaining-usd"] = usd_text(max(self.remaining_nanos, 0))
        # Kept before the hold: a repeat that sees the first held finds its answer.
        await self.keep_whole(answer, spool, headers)
        await self.follow_later(response_id, answer.headers.get("x-request-id"))
        return spooled_response(spool, answer, headers)

    async def pass_error(self, answer: Answer, spool: Spool) -> Response:
        """An upstream error answer: passed through unchanged, nothing charged."""
        body = spool.getvalue() if spool.in_memory and spool.size <= ERROR_BODY_LIMIT else b""
        spool.close()
        verdict = settlement.refused(settlement.error_code(body))
        await self.settle(verdict, answer.status, answer.headers.get("x-request-id"))
        headers = {**dict(response_headers(answer)), **self.after(0)}
        return Response(body, status_code=answer.status, headers=headers)

    async def unreadable(self, answer: Answer, failure: Exception) -> Response:
        """An answer that broke off, is not JSON, outlived its deadline or could not be held
        (`_NotHeld`): the upstream may have billed; charged its bound, and its 502 says
        `x-should-retry: false` (an SDK's retry would be billed again)."""
        exc: RequestError
        if isinstance(failure, DeadlineExceeded):
            exc, code = failure, "deadline_exceeded"
        elif isinstance(failure, _NotHeld):
            log.error("holding the answer of %s failed: %s", self.entry.id, failure)
            exc = UpstreamUnavailable(
                "Tollgate could not hold the upstream's answer to meter it (no memory or disk "
                "for it). The request's estimated cost was charged and flagged for "
                "reconciliation.",
                maybe_billed=True,
            )
            code = settlement.ANSWER_NOT_HELD
        else:
            exc = UpstreamUnavailable(
                f"The upstream's answer could not be read ({failure}). The request's "
                "estimated cost was charged and flagged for reconciliation.",
                maybe_billed=True,
            )
            code = settlement.MALFORMED_ANSWER
        verdict = settlement.unknown(self.bound, code)
        upstream_id = answer.headers.get("x-request-id")
        await self.settle(verdict, exc.status, upstream_id)
        # The upstream's id is kept, as on an answer passed through: it is what OpenAI's
        # support asks for when the team queries a charge it could not see.
        kept = {"x-request-id": upstream_id} if upstream_id else {}
        return error_response(exc, {**kept, **self.after(verdict.cost_nanos)})

    async def follow_later(self, response_id: str, upstream_id: str | None) -> None:
        """Hold the reservation until the response `response_id` ends, and follow it."""
        self.upstream_id = upstream_id
        try:
            await self.runtime.ledger.hold(self.entry.id, response_id, self.project)
        except LedgerError as exc:
            # Still followed by this process; only a restart could lose track of it.
            log.error("ledger hold failed for %s: %s", self.entry.id, exc)
        followed = ResponseFollow(self, response_id)
        self.runtime.followers.follow(self.entry.id, followed)

    async def name_response(self, response_id: str) -> None:
        """Record which response this stream is as soon as it says: while it runs, its team
        may read, cancel or delete it (`proxy.web.response_objects`), which finds it by its
        row."""
        try:
            await self.runtime.ledger.name_response(self.entry.id, response_id, self.project)
        except LedgerError as exc:
            log.error("recording the response of %s failed: %s", self.entry.id, exc)

    async def pump(self, answer: Answer, relay: Relay, headers: dict[str, str]) -> None:
        """Read the upstream stream to its end, relaying and metering each event, then
        settle what it came to. `headers`: Tollgate's headers on the stream's answer (what
        it reserved, the room left), kept with its events for its repeats."""
        meter = self.door.stream_meter()
        broken: str | None = None
        keep = self.keep
        recorder = None
        if keep is not None:
            head = [*response_headers(answer), *headers.items()]
            recorder = keep.recorder(self.runtime, self.entry.id, answer.status, head)
        named = False
        try:
            async for chunk in self.within_deadline(answer.chunks()):
                meter.feed(chunk)
                relay.put(chunk)
                if recorder is not None and keep is not None:
                    recorder.put(chunk, keep.sure(relay.listening))
                if not named and meter.response_id is not None:
                    named = True
                    await self.name_response(meter.response_id)
        except BROKEN_OFF as exc:
            broken = exc.ledger_code
            if tail := meter.cut_short(exc):
                relay.put(tail)
                if recorder is not None and keep is not None:
                    recorder.put(tail, keep.sure(relay.listening))
        finally:
            await answer.aclose()
            relay.close()
            self.observe_upstream()
        end: StreamEnd = meter.end(broken)
        self.response_id = end.response_id
        # A Responses stream cut short, or that ended without a terminal event it could
        # read (a cancelled background stream, an error, an unreadable last event): the
        # response it named may still run upstream (and bill), and says what it billed
        # once it ends; it is followed to its end rather than charged its bound.
        followed = end.response_id if not end.terminal and self.bound.mainline else None
        verdict = settlement.stream_ended(self.bound, end)
        # Ended (or forgotten) before the settlement: a repeat that sees this settled
        # finds the whole stream. One that failed without a charge (an error before any
        # image) is forgotten: its repeat is sent as a new request. One that broke off is
        # charged (OpenAI may have billed it): it is kept as its client got it, the error
        # event that ends it included, and its repeats get it again, never a resend.
        if recorder is not None and keep is not None:
            unpaid = not followed and verdict.outcome != "ok" and not verdict.cost_nanos
            if unpaid:
                await recorder.abandon()
            else:
                await recorder.end(await keep.wanted(relay.listening))
        if followed:
            await self.follow_later(followed, answer.headers.get("x-request-id"))
            return
        await self.settle(verdict, answer.status, answer.headers.get("x-request-id"))

    async def not_answered(self, failure: RequestError) -> int:
        """Settle a request that got no answer; returns what it was charged."""
        self.observe_upstream()
        verdict = settlement.not_answered(self.bound, failure)
        await self.settle(verdict, failure.status, None)
        return verdict.cost_nanos

    # -- settle, observe, answer -------------------------------------------------------

    async def settle(self, verdict: Verdict, status: int, upstream_id: str | None) -> None:
        """Write the verdict to the ledger (riding out a short outage: the upstream has
        billed what it answered), then observe it in metrics, alerts and the log."""
        if self.settled:
            return  # a background response polled by two hands: the first settles it
        self.settled = True
        runtime, entry = self.runtime, self.entry
        now = runtime.clock()
        outcome: Outcome = verdict.outcome
        if outcome == "ok" and entry.downgrades:
            outcome = "downgraded"
        charge = verdict.charge
        settled = Settlement(
            finished_at=now,
            outcome=outcome,
            status=status,
            usage=charge.usage,
            cost_nanos=charge.cost_nanos,
            flagged=charge.flagged,
            upstream_request_id=upstream_id,
            error_code=verdict.error_code,
            latency_ms=(now - entry.started_at) * 1000,
            mainline_cost_nanos=charge.mainline_nanos,
            response_id=self.response_id,
        )
        try:
            await settle_patiently(
                runtime.ledger, entry.id, settled, within_s=runtime.config.upstream.timeout_s
            )
        except LedgerError as exc:
            # The reservation stays in the ledger and is reclaimed later; say so loudly.
            log.error("ledger settle failed for %s: %s", entry.id, exc)
        observe(runtime, entry, settled, self.changes)
        runtime.alerts.settled(entry)

    def observe_upstream(self) -> None:
        # A Responses request that makes no image ran its mainline model alone.
        model = self.entry.model or self.entry.mainline_model or ""
        elapsed = time.monotonic() - self.sent_at
        self.runtime.metrics.upstream(model, self.door.endpoint, elapsed)

    def after(self, cost_nanos: int) -> dict[str, str]:
        """The answer's headers once the request cost `cost_nanos`."""
        headers = {**self.headers, "x-tollgate-cost-usd": usd_text(cost_nanos)}
        if self.remaining_nanos is not None:
            left = self.remaining_nanos + self.entry.estimated_nanos - cost_nanos
            headers["x-tollgate-budget-remaining-usd"] = usd_text(max(left, 0))
        return headers
