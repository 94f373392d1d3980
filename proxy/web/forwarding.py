"""Forwarding: send a request upstream, meter its answer, settle it, answer the client.

The exchange with the upstream runs in its own task, shielded from the client:
a client that disconnects does not stop metering, because OpenAI bills the
generation all the same. Streams are relayed event by event as they arrive.

Every exchange has a total deadline, `upstream.total_timeout_s` after the request
arrived (on the services' clock): an upstream still sending then is cut and the
request charged its bound, flagged `deadline_exceeded`. So a live request never
outlives the age at which housekeeping reclaims reservations.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.responses import Response, StreamingResponse

from proxy.core.errors import (
    DeadlineExceeded,
    LedgerError,
    RequestError,
    UpstreamFailure,
    UpstreamUnavailable,
)
from proxy.core.metering import BodyMeter, MalformedAnswer, SseMeter
from proxy.core.models import Change, Endpoint, Entry, Outcome, Settlement, Usage, usd_text
from proxy.core.pricing import ModelPrices
from proxy.ledger import settle_patiently
from proxy.upstream import BROKEN_OFF, Answer, response_headers
from proxy.web.responses import error_response, spooled_response
from proxy.web.runtime import Runtime
from proxy.web.spool import Spool

log = logging.getLogger("tollgate.requests")

ERROR_BODY_LIMIT = 1024 * 1024
DEADLINE_MESSAGE = (
    "The upstream's answer did not end within Tollgate's deadline for one request "
    "(upstream.total_timeout_s)."
)


@dataclass(frozen=True, slots=True)
class Exchange:
    """One forwarded request: what the settlement needs to know."""

    entry: Entry
    model: ModelPrices
    n: int
    headers: dict[str, str]
    changes: tuple[Change, ...] = ()
    remaining_nanos: int | None = None
    """Room left in the tightest USD budget with this request's bound reserved."""
    bound_usage: Usage = field(default_factory=Usage)
    """The estimated usage reserved with the bound."""

    def bound(self) -> tuple[int, Usage]:
        """What a request is charged when its cost cannot be known: its reserved bound, with
        the usage reserved with it (so token budgets keep counting it too)."""
        return self.entry.estimated_nanos, replace(self.bound_usage, images=self.n)

    def after(self, cost_nanos: int) -> dict[str, str]:
        """The answer's headers once the request cost `cost_nanos`."""
        headers = {**self.headers, "x-tollgate-cost-usd": usd_text(cost_nanos)}
        if self.remaining_nanos is not None:
            left = self.remaining_nanos + self.entry.estimated_nanos - cost_nanos
            headers["x-tollgate-budget-remaining-usd"] = usd_text(max(left, 0))
        return headers


