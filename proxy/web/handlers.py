"""The request path, top to bottom.

identify the team → read and parse the image request → price it → reserve the
estimate in the ledger → forward with the company's key → meter the usage the
upstream returns → settle in the ledger → answer (with Tollgate's headers).

Forwarding, metering and settling the answer live in `proxy.web.forwarding`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from proxy.core.auth import identify
from proxy.core.budgets import (
    Decision,
    Variant,
    allow_endpoint,
    applicable,
    apply_allow,
    counters,
    decide,
    summary,
    zone,
)
from proxy.core.errors import (
    AuthenticationFailed,
    BudgetExceeded,
    InvalidRequest,
    LedgerError,
    MethodNotAllowed,
    NotFound,
    PolicyViolation,
    RequestError,
    RequestTooLarge,
    ServiceUnavailable,
    UnpricedModel,
)
from proxy.core.models import Counter, Endpoint, Entry, ImageRequest, Outcome, Settlement, Totals
from proxy.core.parsing import parse_request
from proxy.core.paths import plain_query, under
from proxy.core.pricing import ModelPrices
from proxy.core.settings import Config, Team
from proxy.ledger import Reservation
from proxy.upstream import response_headers
from proxy.web.admission import BodyBudget, BodyDeadline
from proxy.web.forwarding import Exchange, Forwarder, log_request
from proxy.web.responses import error_response
from proxy.web.runtime import Runtime

log = logging.getLogger("tollgate.requests")
KEY_REFUSALS_LOG_EVERY_S = 10.0


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
    """`tg_req_` and 32 hex digits: the time in microseconds (13 digits), then 76 random
    bits. Ids that grow with time are appended to the ledger's primary-key index instead
    of landing on a random page of it (bench: 77 -> 59 us per reservation at 60,000 rows,
    and random ids get slower as the ledger grows)."""
    return f"tg_req_{time.time_ns() // 1000:013x}{secrets.token_hex(10)[:19]}"


class ImagesHandler:
    """`POST /v1/images/{generations,edits,variations}`."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.key_refusals = KeyRefusals(endpoint)

    async def handle(self, request: Request, runtime: Runtime) -> Response:
        s = runtime
        config = s.config
        # What is known of the request so far: the ledger entry it makes if it ends here.
        known: dict[str, Any] = {
            "id": new_request_id(),
            "started_at": s.clock(),
            "endpoint": self.endpoint,
        }
        headers = {"x-tollgate-request-id": known["id"]}
        try:
            team, key = identify(request.headers.get("authorization"), config.team_by_key_hash())
        except AuthenticationFailed as exc:
            return self.key_refusals.refuse(request, exc, headers, s)
        s.metrics.started()
        try:
            known.update(team=team.name, cost_center=team.cost_center, key_id=key.id)
            headers["x-tollgate-team"] = team.name
            allow_endpoint(team, self.endpoint)
            body = await read_body(request, self.limit(config), s.bodies)
            parsed = parse_request(
                self.endpoint, request.headers.get("content-type", ""), body, config.default_model
            )
            wanted = parsed.request
            known.update(requested(wanted))
            model = priced(config, wanted.model)
            model.validate(wanted)
            allowed = apply_allow(team, wanted, model)
            decision, entry = await self.reserve(s, team, known, allowed)
        except RequestError as exc:
            return await self.refuse(s, Entry(**known), exc, headers)
        except LedgerError as exc:
            log.error("ledger unavailable: %s", exc)
            s.metrics.finished(Entry(**known), Settlement(s.clock(), "client_error", 503), ())
            return error_response(
                ServiceUnavailable("Tollgate cannot record spend right now; retry shortly."),
                headers,
            )
        variant = decision.variant
        changes: dict[str, str] = {
            c.knob: str(getattr(variant.request, c.knob)) for c in variant.changes
        }
        if not parsed.names_model:
            # The parse already wrote the default into the fields it forwards; say so.
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
            variant.estimate.usage,
        )
        client_headers = request.headers.items()
        forwarder = Forwarder(self.endpoint, s)
        if variant.request.stream:
            return await forwarder.forward_stream(
                exchange, forward_body, content_type, client_headers
            )
        # Shielded: a client that hangs up does not stop the metering of what it asked for.
        return await asyncio.shield(
            s.spawn(forwarder.forward(exchange, forward_body, content_type, client_headers))
        )

    async def reserve(
        self, runtime: Runtime, team: Team, known: Mapping[str, Any], variant: Variant
    ) -> tuple[Decision, Entry]:
        """Decide against the budgets and reserve the bound, in one ledger transaction."""
        config = runtime.config
        user = variant.request.user
        started_at = known["started_at"]
        budgets = applicable(config, team, user, started_at)
        tz = zone(config.timezone)
        write = counters(team.name, user, started_at, tz)
        chosen: list[Decision] = []

        def choose(totals: Mapping[Counter, Totals]) -> Reservation:
            decision = decide(team, variant, budgets, totals, config.prices, tz)
            chosen.append(decision)
            sent = decision.variant
            reserved = Entry(
                **known,
                model=sent.request.model,
                quality=sent.request.quality,
                size=sent.request.size,
                n=sent.request.n,
                estimated_nanos=sent.estimate.cost_nanos,
                downgrades=summary(sent.changes),
            )
            return Reservation(reserved, sent.estimate.usage, write)

        read = tuple(dict.fromkeys(a.counter for a in budgets))
        reservation = await runtime.ledger.reserve(read, choose)
        return chosen[-1], reservation.entry

    def limit(self, config: Config) -> int:
        limits = config.limits
        return {
            "generations": limits.generations_bytes,
            "edits": limits.edits_bytes,
            "variations": limits.variations_bytes,
        }[self.endpoint]

    async def refuse(
        self, runtime: Runtime, entry: Entry, exc: RequestError, headers: dict[str, str]
    ) -> Response:
        """Record a request that is answered without going upstream."""
        now = runtime.clock()
        settlement = Settlement(
            finished_at=now,
            outcome=refusal_outcome(exc),
            status=exc.status,
            error_code=exc.code,
            latency_ms=(now - entry.started_at) * 1000,
        )
        try:
            await runtime.ledger.record(entry, settlement)
        except LedgerError as ledger_exc:
            log.error("ledger record failed: %s", ledger_exc)
        runtime.metrics.finished(entry, settlement, ())
        log_request(entry, settlement)
        return error_response(exc, {**headers, "x-tollgate-cost-usd": "0"})


