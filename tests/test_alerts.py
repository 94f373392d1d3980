"""Soft-threshold notifications: webhook messages when settled spend crosses `alert_at`."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.config import load_config
from proxy.core.models import Entry, Settlement, Usage
from proxy.core.periods import Window, counters, zone
from proxy.core.settings import Alerts as AlertSettings
from proxy.core.settings import Allow, Budget, Config, Team, TeamKey
from proxy.core.status import BudgetStatus
from proxy.finance.alerts import Alerts, crossings
from proxy.ledger import HeldEntry, Reservation
from proxy.ledger.sqlite import SqliteLedger
from proxy.web import housekeeping
from proxy.web.batches import release
from proxy.web.follow import charge_bound
from tests.conftest import age_reservations

POLICIES = Path(__file__).parent.parent / "policies"

NANOS = 10**9
NOW = 1_780_000_000.0  # 2026-05-28, UTC


class Receiver:
    """A webhook on 127.0.0.1 that keeps what it is sent; it can answer 500 a few times, and
    take half a second over a message of threshold `slow`."""

    def __init__(self, failures: int = 0, slow: str | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.attempts = 0
        self.failures = failures
        self.slow = slow
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                received.attempts += 1
                if json.loads(body).get("threshold") == received.slow:
                    time.sleep(0.5)
                if received.failures:
                    received.failures -= 1
                    self.send_response(500)
                else:
                    received.messages.append(json.loads(body))
                    self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.close()


def config(webhooks: tuple[str, ...], limit_usd: int = 10) -> Config:
    design = Team(
        name="design",
        cost_center=None,
        keys=(TeamKey("k", "0" * 64),),
        budgets=(
            Budget("month", "usd", limit_usd * NANOS, (Decimal("0.5"), Decimal("0.8"))),
            Budget("day", "usd", 100 * NANOS),
        ),
        per_user=(),
        allow=Allow(),
        throttle=(),
    )
    return replace(
        load_config(POLICIES),
        timezone="UTC",
        organization_budgets=(),
        teams=(design,),
        alerts=AlertSettings(webhooks=webhooks, timeout_s=2.0),
    )


async def spend(ledger: SqliteLedger, nanos: int, n: int = 1, user: str | None = None) -> Entry:
    """Reserve and settle a request of team design (and `user`) costing `nanos`."""
    entry = Entry(
        f"tg_req_{n}", NOW, "generations", team="design", user=user, estimated_nanos=nanos
    )
    write = counters("design", user, NOW, zone("UTC"))
    await ledger.reserve(write, lambda totals: Reservation(entry, Usage(), write))
    await ledger.settle(entry.id, Settlement(NOW, "ok", 200, Usage(images=1), cost_nanos=nanos))
    return entry


@pytest.fixture
async def ledger(tmp_path: Path) -> Any:
    opened = SqliteLedger(tmp_path / "ledger.db")
    await opened.open()
    yield opened
    await opened.close()


def alerts_for(cfg: Config, ledger: SqliteLedger, **options: Any) -> Alerts:
    notifier = Alerts(cfg, ledger, lambda: NOW, **options)
    notifier.start()
    return notifier


async def test_crossing_a_threshold_posts_one_message_with_slack_text_and_fields(
    ledger: SqliteLedger, receiver: Receiver
) -> None:
    notifier = alerts_for(config((receiver.url,)), ledger)
    notifier.settled(await spend(ledger, 4 * NANOS, 1))  # 40 %: below every threshold
    await notifier.idle()
    notifier.settled(await spend(ledger, 2 * NANOS, 2))  # 60 %: crosses 0.5
    await notifier.idle()
    await notifier.aclose()
    assert len(receiver.messages) == 1
    message = receiver.messages[0]
    assert message["team"] == "design"
    assert message["scope"] == "team"
    assert message["period"] == "month"
    assert message["threshold"] == "0.5"
    assert message["limit_usd"] == "10"
    assert message["spent_usd"] == "6"
    assert message["utilization"] == "0.6000"
    assert message["period_end"] == "2026-06-01T00:00:00+00:00"
    assert "team design's month budget has reached 50%" in message["text"]
    assert "$6 of $10" in message["text"]


async def test_each_threshold_is_announced_once_per_period_even_after_a_restart(
    ledger: SqliteLedger, receiver: Receiver
) -> None:
    cfg = config((receiver.url,))
    notifier = alerts_for(cfg, ledger)
    for n in range(1, 10):  # 1 USD each, up to 90 %
        notifier.settled(await spend(ledger, NANOS, n))
        await notifier.idle()
    await notifier.aclose()
    # A new process (same ledger) finds nothing new to say.
    again = alerts_for(cfg, ledger)
    again.settled(await spend(ledger, NANOS // 2, 10))
    await again.idle()
    await again.aclose()
    assert [m["threshold"] for m in receiver.messages] == ["0.5", "0.8"]


async def test_thresholds_crossed_at_once_reach_a_webhook_in_order(ledger: SqliteLedger) -> None:
    """One settlement crossing 50 % and 80 %: the channel reads 50 % first, even when the
    webhook is slow over the first (they were posted side by side, and kept in whichever
    order the webhook took them)."""
    hook = Receiver(slow="0.5")
    try:
        notifier = alerts_for(config((hook.url,)), ledger)
        notifier.settled(await spend(ledger, 9 * NANOS, 1))
        await notifier.idle()
        await notifier.aclose()
    finally:
        hook.close()
    assert [m["threshold"] for m in hook.messages] == ["0.5", "0.8"]


async def test_a_per_user_budget_announces_each_users_thresholds(
    ledger: SqliteLedger, receiver: Receiver
) -> None:
    """`per_user: [{period: day, limit_usd: 2, alert_at: [0.5]}]` is announced for each user
    who reaches it, once; its thresholds were accepted and never announced."""
    cfg = config((receiver.url,), limit_usd=1000)
    design = replace(cfg.teams[0], per_user=(Budget("day", "usd", 2 * NANOS, (Decimal("0.5"),)),))
    notifier = alerts_for(replace(cfg, teams=(design,)), ledger)
    notifier.settled(await spend(ledger, NANOS // 2, 1, user="alice"))  # 25 %
    await notifier.idle()
    assert receiver.messages == []
    notifier.settled(await spend(ledger, NANOS, 2, user="alice"))  # 75 %
    notifier.settled(await spend(ledger, NANOS // 2, 3, user="<!channel>"))  # 25 %
    await notifier.idle()
    notifier.settled(await spend(ledger, NANOS // 10, 4, user="alice"))  # said already
    await notifier.idle()
    await notifier.aclose()
    [message] = receiver.messages
    assert (message["scope"], message["team"], message["user"]) == ("user", "design", "alice")
    assert (message["period"], message["threshold"], message["spent_usd"]) == ("day", "0.5", "1.5")
    assert "user alice's (team design) day budget has reached 50%" in message["text"]
    # A user's name is the client's: Slack shows it, never notifies the channel it names.
    notifier = alerts_for(replace(cfg, teams=(design,)), ledger)
    notifier.settled(await spend(ledger, NANOS, 5, user="<!channel>"))
    await notifier.idle()
    await notifier.aclose()
    assert receiver.messages[1]["user"] == "<!channel>"
    assert "user &lt;!channel&gt;'s (team design)" in receiver.messages[1]["text"]


async def test_a_failing_webhook_is_retried_and_a_slow_one_never_blocks_settled(
    ledger: SqliteLedger,
) -> None:
    hook = Receiver(failures=2)
    try:
        notifier = alerts_for(config((hook.url,), limit_usd=1), ledger, retry_delays=(0.01, 0.01))
        entry = await spend(ledger, NANOS)
        notifier.settled(entry)
        assert hook.attempts == 0  # only notes the team: the webhook is called later
        await notifier.idle()
        await notifier.aclose()
        assert hook.attempts == 4  # two thresholds; the first one's first two tries fail
        assert sorted(m["threshold"] for m in hook.messages) == ["0.5", "0.8"]
    finally:
        hook.close()


async def test_an_unreachable_webhook_gives_up_after_its_retries(ledger: SqliteLedger) -> None:
    hook = Receiver()
    url = hook.url
    hook.close()
    notifier = alerts_for(config((url,), limit_usd=1), ledger, retry_delays=(0.01,))
    notifier.settled(await spend(ledger, NANOS))
    await asyncio.wait_for(notifier.idle(), 60)  # only so that a hang fails
    await notifier.aclose()
    assert await ledger.claim_alert("anything", NOW)


async def test_without_webhooks_nothing_is_checked(ledger: SqliteLedger) -> None:
    notifier = alerts_for(config(()), ledger)
    notifier.settled(await spend(ledger, 9 * NANOS))
    await notifier.idle()
    await notifier.aclose()
    assert await ledger.claim_alert("team|design||month|usd|1777593600|0.5", NOW)


async def test_claim_alert_is_true_only_the_first_time(ledger: SqliteLedger) -> None:
    assert await ledger.claim_alert("k", NOW)
    assert not await ledger.claim_alert("k", NOW + 1)
    assert await ledger.claim_alert("k2", NOW)


def status(spent: int, alert_at: tuple[str, ...], scope: str = "team") -> BudgetStatus:
    return BudgetStatus(
        scope=scope,
        team="design" if scope == "team" else "",
        user="",
        period="month",
        metric="usd",
        limit=100,
        spent=spent,
        reserved=50,
        window=Window("month", 0.0, 10.0),
        alert_at=tuple(Decimal(a) for a in alert_at),
    )


@pytest.mark.parametrize(
    ("spent", "expected"),
    [(49, []), (50, ["0.5"]), (80, ["0.5", "0.8"]), (120, ["0.5", "0.8"])],
)
def test_crossings_count_settled_spend_not_reservations(spent: int, expected: list[str]) -> None:
    found = crossings([status(spent, ("0.5", "0.8"))], {"design"})
    assert [str(c.threshold) for c in found] == expected


def test_crossings_are_those_of_the_settled_team_and_of_the_organization() -> None:
    budgets = [status(90, ("0.5",)), status(90, ("0.5",), scope="organization")]
    assert [c.status.scope for c in crossings(budgets, {"research"})] == ["organization"]
    keys = {c.key for c in crossings(budgets, {"design"})}
    assert keys == {"team|design||month|usd|0|0.5", "organization|||month|usd|0|0.5"}


async def reserve(ledger: SqliteLedger, nanos: int, n: int) -> Entry:
    """Reserve (and leave unsettled) a request of team design costing at most `nanos`."""
    entry = Entry(f"tg_req_{n}", NOW, "generations", team="design", estimated_nanos=nanos)
    write = counters("design", None, NOW, zone("UTC"))
    await ledger.reserve(write, lambda totals: Reservation(entry, Usage(images=1), write))
    return entry


async def test_a_reclaim_at_the_bound_announces_the_thresholds_it_crosses(
    ledger: SqliteLedger, receiver: Receiver
) -> None:
    """A reservation no live request owns is charged its bound by housekeeping: a threshold
    that charge crosses is announced then, not at the team's next settlement (never, when
    none comes)."""
    notifier = alerts_for(config((receiver.url,)), ledger)
    await reserve(ledger, 6 * NANOS, 1)  # 60 % once charged
    await age_reservations(ledger, 7200.0)
    me = housekeeping.this_process()
    await ledger.register(me)
    charged = await housekeeping.reclaim_once(
        ledger, me, NOW + 7200, after_s=3600.0, reclaimed=notifier.reclaimed
    )
    assert charged == 1
    await notifier.idle()
    await notifier.aclose()
    assert [(m["team"], m["threshold"]) for m in receiver.messages] == [("design", "0.5")]


async def test_a_held_reservation_charged_its_bound_announces_the_thresholds_it_crosses(
    ledger: SqliteLedger, receiver: Receiver
) -> None:
    """A held response whose models a reload took away is charged its bound when adopted
    (`charge_bound`): announced as any settlement is."""
    notifier = alerts_for(config((receiver.url,)), ledger)
    entry = await reserve(ledger, 9 * NANOS, 1)  # 90 % once charged
    await ledger.hold(entry.id, "resp_1")
    runtime: Any = SimpleNamespace(clock=lambda: NOW, ledger=ledger, alerts=notifier)
    await charge_bound(runtime, HeldEntry(entry, Usage(images=1), None), "resp_1")
    await notifier.idle()
    await notifier.aclose()
    assert [m["threshold"] for m in receiver.messages] == ["0.5", "0.8"]


async def test_a_batch_create_charged_its_bound_announces_the_thresholds_it_crosses(
    ledger: SqliteLedger, receiver: Receiver
) -> None:
    """A batch create that may have reached OpenAI and got no answer is charged its bound
    (`release`, `charged`): announced as any settlement is."""
    cfg = config((receiver.url,))
    notifier = alerts_for(cfg, ledger)
    entry = await reserve(ledger, 6 * NANOS, 1)
    metrics = SimpleNamespace(finished=lambda *args, **kwargs: None)
    runtime: Any = SimpleNamespace(
        clock=lambda: NOW, ledger=ledger, alerts=notifier, config=cfg, metrics=metrics
    )
    await release(runtime, entry, 502, "upstream_unavailable", charged=Usage(images=1))
    await notifier.idle()
    await notifier.aclose()
    assert [m["threshold"] for m in receiver.messages] == ["0.5"]