class Forwarder:
    """Sends requests of one endpoint upstream and settles them."""

    def __init__(self, endpoint: Endpoint, runtime: Runtime) -> None:
        self.endpoint = endpoint
        self.services = runtime

    async def forward(
        self, exchange: Exchange, body: bytes, content_type: str, client_headers: Any
    ) -> Response:
        """Send a non-streamed request, then read, meter and answer it."""
        sent = time.monotonic()
        try:
            answer = await self.send(exchange, body, content_type, client_headers, sent)
        except RequestError as exc:
            return error_response(exc, exchange.after(failure_cost(exchange, exc)))
        return await self.complete(exchange, answer, sent)

    async def send(
        self, exchange: Exchange, body: bytes, content_type: str, client_headers: Any, sent: float
    ) -> Answer:
        """Send upstream; a request that never got an answer is settled and its error
        re-raised: at nothing when it never left, at its bound (flagged) when it may have
        reached the upstream, which bills what it accepted (see `failure_cost`)."""
        left = self.time_left(exchange)
        try:
            if left <= 0:
                # A body that took the whole deadline to arrive: never sent, nothing billed.
                raise DeadlineExceeded(DEADLINE_MESSAGE)
            try:
                async with asyncio.timeout(left):
                    return await self.services.upstream.send(
                        "/images/" + self.endpoint, body, content_type, client_headers
                    )
            except TimeoutError as exc:  # the deadline: the client's own are translated
                raise DeadlineExceeded(DEADLINE_MESSAGE, maybe_billed=True) from exc
        except RequestError as exc:
            self.observe_upstream(exchange, sent)
            cost = failure_cost(exchange, exc)
            code = exc.ledger_code if isinstance(exc, UpstreamFailure) else exc.code
            await self.settle(
                exchange,
                "upstream_error",
                exc.status,
                exchange.bound()[1] if cost else Usage(),
                cost,
                flagged=cost > 0,
                error=code,
            )
            raise

    def deadline(self, exchange: Exchange) -> float:
        """When the exchange must be over, on the services' clock."""
        return exchange.entry.started_at + self.services.config.upstream.deadline_s

    def time_left(self, exchange: Exchange) -> float:
        return self.deadline(exchange) - self.services.clock()

    async def within_deadline(
        self, exchange: Exchange, chunks: AsyncIterable[bytes]
    ) -> AsyncIterator[bytes]:
        """`chunks` until the exchange's deadline, then DeadlineExceeded: checked as each
        chunk arrives, and by a timer while the upstream sends none. The timer covers one
        read at a time, never the consumer's work between two chunks."""
        clock, deadline = self.services.clock, self.deadline(exchange)
        reading = aiter(chunks)
        while True:
            try:
                left = deadline - clock()
                if left <= 0:
                    raise TimeoutError
                async with asyncio.timeout(left):
                    chunk = await anext(reading)
                if clock() >= deadline:
                    raise TimeoutError  # it came, but too late
            except StopAsyncIteration:
                return
            except TimeoutError as exc:  # the upstream's own silences are translated
                raise DeadlineExceeded(DEADLINE_MESSAGE, maybe_billed=True) from exc
            yield chunk

    def observe_upstream(self, exchange: Exchange, sent: float) -> None:
        model = exchange.entry.model or ""
        self.services.metrics.upstream(model, self.endpoint, time.monotonic() - sent)

    async def complete(self, exchange: Exchange, answer: Answer, sent: float) -> Response:
        """Read a whole answer into a spool, metering it on the way, then settle and answer."""
        spool = Spool()
        ok = 200 <= answer.status < 300
        meter = BodyMeter() if ok else None
        try:
            try:
                async for chunk in self.within_deadline(exchange, answer.chunks()):
                    spool.write(chunk)
                    if meter is not None:
                        meter.feed(chunk)
            finally:
                await answer.aclose()
                self.observe_upstream(exchange, sent)
            if meter is None:
                return await self.pass_error(exchange, answer, spool)
            usage, images = meter.finish()
        except (*BROKEN_OFF, MalformedAnswer) as exc:
            spool.close()
            return await self.charge_failure(exchange, answer, exc)
        cost = await self.settle_answered(
            exchange, answer.status, usage, images, answer.headers.get("x-request-id")
        )
        return spooled_response(spool, answer, exchange.after(cost))

    async def settle_answered(
        self,
        exchange: Exchange,
        status: int,
        usage: Usage | None,
        images: int,
        upstream_id: str | None,
    ) -> int:
        """Settle a request the upstream answered: its price, or its bound when the answer
        carried no usage. Returns the cost."""
        cost, charged, flagged = self.price(exchange, usage, images)
        await self.settle(
            exchange, "ok", status, charged, cost, flagged=flagged, upstream_id=upstream_id
        )
        return cost

    def price(
        self, exchange: Exchange, usage: Usage | None, images: int
    ) -> tuple[int, Usage, bool]:
        """(cost, usage charged, flagged): the price of the usage, else the estimate.
        Flagged too when some tokens had no rate of their own (priced at a stand-in rate)."""
        model = exchange.model
        if model.per_image_billing:
            count = images or exchange.n
            quality = exchange.entry.quality or "auto"
            size = exchange.entry.size or "auto"
            return model.image_price_nanos(quality, size) * count, Usage(images=count), True
        if usage is None:
            # A successful answer without usage: charge the bound, flag for reconciliation.
            return exchange.entry.estimated_nanos, Usage(images=images or exchange.n), True
        charge = model.charge(replace(usage, images=images or exchange.n))
        return charge.cost_nanos, charge.usage, charge.flagged

    async def pass_error(self, exchange: Exchange, answer: Answer, spool: Spool) -> Response:
        """An upstream error answer: passed through unchanged, nothing charged."""
        body = spool.getvalue() if spool.in_memory and spool.size <= ERROR_BODY_LIMIT else b""
        spool.close()
        code = error_code(body)
        await self.settle(
            exchange,
            "upstream_error",
            answer.status,
            Usage(),
            0,
            error=code,
            upstream_id=answer.headers.get("x-request-id"),
        )
        headers = {**dict(response_headers(answer)), **exchange.after(0)}
        return Response(body, status_code=answer.status, headers=headers)

    async def charge_failure(
        self, exchange: Exchange, answer: Answer, failure: Exception
    ) -> Response:
        """An answer that broke off, is not JSON or outlived its deadline: OpenAI may have
        billed; charge the bound."""
        cost, usage = exchange.bound()
        exc: RequestError
        if isinstance(failure, DeadlineExceeded):
            exc, code = failure, "deadline_exceeded"
        else:
            exc, code = (
                UpstreamUnavailable(
                    f"The upstream's answer could not be read ({failure}). The request's "
                    "estimated cost was charged and flagged for reconciliation."
                ),
                "malformed_answer",
            )
        await self.settle(
            exchange,
            "upstream_error",
            exc.status,
            usage,
            cost,
            flagged=True,
            error=code,
            upstream_id=answer.headers.get("x-request-id"),
        )
        return error_response(exc, exchange.after(cost))

    async def forward_stream(
        self, exchange: Exchange, body: bytes, content_type: str, client_headers: Any
    ) -> Response:
        """Send a streamed request and pass its events through as they arrive."""
        headers = {
            **exchange.headers,
            "x-tollgate-reserved-usd": usd_text(exchange.entry.estimated_nanos),
        }
        if exchange.remaining_nanos is not None:
            headers["x-tollgate-budget-remaining-usd"] = usd_text(max(exchange.remaining_nanos, 0))
        sent = time.monotonic()
        try:
            answer = await self.send(exchange, body, content_type, client_headers, sent)
        except RequestError as exc:
            cost = usd_text(failure_cost(exchange, exc))
            return error_response(exc, {**headers, "x-tollgate-cost-usd": cost})
        if not 200 <= answer.status < 300 or "event-stream" not in answer.headers.get(
            "content-type", ""
        ):
            # Errors (and answers that are not streams) are metered like plain answers.
            return await asyncio.shield(self.services.spawn(self.complete(exchange, answer, sent)))
        relay = Relay()
        self.services.spawn(self.pump(exchange, answer, relay, sent))
        return StreamingResponse(
            relay.events(),
            status_code=answer.status,
            headers={**dict(response_headers(answer)), **headers},
        )

    async def pump(self, exchange: Exchange, answer: Answer, relay: Relay, sent: float) -> None:
        """Read the upstream stream to its end, relaying and metering each event."""
        meter = SseMeter()
        broken: str | None = None
        try:
            async for chunk in self.within_deadline(exchange, answer.chunks()):
                meter.feed(chunk)
                relay.put(chunk)
            meter.finish()
        except BROKEN_OFF as exc:
            broken = exc.ledger_code
        finally:
            await answer.aclose()
            relay.close()
            self.observe_upstream(exchange, sent)
        upstream_id = answer.headers.get("x-request-id")
        # An event that could not be read may have been a billed image: its usage is unknown.
        if broken is None and meter.completed and meter.error is None and not meter.unreadable:
            await self.settle_answered(
                exchange, answer.status, meter.usage, meter.completed, upstream_id
            )
        elif meter.error is not None and not meter.completed and not meter.unreadable:
            await self.settle(
                exchange,
                "upstream_error",
                answer.status,
                Usage(),
                0,
                error=error_code_of(meter.error),
                upstream_id=upstream_id,
            )
        else:
            # Cut short: the generation may have been billed. Charge the bound and flag it.
            cost, usage = exchange.bound()
            await self.settle(
                exchange,
                "upstream_error",
                answer.status,
                usage,
                cost,
                flagged=True,
                error=broken or ("malformed_answer" if meter.unreadable else "stream_truncated"),
                upstream_id=upstream_id,
            )

    async def settle(
        self,
        exchange: Exchange,
        outcome: Outcome,
        status: int,
        usage: Usage,
        cost: int,
        *,
        flagged: bool = False,
        error: str | None = None,
        upstream_id: str | None = None,
    ) -> None:
        now = self.services.clock()
        if outcome == "ok" and exchange.entry.downgrades:
            outcome = "downgraded"
        settlement = Settlement(
            finished_at=now,
            outcome=outcome,
            status=status,
            usage=usage,
            cost_nanos=cost,
            flagged=flagged,
            upstream_request_id=upstream_id,
            error_code=error,
            latency_ms=(now - exchange.entry.started_at) * 1000,
        )
        try:
            # OpenAI has billed this answer: ride out a short ledger outage rather than lose it.
            await settle_patiently(
                self.services.ledger,
                exchange.entry.id,
                settlement,
                within_s=self.services.config.upstream.timeout_s,
            )
        except LedgerError as exc:
            # The reservation stays in the ledger and is reclaimed later; say so loudly.
            log.error("ledger settle failed for %s: %s", exchange.entry.id, exc)
        self.services.metrics.finished(exchange.entry, settlement, exchange.changes)
        self.services.alerts.settled(exchange.entry)
        log_request(exchange.entry, settlement)


