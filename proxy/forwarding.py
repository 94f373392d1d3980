"""Forwarding: send a request upstream, meter its answer, settle it, answer the client.

The exchange with the upstream runs in its own task, shielded from the client:
a client that disconnects does not stop metering, because OpenAI bills the
generation all the same. Streams are relayed event by event as they arrive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from starlette.responses import Response, StreamingResponse

from proxy.errors import LedgerError, RequestError, UpstreamUnavailable
from proxy.ledger import Entry, Settlement, settle_patiently
from proxy.metering import BodyMeter, MalformedAnswer, SseMeter
from proxy.models import Change, Endpoint, Outcome, Usage, usd_text
from proxy.pricing import ModelPrices
from proxy.responses import error_response, spooled_response
from proxy.services import Services
from proxy.spool import Spool
from proxy.upstream import BROKEN_OFF, Answer, response_headers

log = logging.getLogger("tollgate.requests")

ERROR_BODY_LIMIT = 1024 * 1024


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

    def after(self, cost_nanos: int) -> dict[str, str]:
        """The answer's headers once the request cost `cost_nanos`."""
        headers = {**self.headers, "x-tollgate-cost-usd": usd_text(cost_nanos)}
        if self.remaining_nanos is not None:
            left = self.remaining_nanos + self.entry.estimated_nanos - cost_nanos
            headers["x-tollgate-budget-remaining-usd"] = usd_text(max(left, 0))
        return headers


class Forwarder:
    """Sends requests of one endpoint upstream and settles them."""

    def __init__(self, endpoint: Endpoint, services: Callable[[], Services]) -> None:
        self.endpoint = endpoint
        self._services = services

    @property
    def services(self) -> Services:
        return self._services()

    async def forward(
        self, exchange: Exchange, body: bytes, content_type: str, client_headers: Any
    ) -> Response:
        """Send a non-streamed request, then read, meter and answer it."""
        sent = time.monotonic()
        try:
            answer = await self.send(exchange, body, content_type, client_headers, sent)
        except RequestError as exc:
            return error_response(exc, exchange.after(0))
        return await self.complete(exchange, answer, sent)

    async def send(
        self, exchange: Exchange, body: bytes, content_type: str, client_headers: Any, sent: float
    ) -> Answer:
        """Send upstream; a request that never got an answer is settled (nothing charged)
        and its error re-raised."""
        try:
            return await self.services.upstream.send(
                "/images/" + self.endpoint, body, content_type, client_headers
            )
        except RequestError as exc:
            self.observe_upstream(exchange, sent)
            await self.settle(exchange, "upstream_error", exc.status, Usage(), 0, error=exc.code)
            raise

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
                async for chunk in answer.chunks():
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
        """A 2xx answer that broke off or is not JSON: OpenAI may have billed; charge the bound."""
        cost = exchange.entry.estimated_nanos
        await self.settle(
            exchange,
            "upstream_error",
            502,
            Usage(images=exchange.n),
            cost,
            flagged=True,
            error="malformed_answer",
            upstream_id=answer.headers.get("x-request-id"),
        )
        exc = UpstreamUnavailable(
            f"The upstream's answer could not be read ({failure}). The request's estimated cost "
            "was charged and flagged for reconciliation."
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
            return error_response(exc, {**headers, "x-tollgate-cost-usd": "0"})
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
            async for chunk in answer.chunks():
                meter.feed(chunk)
                relay.put(chunk)
            meter.finish()
        except BROKEN_OFF as exc:
            broken = exc.code
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
            await self.settle(
                exchange,
                "upstream_error",
                answer.status,
                Usage(images=exchange.n),
                exchange.entry.estimated_nanos,
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