async def read_body(request: Request, limit: int, budget: BodyBudget) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes, with 503 when
    it would pass the bytes `budget` lets the process hold (before it is read when its
    length is declared), with 408 when the client pauses or takes too long sending it.

    What `budget` charges stays in the request's scope until the web layer releases it."""
    scope = request.scope
    declared = request.headers.get("content-length")
    charged = 0
    if declared is not None and declared.isdigit():
        charged = int(declared)
        if charged > limit:
            raise too_large(limit)
        budget.take(scope, charged)
    chunks: list[bytes] = []
    size = 0
    deadline = BodyDeadline(budget.idle_s, budget.total_s)
    try:
        async for chunk in request.stream():
            deadline.progress()
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            if size > charged:  # a chunked body: charged as it comes
                budget.take(scope, size - charged)
                charged = size
            chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidRequest("The client disconnected before sending the whole body.") from None
    except asyncio.CancelledError:
        if not deadline.expired:
            raise
        raise budget.timed_out(size) from None
    finally:
        deadline.close()
    return b"".join(chunks)


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"Request body is larger than the {limit:,} bytes Tollgate accepts on this endpoint."
    )


def refusal_outcome(exc: RequestError) -> Outcome:
    if isinstance(exc, BudgetExceeded):
        return "rejected_budget"
    if isinstance(exc, PolicyViolation):
        return "rejected_policy"
    return "client_error"


class KeyRefusals:
    """Requests refused for a missing or unknown key: anyone can send them, as fast as they
    like, so they are counted in a metric and a throttled log line, never in the ledger
    (a ledger row each grew the database by ~9 kB per refused request)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._unlogged = 0
        self._next_log = 0.0

    def refuse(
        self,
        request: Request,
        exc: AuthenticationFailed,
        headers: dict[str, str],
        runtime: Runtime,
    ) -> Response:
        runtime.metrics.unauthenticated(self.endpoint, exc.reason)
        self._unlogged += 1
        now = time.monotonic()
        if now >= self._next_log:
            # The key itself is never logged, not even redacted.
            client = request.client.host if request.client else "?"
            log.warning(
                "refused %d request(s) on %s for their key in the last %.0f s "
                "(latest: %s from %s)",
                self._unlogged, self.endpoint, KEY_REFUSALS_LOG_EVERY_S, exc.reason, client,
            )  # fmt: skip
            self._unlogged = 0
            self._next_log = now + KEY_REFUSALS_LOG_EVERY_S
        return error_response(exc, {**headers, "x-tollgate-cost-usd": "0"})


class OtherPaths:
    """Any other `/v1/*` path: 404 in OpenAI's error shape, unless a `passthrough:` prefix
    lists it; then it is forwarded for an authenticated team with the upstream key, as is
    and unmetered (for free endpoints such as `/v1/models`), for the methods the prefix
    lists (GET and HEAD unless configured).

    The path is already canonical (`Gateway`): the prefix matched is the path forwarded.
    """

    def __init__(self) -> None:
        self.key_refusals = KeyRefusals("passthrough")

    async def handle(self, request: Request, runtime: Runtime) -> Response:
        s = runtime
        path, method = request.url.path, request.method
        listed = [p for p in s.config.passthrough if under(path, p.prefix)]
        # Image requests are never unmetered, whatever a prefix or the path's case says.
        if not listed or under(path.lower(), "/v1/images"):
            return error_response(
                NotFound(
                    f"Invalid URL ({method} {path}): Tollgate proxies only the image endpoints."
                )
            )
        headers = {"x-tollgate-request-id": new_request_id()}
        try:
            team, _ = identify(request.headers.get("authorization"), s.config.team_by_key_hash())
        except AuthenticationFailed as exc:
            return self.key_refusals.refuse(request, exc, headers, s)
        allowed = frozenset[str]().union(*(p.methods for p in listed))
        query = plain_query(request.scope.get("query_string", b""))
        try:
            if method not in allowed:
                raise MethodNotAllowed(
                    f"{method} {path} is not forwarded: passthrough allows "
                    f"{', '.join(sorted(allowed))} here.",
                    tuple(sorted(allowed)),
                )
            if query is None:
                raise InvalidRequest(
                    "The query string holds characters that must be percent-encoded."
                )
            body = await read_body(request, s.config.limits.generations_bytes, s.bodies)
            answer = await s.upstream.send(
                path.removeprefix("/v1"),
                body,
                request.headers.get("content-type", ""),
                request.headers.items(),
                method=method,
                query=query,
            )
        except RequestError as exc:
            return error_response(exc, headers)
        headers = {**dict(response_headers(answer)), **headers, "x-tollgate-team": team.name}
        return StreamingResponse(
            answer.chunks(),
            status_code=answer.status,
            headers=headers,
            background=BackgroundTask(answer.aclose),
        )