class Relay:
    """Hands stream chunks from the upstream reader to the client writer.

    When the client goes away the reader keeps reading (and metering); chunks
    are then dropped instead of queued.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._listening = True

    def put(self, chunk: bytes) -> None:
        if self._listening:
            self._queue.put_nowait(chunk)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[bytes]:
        try:
            while (chunk := await self._queue.get()) is not None:
                yield chunk
        finally:
            self._listening = False


def failure_cost(exchange: Exchange, failure: RequestError) -> int:
    """What a request that got no answer is charged: its bound if it may have reached the
    upstream (flagged for reconciliation), else nothing."""
    if isinstance(failure, UpstreamFailure) and failure.maybe_billed:
        return exchange.entry.estimated_nanos
    return 0


def error_code(body: bytes) -> str | None:
    try:
        return error_code_of(json.loads(body).get("error"))
    except (ValueError, AttributeError):
        return None


def error_code_of(error: Any) -> str | None:
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        return str(code) if code is not None else None
    return None


def log_request(entry: Entry, settlement: Settlement) -> None:
    """One structured line per request: never a key, a prompt or image data."""
    if not log.isEnabledFor(logging.INFO):
        return
    log.info(
        json.dumps(
            {
                "request_id": entry.id,
                "upstream_request_id": settlement.upstream_request_id,
                "team": entry.team,
                "key_id": entry.key_id,
                "endpoint": entry.endpoint,
                "model_requested": entry.model_requested,
                "model": entry.model,
                "quality_requested": entry.quality_requested,
                "quality": entry.quality,
                "size_requested": entry.size_requested,
                "size": entry.size,
                "n": entry.n,
                "stream": entry.stream,
                "downgrades": entry.downgrades or None,
                "outcome": settlement.outcome,
                "status": settlement.status,
                "error_code": settlement.error_code,
                "cost_usd": usd_text(settlement.cost_nanos),
                "estimated_usd": usd_text(entry.estimated_nanos),
                "flagged": settlement.flagged,
                "latency_ms": round(settlement.latency_ms, 1),
            }
        )
    )
