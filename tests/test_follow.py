"""The followers' loop (`proxy.web.follow.Followers`): one followed object that fails in a
way its poll did not foresee never stops the others from being followed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from proxy.core.models import Counter, Totals, Usage
from proxy.doors import ResponsesDoor
from proxy.ledger import codecs, open_ledger
from proxy.ledger.base import Owner, Reservation
from proxy.web.follow import (
    STUCK_AFTER_S,
    STUCK_LOG_EVERY_S,
    Followers,
    ResponseFollow,
    adopted_bound,
)
from proxy.web.runtime import Runtime
from tests.test_ledger import DESIGN_DAY
from tests.test_ledger_responses import BOUND, exported, responses_entry
from tests.test_rates import config, team

RUNTIME = cast(Runtime, None)  # the fakes below never read it


class Ends:
    def __init__(self) -> None:
        self.polls = 0

    async def poll(self, runtime: Any) -> bool:
        self.polls += 1
        return True


class Breaks:
    def __init__(self) -> None:
        self.polls = 0

    async def poll(self, runtime: Any) -> bool:
        self.polls += 1
        raise AttributeError("'list' object has no attribute 'get'")


def test_a_poll_that_raises_leaves_the_others_followed_and_is_asked_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    followers = Followers()
    ends, breaks = Ends(), Breaks()
    followers.follow("tg_req_ends", ends)
    followers.follow("tg_req_breaks", breaks)
    asyncio.run(followers.poll_all(RUNTIME))
    assert ends.polls == 1 and "tg_req_ends" not in followers.following
    assert "tg_req_breaks" in followers.following
    assert "following tg_req_breaks failed" in caplog.text
    asyncio.run(followers.poll_all(RUNTIME))
    assert breaks.polls == 2


def test_a_held_response_whose_models_left_the_price_book_is_charged_its_bound(
    tmp_path: Path,
) -> None:
    # Adopted after a reload took its mainline model out of the book: it cannot be priced
    # when it ends, and must not stay held (its room reserved) for good.
    async def run() -> tuple[dict[str, Any], Totals]:
        ledger = await open_ledger(f"sqlite:///{tmp_path / 'tollgate.db'}")
        try:
            await ledger.register(Owner("me", "host", 1))
            retired = replace(responses_entry("bg"), mainline_model="gpt-retired")

            def choose(_: Mapping[Counter, Totals]) -> Reservation:
                return Reservation(retired, BOUND, (DESIGN_DAY,))

            await ledger.reserve([], choose)
            await ledger.hold("bg", "resp_bg")
            told: list[str] = []
            runtime = SimpleNamespace(
                ledger=ledger,
                config=config((team("design"),)),
                clock=lambda: 2000.0,
                alerts=SimpleNamespace(settled=lambda entry: told.append(entry.id)),
            )
            followers = Followers()
            await followers.pick_up(cast(Runtime, runtime))
            assert followers.following == {}
            assert told == ["bg"]  # its budgets' thresholds are checked, as at any charge
            assert await ledger.held() == []
            return await exported(ledger, "bg"), (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY]
        finally:
            await ledger.close()

    row, totals = asyncio.run(run())
    assert (row["state"], row["cost_nanos"], row["flagged"]) == ("settled", 400_000_000, 1)
    assert (row["error_code"], row["response_id"]) == ("outcome_unknown", "resp_bg")
    assert (totals.spent_nanos, totals.reserved_nanos) == (400_000_000, 0)


class Pending:
    """An upstream whose response never leaves `in_progress`."""

    status = 200

    async def send(self, *args: Any, **kwargs: Any) -> Pending:
        return self

    async def chunks(self) -> Any:
        yield b'{"id": "resp_stuck", "object": "response", "status": "in_progress"}'

    async def aclose(self) -> None:
        pass


def test_a_response_that_stays_pending_is_logged_with_its_held_reservation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One stuck in_progress for days keeps its room held: never silently.
    entry = responses_entry("stuck")
    now = [entry.started_at + 60.0]
    runtime = cast(Runtime, SimpleNamespace(upstream=Pending(), clock=lambda: now[0]))
    exchange = SimpleNamespace(door=ResponsesDoor(), project=None, entry=entry)
    followed = ResponseFollow(cast(Any, exchange), "resp_stuck")

    def polled_at(at: float) -> list[str]:
        now[0] = entry.started_at + at
        caplog.clear()
        assert asyncio.run(followed.poll(runtime)) is False
        return [r.getMessage() for r in caplog.records if "resp_stuck" in r.getMessage()]

    assert polled_at(60.0) == []
    logged = polled_at(STUCK_AFTER_S + 1)
    assert len(logged) == 1 and "still in_progress" in logged[0]
    assert "stuck" in logged[0] and "stays held" in logged[0]
    assert polled_at(STUCK_AFTER_S + 2) == []
    assert len(polled_at(STUCK_AFTER_S + 1 + STUCK_LOG_EVERY_S)) == 1


def test_a_response_followed_while_its_hold_is_picked_up_is_followed_once(
    tmp_path: Path,
) -> None:
    # The request's own hold commits while the pick-up reads the held reservations: the
    # request follows it during the pick-up's next read, which must then leave it alone
    # (not replace it, nor count it in flight a second time).
    async def run() -> tuple[dict[str, Any], int]:
        ledger = await open_ledger(f"sqlite:///{tmp_path / 'tollgate.db'}")
        try:
            await ledger.register(Owner("me", "host", 1))

            def choose(_: Mapping[Counter, Totals]) -> Reservation:
                priced = replace(responses_entry("bg"), mainline_model="gpt-5-mini")
                return Reservation(priced, BOUND, (DESIGN_DAY,))

            await ledger.reserve([], choose)
            await ledger.hold("bg", "resp_bg")
            followers, own, started = Followers(), Ends(), [0]
            read = ledger.held_entry

            async def held_entry(request_id: str) -> Any:
                followers.follow(request_id, own)  # the request resumes meanwhile
                return await read(request_id)

            racing = SimpleNamespace(
                held=ledger.held, held_entry=held_entry, lost_batches=ledger.lost_batches
            )
            metrics = SimpleNamespace(started=lambda: started.__setitem__(0, started[0] + 1))
            runtime = SimpleNamespace(
                ledger=racing,
                config=config((team("design"),)),
                metrics=metrics,
                clock=lambda: 1_000_000.0,
            )
            await followers.pick_up(cast(Runtime, runtime))
            return dict(followers.following), started[0]
        finally:
            await ledger.close()

    following, started = asyncio.run(run())
    assert len(following) == 1 and isinstance(following["bg"], Ends)
    assert started == 0


class Answers:
    """An upstream that answers each poll with the next of `statuses` (no usage)."""

    status = 200

    def __init__(self, *statuses: str) -> None:
        self.statuses = list(statuses)
        self.body = b""

    async def send(self, *args: Any, **kwargs: Any) -> Answers:
        status = self.statuses.pop(0)
        self.body = json.dumps({"id": "resp_bg", "status": status, "output": []}).encode()
        return self

    async def chunks(self) -> Any:
        yield self.body

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("statuses", [("in_progress", "cancelled"), ("queued", "cancelled")])
def test_a_response_cancelled_without_usage_is_charged_its_bound_whatever_its_polls_saw(
    statuses: tuple[str, ...],
) -> None:
    # OpenAI bills what it read and wrote before the cancel, and reports no usage for it.
    # Seen queued by the last poll proves nothing: it may have started running just after
    # (a team polling its own response can cancel it then). Its bound, flagged, either way.
    entry = replace(responses_entry("bg"), mainline_model="gpt-5-mini")
    runtime = SimpleNamespace(
        upstream=Answers(*statuses), clock=lambda: entry.started_at + 5.0,
        config=config((team("design"),)),
    )  # fmt: skip
    bound = adopted_bound(cast(Runtime, runtime), entry, Usage())
    assert bound is not None
    verdicts: list[Any] = []

    async def settle(verdict: Any, status: int, upstream_id: str | None) -> None:
        verdicts.append(verdict)

    exchange = SimpleNamespace(
        door=ResponsesDoor(), project=None, entry=entry, bound=bound, settle=settle,
        upstream_id=None, response_id=None,
    )  # fmt: skip
    followed = ResponseFollow(cast(Any, exchange), "resp_bg")
    assert asyncio.run(followed.poll(cast(Runtime, runtime))) is False
    assert asyncio.run(followed.poll(cast(Runtime, runtime))) is True
    [verdict] = verdicts
    assert verdict.cost_nanos == bound.cost_nanos and verdict.charge.flagged
    assert verdict.error_code == "response_cancelled"


def test_an_adopted_bound_keeps_the_mainline_part_of_its_prompt_cache_writes() -> None:
    """A held reservation's usage comes back from its row without the tokens its bound
    counted as written to the prompt cache (no column keeps them): its mainline part was
    priced at the input rate alone, below the part reserved for it, so a response charged
    its bound recorded the write premium under the image model."""
    base = config((team("design"),))
    entry = base.prices.mainline["gpt-5.5"]
    writes = replace(
        entry, rates={**entry.rates, "cache_write_input": entry.rates["text_input"] * 5 / 4}
    )
    book = replace(base.prices, mainline={**base.prices.mainline, "gpt-5.5": writes})
    runtime = SimpleNamespace(config=replace(base, prices=book))
    reserved = Usage(mainline_input=10_000, mainline_output=2_000, mainline_cache_write=10_000)
    read_back = codecs.usage_of(codecs.usage_values(reserved))
    held = replace(responses_entry("bg"), mainline_model="gpt-5.5")
    bound = adopted_bound(cast(Runtime, runtime), held, read_back)
    assert bound is not None
    assert bound.mainline_nanos == writes.cost(reserved) > writes.cost(read_back)
