"""The admin API: `Authorization: Bearer <admin_token>`; off without a configured token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from proxy.core.auth import bearer_token
from proxy.core.errors import (
    AuthenticationFailed,
    ConfigError,
    InvalidConfig,
    NotFound,
    RequestError,
)
from proxy.core.settings import Config
from proxy.finance.reports_query import ReportQuery
from proxy.finance.reports_query import run as run_report
from proxy.finance.status import budget_status
from proxy.web.responses import error_response
from proxy.web.runtime import Runtime

YES = ("1", "true", "yes")
"""How a query parameter says yes (`audit=1`, `excel=true`)."""


def check_admin(request: Request, config: Config) -> None:
    """Raise unless the request carries the admin token (NotFound when the API is off)."""
    if not config.admin_token:
        raise NotFound("The admin API is off: set admin_token in tollgate.yaml to enable it.")
    token = bearer_token(request.headers.get("authorization")) or ""
    if not hmac.compare_digest(token.encode(), config.admin_token.encode()):
        raise AuthenticationFailed("Invalid admin token.")


class AdminApi:
    def __init__(self, reload: Callable[[], Awaitable[Config]]) -> None:
        self._reload = reload

    async def budgets(self, request: Request, runtime: Runtime) -> Response:
        """Every organization and team budget: limit, spent, reserved, remaining, period end."""
        s = runtime
        try:
            check_admin(request, s.config)
        except RequestError as exc:
            return error_response(exc)
        now = s.clock()
        found = await budget_status(s.config, s.ledger, now)
        return JSONResponse({"as_of": now, "budgets": [b.as_json() for b in found]})

    async def report(self, request: Request, runtime: Runtime) -> Response:
        """`GET /admin/report?from=&to=&by=&format=` (also `statement=YYYY-MM`, `audit=1`,
        `excel=1` for a CSV with a byte-order mark): the same answer as `tollgate report`;
        the audit export is streamed."""
        s = runtime
        q = request.query_params
        try:
            check_admin(request, s.config)
            audit = q.get("audit", "") in YES
            query = ReportQuery.parse(
                start=q.get("from"),
                end=q.get("to"),
                by=q.get("by"),
                fmt=q.get("format", "jsonl" if audit else "json"),
                statement=q.get("statement"),
                audit=audit,
                excel=q.get("excel", "") in YES,
            )
            answer = await run_report(query, s.ledger, s.config, s.clock())
        except RequestError as exc:
            return error_response(exc)
        if answer.stream is not None:
            return StreamingResponse(answer.stream, media_type=answer.media_type)
        return Response(answer.body, media_type=answer.media_type)

    async def reload(self, request: Request, runtime: Runtime) -> Response:
        """Swap in the configuration on disk, or refuse it and keep the current one."""
        try:
            check_admin(request, runtime.config)
        except RequestError as exc:
            return error_response(exc)
        try:
            config = await self._reload()
        except ConfigError as exc:
            return error_response(
                InvalidConfig(
                    "The new configuration is invalid; the current one stays in force:\n"
                    + "\n".join(exc.problems)
                )
            )
        return JSONResponse({"status": "reloaded", "teams": [t.name for t in config.teams]})
