"""Soft-threshold notifications: a webhook message when settled spend crosses `alert_at`.

Off the request path: `settled()` only notes the team and wakes one background
task per process. That task reads the team's budgets from the ledger, claims each
newly crossed threshold in the ledger (so a budget, threshold and period window is
announced once, across workers, replicas and restarts) and posts one JSON message
per threshold to every webhook: Slack's `text` plus structured fields, with a
timeout and retries. A message that still fails after its retries is logged, not
sent again (the claim is taken first: at most once, never a storm).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx

from proxy.core.models import Entry, usd_text
from proxy.core.settings import Config
from proxy.core.status import BudgetStatus
from proxy.finance.status import budget_status, user_status
from proxy.ledger import Ledger

log = logging.getLogger("tollgate.alerts")

RETRY_DELAYS = (0.5, 2.0, 5.0)
"""Seconds before each retry of a webhook that failed or answered 429/5xx."""


@dataclass(frozen=True, slots=True)
class Crossing:
    """A budget whose settled spend has reached one of its `alert_at` fractions."""

    status: BudgetStatus
    threshold: Decimal

    @property
    def key(self) -> str:
        """Names the budget, threshold and period window: claimed once in the ledger."""
        s = self.status
        return (
            f"{s.scope}|{s.team}|{s.user}|{s.period}|{s.metric}|{s.window.start:.0f}|"
            f"{self.threshold}"
        )

    def message(self) -> dict[str, Any]:
        """The JSON body posted to each webhook."""
        s = self.status
        money = s.metric == "usd"
        end = s.window.end
        period_end = datetime.fromtimestamp(end, UTC).isoformat() if end is not None else None
        owner = {
            "team": f"team {s.team}'s",
            "user": f"user {slack_escaped(s.user)}'s (team {s.team})",
        }.get(s.scope, "the organization's")
        what = "" if money else f" {s.metric}"
        used = (
            f"${usd_text(s.spent)} of ${usd_text(s.limit)}"
            if money
            else f"{s.spent:,} of {s.limit:,} tokens"
        )
        until = f"; the period ends {period_end}" if period_end else ""
        text = (
            f"Tollgate: {owner} {s.period}{what} budget has reached "
            f"{percent(self.threshold)} ({used}, {percent(s.utilization)}){until}."
        )
        body: dict[str, Any] = {
            "text": text,
            "team": s.team or None,
            "user": s.user or None,
            "scope": s.scope,
            "period": s.period,
            "metric": s.metric,
            "threshold": format(self.threshold, "f"),
            "utilization": format(s.utilization.quantize(Decimal("0.0001")), "f"),
            "period_start": datetime.fromtimestamp(s.window.start, UTC).isoformat(),
            "period_end": period_end,
        }
        if money:
            body["limit_usd"] = usd_text(s.limit)
            body["spent_usd"] = usd_text(s.spent)
        else:
            body["limit_tokens"] = s.limit
            body["spent_tokens"] = s.spent
        return body


def slack_escaped(text: str) -> str:
    """`text` (a `user` a client sent) as Slack shows it and never runs: `<!channel>` would
    notify the channel, `<https://…|label>` show a link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def percent(fraction: Decimal) -> str:
    return f"{(fraction * 100).quantize(Decimal('0.1')).normalize():f}%"


def crossings(statuses: Iterable[BudgetStatus], teams: set[str]) -> list[Crossing]:
    """The thresholds reached by the budgets of `teams` and the organization's (pure)."""
    return [
        Crossing(s, threshold)
        for s in statuses
        if s.scope == "organization" or s.team in teams
        for threshold in s.alert_at
        if s.limit and s.utilization >= threshold
    ]


def watched(config: Config, team: str) -> bool:
    """Whether a settlement of `team` can cross a threshold that someone is told about."""
    if not config.alerts.webhooks:
        return False
    if any(b.alert_at for b in config.organization_budgets):
        return True
    return any(
        b.alert_at for t in config.teams if t.name == team for b in (*t.budgets, *t.per_user)
    )


