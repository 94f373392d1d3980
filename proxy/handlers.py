"""The request path, top to bottom.

identify the team → read and parse the image request → price it → reserve the
estimate in the ledger → forward with the company's key → meter the usage the
upstream returns → settle in the ledger → answer (with Tollgate's headers).

The exchange with the upstream runs in its own task, shielded from the client:
a client that disconnects does not stop metering, because OpenAI bills the
generation all the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from proxy.alerts import Alerts
from proxy.auth import identify
from proxy.budgets import (
    Counter,
    Decision,
    Totals,
    Variant,
    allow_endpoint,
    applicable,
    apply_allow,
    counters,
    decide,
    summary,
    zone,
)
from proxy.config import Config, Team
from proxy.errors import (
    BudgetExceeded,
    InvalidRequest,
    LedgerError,
    NotFound,
    PolicyViolation,
    RequestError,
    RequestTooLarge,
    ServiceUnavailable,
    UnpricedModel,
    UpstreamUnavailable,
)
from proxy.ledger import Entry, Ledger, Reservation, Settlement
from proxy.metering import BodyMeter, MalformedAnswer, SseMeter
from proxy.metrics import Metrics
from proxy.models import Change, Endpoint, ImageRequest, Outcome, Usage, usd_text
from proxy.parsing import ParsedBody, parse_request
from proxy.pricing import ModelPrices
from proxy.spool import Spool
from proxy.upstream import Upstream, response_headers, translate

log = logging.getLogger("tollgate.requests")

ERROR_BODY_LIMIT = 1024 * 1024


@dataclass
class Services:
    """What the request path needs, built at start-up and passed in."""

    config: Config
    ledger: Ledger
    upstream: Upstream
    metrics: Metrics
    alerts: Alerts
    clock: Callable[[], float] = time.time
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    background_handles: list[asyncio.TimerHandle] = field(default_factory=list)


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


def requested(wanted: ImageRequest) -> dict[str, Any]:
    """The ledger fields of what the client asked for."""
    return {
        "user": wanted.user,
        "model_requested": wanted.model,
        "quality_requested": wanted.quality,
        "size_requested": wanted.size,
        "n_requested": wanted.n,
        "stream": wanted.stream,
    }


def priced(config: Config, name: str) -> ModelPrices:
    model = config.prices.find(name)
    if model is None:
        raise UnpricedModel(
            f"Model {name!r} is not in Tollgate's price book, so its cost cannot be metered. "
            "Ask your Tollgate administrator to add it.",
            param="model",
        )
    return model


def new_request_id() -> str:
    return "tg_req_" + uuid.uuid4().hex


class ImagesHandler:
    """`POST /v1/images/{generations,edits,variations}`."""

    def __init__(self, endpoint: Endpoint, services: Callable[[], Services]) -> None:
        self.endpoint = endpoint
        self._services = services

    @property
    def services(self) -> Services:
        return self._services()

    async def handle(self, request: Request) -> Response:
        s = self.services
        config = s.config
        entry = Entry(id=new_request_id(), started_at=s.clock(), endpoint=self.endpoint)
        headers = {"x-tollgate-request-id": entry.id}
        s.metrics.started()
        try:
            team, key = identify(request.headers.get("authorization"), config.team_by_key_hash())
            entry = replace(entry, team=team.name, cost_center=team.cost_center, key_id=key.id)
            headers["x-tollgate-team"] = team.name
            allow_endpoint(team, self.endpoint)
            body = await read_body(request, self.limit(config))
            parsed = parse_request(
                self.endpoint, request.headers.get("content-type", ""), body, config.default_model
            )
            wanted = parsed.request
            entry = replace(entry, **requested(wanted))
            model = priced(config, wanted.model)
            model.validate(wanted)
            allowed = apply_allow(team, wanted, model)
            decision, entry = await self.reserve(config, team, entry, allowed)
        except RequestError as exc:
            return await self.refuse(entry, exc, headers)
        except LedgerError as exc:
            log.error("ledger unavailable: %s", exc)
            s.metrics.finished(entry, Settlement(s.clock(), "client_error", 503), ())
            return error_response(
                ServiceUnavailable("Tollgate cannot record spend right now; retry shortly."),
                headers,
            )
        variant = decision.variant
        changes: dict[str, str] = {
            c.knob: str(getattr(variant.request, c.knob)) for c in variant.changes
        }
        if not _names_model(parsed):
            changes["model"] = variant.request.model
            headers["x-tollgate-model"] = wanted.model
        if variant.changes:
            headers["x-tollgate-downgraded"] = entry.downgrades
        forward_body, content_type = parsed.encode(changes)
        exchange = Exchange(
            entry,
            variant.model,
            variant.request.n,
            headers,
            variant.changes,
            decision.remaining_nanos,
        )
        client_headers = request.headers.items()
        if variant.request.stream:
            return await self.forward_stream(exchange, forward_body, content_type, client_headers)
        task = asyncio.create_task(
            self.forward(exchange, forward_body, content_type, client_headers)
        )
        s.background.add(task)
        task.add_done_callback(s.background.discard)
        return await asyncio.shield(task)

    async def reserve(
        self, config: Config, team: Team, entry: Entry, variant: Variant
    ) -> tuple[Decision, Entry]:
        """Decide against the budgets and reserve the bound, in one ledger transaction."""
        user = variant.request.user
        budgets = applicable(config, team, user, entry.started_at)
        tz = zone(config.timezone)
        write = counters(team.name, user, entry.started_at, tz)
        chosen: list[Decision] = []

        def choose(totals: Mapping[Counter, Totals]) -> Reservation:
            decision = decide(team, variant, budgets, totals, config.prices, tz)
            chosen.append(decision)
            sent = decision.variant
            reserved = replace(
                entry,
                model=sent.request.model,
                quality=sent.request.quality,
                size=sent.request.size,
                n=sent.request.n,
                estimated_nanos=sent.estimate.cost_nanos,
                downgrades=summary(sent.changes),
            )
            return Reservation(reserved, sent.estimate.usage, write)

        read = tuple(dict.fromkeys(a.counter for a in budgets))
        reservation = await self.services.ledger.reserve(read, choose)
        return chosen[-1], reservation.entry

    def limit(self, config: Config) -> int:
        limits = config.limits
        return {
            "generations": limits.generations_bytes,
            "edits": limits.edits_bytes,
            "variations": limits.variations_bytes,
        }[self.endpoint]

    async def refuse(self, entry: Entry, exc: RequestError, headers: dict[str, str]) -> Response:
        """Record a request that is answered without going upstream."""
        now = self.services.clock()
        settlement = Settlement(
            finished_at=now,
            outcome=refusal_outcome(exc),
            status=exc.status,
            error_code=exc.code,
            latency_ms=(now - entry.started_at) * 1000,
        )
        try:
            await self.services.ledger.record(entry, settlement)
        except LedgerError as ledger_exc:
            log.error("ledger record failed: %s", ledger_exc)
        self.services.metrics.finished(entry, settlement, ())
        log_request(entry, settlement)
        return error_response(exc, {**headers, "x-tollgate-cost-usd": "0"})

    async def forward(
        self, exchange: Exchange, body: bytes, content_type: str, client_headers: Any
    ) -> Response:
        """Send a non-streamed request, then read, meter and answer it."""
        sent = time.monotonic()
        try:
            answer = await self.services.upstream.send(
                "/images/" + self.endpoint, body, content_type, client_headers
            )
        except RequestError as exc:
            self.observe_upstream(exchange, sent)
            await self.settle(exchange, "upstream_error", exc.status, Usage(), 0, error=exc.code)
            return error_response(exc, exchange.after(0))
        return await self.complete(exchange, answer, sent)

    def observe_upstream(self, exchange: Exchange, sent: float) -> None:
        model = exchange.entry.model or ""
        self.services.metrics.upstream(model, self.endpoint, time.monotonic() - sent)

    async def complete(self, exchange: Exchange, answer: httpx.Response, sent: float) -> Response:
        """Read a whole answer into a spool, metering it on the way, then settle and answer."""
        spool = Spool()
        ok = 200 <= answer.status_code < 300
        meter = BodyMeter() if ok else None
        try:
            try:
                async for chunk in answer.aiter_bytes():
                    spool.write(chunk)
                    if meter is not None:
                        meter.feed(chunk)
            finally:
                await answer.aclose()
                self.observe_upstream(exchange, sent)
            if meter is None:
                return await self.pass_error(exchange, answer, spool)
            usage, images = meter.finish()
        except (httpx.HTTPError, MalformedAnswer) as exc:
            spool.close()
            failure = exc if isinstance(exc, MalformedAnswer) else translate(exc)
            return await self.charge_failure(exchange, answer, failure)
        cost, charged, flagged = self.price(exchange, usage, images)
        await self.settle(
            exchange,
            "ok",
            answer.status_code,
            charged,
            cost,
            flagged=flagged,
            upstream_id=answer.headers.get("x-request-id"),
        )
        return spooled_response(spool, answer, exchange.after(cost))

    def price(
        self, exchange: Exchange, usage: Usage | None, images: int
    ) -> tuple[int, Usage, bool]:
        """(cost, usage charged, flagged): the price of the usage, else the estimate."""
        model = exchange.model
        if model.per_image_billing:
            count = images or exchange.n
            quality = exchange.entry.quality or "auto"
            size = exchange.entry.size or "auto"
            return model.image_price_nanos(quality, size) * count, Usage(images=count), True
        if usage is None:
            # A successful answer without usage: charge the bound, flag for reconciliation.
            return exchange.entry.estimated_nanos, Usage(images=images or exchange.n), True
        usage = replace(usage, images=images or exchange.n)
        return model.cost(usage), usage, False

    async def pass_error(
        self, exchange: Exchange, answer: httpx.Response, spool: Spool
    ) -> Response:
        """An upstream error answer: passed through unchanged, nothing charged."""
        body = spool.getvalue() if spool.in_memory and spool.size <= ERROR_BODY_LIMIT else b""
        spool.close()
        code = error_code(body)
        await self.settle(
            exchange,
            "upstream_error",
            answer.status_code,
            Usage(),
            0,
            error=code,
            upstream_id=answer.headers.get("x-request-id"),
        )
        headers = {**dict(response_headers(answer)), **exchange.after(0)}
        return Response(body, status_code=answer.status_code, headers=headers)

    async def charge_failure(
        self, exchange: Exchange, answer: httpx.Response, failure: Exception
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
            answer = await self.services.upstream.send(
                "/images/" + self.endpoint, body, content_type, client_headers
            )
        except RequestError as exc:
            self.observe_upstream(exchange, sent)
            await self.settle(exchange, "upstream_error", exc.status, Usage(), 0, error=exc.code)
            return error_response(exc, {**headers, "x-tollgate-cost-usd": "0"})
        if not 200 <= answer.status_code < 300 or "event-stream" not in answer.headers.get(
            "content-type", ""
        ):
            # Errors (and answers that are not streams) are metered like plain answers.
            task = asyncio.create_task(self.complete(exchange, answer, sent))
            self.services.background.add(task)
            task.add_done_callback(self.services.background.discard)
            return await asyncio.shield(task)
        relay = Relay()
        pump = asyncio.create_task(self.pump(exchange, answer, relay, sent))
        self.services.background.add(pump)
        pump.add_done_callback(self.services.background.discard)
        return StreamingResponse(
            relay.events(),
            status_code=answer.status_code,
            headers={**dict(response_headers(answer)), **headers},
        )

    async def pump(
        self, exchange: Exchange, answer: httpx.Response, relay: Relay, sent: float
    ) -> None:
        """Read the upstream stream to its end, relaying and metering each event."""
        meter = SseMeter()
        broken: str | None = None
        try:
            async for chunk in answer.aiter_raw():
                meter.feed(chunk)
                relay.put(chunk)
            meter.finish()
        except httpx.HTTPError as exc:
            broken = translate(exc).code
        finally:
            await answer.aclose()
            relay.close()
            self.observe_upstream(exchange, sent)
        upstream_id = answer.headers.get("x-request-id")
        if broken is None and meter.completed and meter.error is None:
            cost, charged, flagged = self.price(exchange, meter.usage, meter.completed)
            await self.settle(
                exchange,
                "ok",
                answer.status_code,
                charged,
                cost,
                flagged=flagged,
                upstream_id=upstream_id,
            )
        elif meter.error is not None and not meter.completed:
            await self.settle(
                exchange,
                "upstream_error",
                answer.status_code,
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
                answer.status_code,
                Usage(images=exchange.n),
                exchange.entry.estimated_nanos,
                flagged=True,
                error=broken or "stream_truncated",
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
            await self.services.ledger.settle(exchange.entry.id, settlement)
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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidRequest("The client disconnected before sending the whole body.") from None
    return b"".join(chunks)


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"Request body is larger than the {limit:,} bytes Tollgate accepts on this endpoint."
    )


def _names_model(parsed: ParsedBody) -> bool:
    if parsed.json is not None:
        return isinstance(parsed.json.get("model"), str)
    return any(p.name == "model" for p in parsed.parts)


def refusal_outcome(exc: RequestError) -> Outcome:
    if isinstance(exc, BudgetExceeded):
        return "rejected_budget"
    if isinstance(exc, PolicyViolation):
        return "rejected_policy"
    return "client_error"


def error_response(exc: RequestError, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(
        exc.body(), status_code=exc.status, headers={**(headers or {}), **exc.headers()}
    )


def spooled_response(spool: Spool, answer: httpx.Response, headers: dict[str, str]) -> Response:
    all_headers = {**dict(response_headers(answer)), **headers}
    if spool.in_memory:
        return Response(spool.getvalue(), status_code=answer.status_code, headers=all_headers)
    all_headers["content-length"] = str(spool.size)
    return StreamingResponse(spool.stream(), status_code=answer.status_code, headers=all_headers)


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


async def not_found(request: Request) -> Response:
    """Any other `/v1/*` path, in OpenAI's error shape."""
    return error_response(
        NotFound(
            f"Invalid URL ({request.method} {request.url.path}): Tollgate proxies only the image "
            "endpoints."
        )
    )
