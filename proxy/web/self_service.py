"""`GET /v1/tollgate/budget`: a team's own budgets and rate limits, asked with its own key.

No admin token: the team key identifies the team exactly as on a proxied request, and the
answer holds that team's numbers and the organization's, never another team's. It is
answered here, never forwarded (`OtherPaths` and the `passthrough:` loader keep
`/v1/tollgate` for Tollgate).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.core import rates
from proxy.core.errors import LedgerError, MethodNotAllowed, ServiceUnavailable
from proxy.core.paths import TOLLGATE_PATHS
from proxy.core.rates import Room
from proxy.core.settings import Team
from proxy.finance.status import budget_status, team_rate_status
from proxy.web.observe import KeyRefusals
from proxy.web.pipeline import for_team
from proxy.web.runtime import Runtime

BUDGET_PATH = f"{TOLLGATE_PATHS}/budget"
READ = ("GET", "HEAD")


class SelfService:
    def __init__(self) -> None:
        self.key_refusals = KeyRefusals("budget")

    async def budget(self, request: Request, runtime: Runtime) -> Response:
        """`{"team", "budgets", "rate_limits"}` of the key's team: each budget as one entry
        of `tollgate budgets --format json` (the organization's and the team's; per-user
        budgets are left out, as there), each rate limit with its current window. Answered
        as a team's other free paths are (`for_team`): its request id, its log line."""
        if request.method not in READ:
            raise MethodNotAllowed(
                f"Invalid method ({request.method} {BUDGET_PATH}): use GET.", READ
            )
        return await for_team(request, runtime, self.key_refusals, self._budget)

    async def _budget(
        self, request: Request, runtime: Runtime, team: Team, headers: dict[str, str]
    ) -> Response:
        config, ledger, now = runtime.config, runtime.ledger, runtime.clock()
        try:
            budgets = await budget_status(config, ledger, now, team)
            limits = await team_rate_status(config, ledger, team, now)
        except LedgerError as exc:
            raise ServiceUnavailable(
                "Tollgate cannot read the ledger right now; retry shortly."
            ) from exc
        rooms = tuple(Room(r.limit.metric, r.limit.limit, r.remaining, r.resets_at) for r in limits)
        headers.update(rates.headers(rates.tightest(rooms), now))
        body = {
            "team": team.name,
            "budgets": [b.as_json() for b in budgets],
            "rate_limits": [r.as_json() for r in limits],
        }
        return JSONResponse(body, headers=headers)