def users_watched(config: Config, team: str) -> bool:
    """Whether `team` has a per-user budget with thresholds: each user's is announced."""
    return any(b.alert_at for t in config.teams if t.name == team for b in t.per_user)


class Alerts:
    """The notifier of one process: `settled()` from the request path, the rest in the
    background."""

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        clock: Callable[[], float],
        *,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        """The configuration in force: replaced on reload."""
        self._ledger = ledger
        self._clock = clock
        self._retry_delays = retry_delays
        self._client = httpx.AsyncClient(transport=transport)
        self._pending: set[str] = set()
        self._users: set[tuple[str, str]] = set()
        """(team, user) of the settlements noted whose per-user budgets have thresholds."""
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def settled(self, entry: Entry) -> None:
        """Note that `entry` was settled; returns at once."""
        if entry.team and watched(self.config, entry.team):
            self._pending.add(entry.team)
            if entry.user and users_watched(self.config, entry.team):
                self._users.add((entry.team, entry.user))
            self._idle.clear()
            self._wake.set()

    def reclaimed(self) -> None:
        """Note that reservations were charged their bound by a reclaim (whose teams it does
        not say): the budgets of every team that has thresholds are checked; returns at
        once."""
        config = self.config
        if not config.alerts.webhooks:
            return
        every = any(b.alert_at for b in config.organization_budgets)
        teams = {t.name for t in config.teams if every or watched(config, t.name)}
        if teams:
            self._pending |= teams
            self._idle.clear()
            self._wake.set()

    async def idle(self) -> None:
        """Wait until every noted settlement has been checked and its messages sent."""
        await self._idle.wait()

    async def aclose(self, timeout: float = 5.0) -> None:
        """Finish what is pending (up to `timeout` seconds), then stop."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle(), timeout)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            teams, self._pending = self._pending, set()
            users, self._users = self._users, set()
            try:
                await self.check(teams, users)
            except Exception:
                log.exception("budget alert check failed")
            if not self._pending:
                self._idle.set()

    async def check(self, teams: set[str], users: Iterable[tuple[str, str]] = ()) -> None:
        """Announce every threshold newly crossed by the budgets of `teams`, and by the
        per-user budgets of `users` (team, user)."""
        config, now = self.config, self._clock()
        statuses = await budget_status(config, self._ledger, now)
        configured = {t.name for t in config.teams}
        for team, user in sorted(users):
            if team in configured:  # not removed by a reload meanwhile
                found = await user_status(config, self._ledger, team, user, now)
                statuses += [s for s in found if s.scope == "user"]
        messages = [
            crossing.message()
            for crossing in crossings(statuses, teams)
            if await self._ledger.claim_alert(crossing.key, now)
        ]
        if messages:
            timeout = config.alerts.timeout_s
            await asyncio.gather(
                *(self.post_all(url, messages, timeout) for url in config.alerts.webhooks)
            )

    async def post_all(self, url: str, messages: list[dict[str, Any]], timeout: float) -> None:
        """POST `messages` to `url` one after the other, so that a channel reads a budget's
        50 % before its 80 %; the webhooks are written to side by side."""
        for message in messages:
            await self.post(url, message, timeout)

    async def post(self, url: str, message: dict[str, Any], timeout: float) -> bool:
        """POST `message` to `url`, retrying failures and 429/5xx answers; whether it got
        through."""
        for delay in (*self._retry_delays, None):
            try:
                answer = await self._client.post(url, json=message, timeout=timeout)
                if answer.status_code < 300:
                    return True
                problem = f"HTTP {answer.status_code}"
                if answer.status_code != 429 and answer.status_code < 500:
                    break
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if delay is None:
                break
            await asyncio.sleep(delay)
        # A webhook URL is a secret (Slack's are): name only its host.
        host = httpx.URL(url).host
        log.error("budget alert webhook on %s failed (%s): %s", host, problem, message["text"])
        return False
