"""The admin API: `Authorization: Bearer <admin_token>`; off without a configured token.

Every refusal is raised, and answered in OpenAI's shape by the app's exception handler.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from proxy.core.auth import bearer_token, key_hash
from proxy.core.errors import (
    AuthenticationFailed,
    ConfigError,
    InvalidConfig,
    InvalidRequest,
    LedgerError,
    NotFound,
    ServiceUnavailable,
)
from proxy.core.settings import Config
from proxy.finance.reports_query import ReportQuery
from proxy.finance.reports_query import run as run_report
from proxy.finance.status import budget_status
from proxy.web.runtime import Runtime

YES = ("1", "true", "yes")
"""How a query parameter says yes (`audit=1`, `excel=true`)."""
NO = ("", "0", "false", "no")
REPORT_PARAMS = ("from", "to", "by", "format", "statement", "audit", "excel")
"""The query parameters of `GET /admin/report`: the flags of `tollgate report`."""
LEDGER_DOWN = "Tollgate cannot read the ledger right now; retry shortly."


def check_admin(request: Request, config: Config) -> None:
    """Raise unless the request carries the admin token (NotFound when the API is off)."""
    if not config.admin_token:
        raise NotFound("The admin API is off: set admin_token in tollgate.yaml to enable it.")
    token = bearer_token(request.headers.get("authorization")) or ""
    # Digests compared, not the tokens: compare_digest takes the time of the shorter of
    # what it is given, and would tell the token's length.
    if not hmac.compare_digest(key_hash(token), key_hash(config.admin_token)):
        raise AuthenticationFailed("Invalid admin token.")


def report_query(params: QueryParams) -> ReportQuery:
    """The report `params` ask for. As the CLI refuses a flag it does not know, a parameter
    that is not one of the report's (`?form=`, `?start=`), given twice (`by=user&by=team`)
    or a yes/no that is neither (`excel=on`) is refused: answering the current month's
    report instead, or with one of the two groupings, reads as the numbers asked for."""
    for name in params:
        if name not in REPORT_PARAMS:
            raise InvalidRequest(
                f"unknown parameter {name!r}: use {', '.join(REPORT_PARAMS)}.", param=name
            )
        if len(params.getlist(name)) > 1:
            raise InvalidRequest(f"parameter {name!r} is given more than once.", param=name)
    flags = {}
    for name in ("audit", "excel"):
        value = params.get(name, "").lower()
        if value not in YES + NO:
            raise InvalidRequest(
                f"{name}={params[name]!r} is neither yes ({', '.join(YES)}) nor no "
                f"({', '.join(NO[1:])}).",
                param=name,
            )
        flags[name] = value in YES
    audit = flags["audit"]
    return ReportQuery.parse(
        start=params.get("from"),
        end=params.get("to"),
        by=params.get("by"),
        # Left empty (`?from=&to=&by=&format=`, as a form or an HTTP client writes a
        # parameter it has no value for), a parameter is absent, as every other one is.
        fmt=params.get("format") or ("jsonl" if audit else "json"),
        statement=params.get("statement"),
        audit=audit,
        excel=flags["excel"],
    )


class AdminApi:
    def __init__(self, reload: Callable[[], Awaitable[Config]]) -> None:
        self._reload = reload

    async def budgets(self, request: Request, runtime: Runtime) -> Response:
        """Every organization and team budget: limit, spent, reserved, remaining, period end."""
        check_admin(request, runtime.config)
        now = runtime.clock()
        try:
            found = await budget_status(runtime.config, runtime.ledger, now)
        except LedgerError as exc:
            raise ServiceUnavailable(LEDGER_DOWN) from exc
        return JSONResponse({"as_of": now, "budgets": [b.as_json() for b in found]})

    async def report(self, request: Request, runtime: Runtime) -> Response:
        """`GET /admin/report?from=&to=&by=&format=` (also `statement=YYYY-MM`, `audit=1`,
        `excel=1` for a CSV with a byte-order mark): the same answer as `tollgate report`;
        the audit export is streamed."""
        check_admin(request, runtime.config)
        query = report_query(request.query_params)
        first = None
        try:
            answer = await run_report(query, runtime.ledger, runtime.config, runtime.clock())
            if answer.stream is not None:
                # Read before the status is sent: a ledger that cannot be read is a 503,
                # not a 200 whose body breaks off.
                first = await anext(answer.stream, None)
        except LedgerError as exc:
            raise ServiceUnavailable(LEDGER_DOWN) from exc
        if answer.stream is not None:
            return StreamingResponse(_from(first, answer.stream), media_type=answer.media_type)
        return Response(answer.body, media_type=answer.media_type)

    async def reload(self, request: Request, runtime: Runtime) -> Response:
        """Swap in the configuration on disk, or refuse it and keep the current one."""
        check_admin(request, runtime.config)
        try:
            config = await self._reload()
        except ConfigError as exc:
            raise InvalidConfig(
                "The new configuration is invalid; the current one stays in force:\n"
                + "\n".join(exc.problems)
            ) from exc
        return JSONResponse({"status": "reloaded", "teams": [t.name for t in config.teams]})


async def _from(first: str | None, rest: AsyncGenerator[str, None]) -> AsyncIterator[str]:
    """`first`, then the chunks of `rest` (closed with this generator: it holds a database
    connection open while a client reads)."""
    async with contextlib.aclosing(rest):
        if first is None:
            return
        yield first
        async for chunk in rest:
            yield chunk
