"""The ledger's rate counts, on both backends: counted in the reservation's transaction
(a refusal stores nothing), exact under concurrent reservations of one process and of two
replicas sharing PostgreSQL, shares kept across processes, old windows forgotten, and the
migration to schema version 7."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.core import rates
from proxy.core.errors import RateLimited
from proxy.core.models import Counter, Totals
from proxy.core.settings import Config, RateLimit, RateShare
from proxy.ledger import migrate_ledger, open_ledger
from proxy.ledger.base import Backend, Reservation
from proxy.ledger.sqlite import SCHEMA_VERSION
from tests import pg
from tests.test_ledger import ESTIMATE, entry
from tests.test_rates import config, team

NOW = 1_780_000_050.0
DAY = Counter("team", "a", "", "day", 0.0)


def limited(*org: RateLimit) -> Config:
    return config(
        (
            team("a", RateLimit("minute", "images", 10), RateShare("minute", Decimal("0.5"))),
            team("b"),
        ),
        *org,
    )


async def reserve(
    ledger: Backend, cfg: Config, name: str, request_id: str, now: float = NOW
) -> Reservation:
    found = next(t for t in cfg.teams if t.name == name)
    made = entry(request_id, now, team=name)

    def choose(_: Mapping[Counter, Totals]) -> Reservation:
        return Reservation(made, ESTIMATE, (Counter("team", name, "", "day", 0.0),))

    return await ledger.reserve([], choose, rates.plan(cfg, found, now))


async def admitted(ledger: Backend, cfg: Config, name: str, request_id: str) -> bool:
    try:
        await reserve(ledger, cfg, name, request_id)
    except RateLimited:
        return False
    return True


async def test_a_reservation_adds_its_counts_and_tells_the_room_left(ledger: Backend) -> None:
    cfg = limited(RateLimit("minute", "requests", 100))
    reservation = await reserve(ledger, cfg, "a", "r1")
    assert reservation.paced is not None
    rooms = {r.metric: r.remaining for r in reservation.paced.rooms}
    assert rooms == {"images": 9, "requests": 99}
    plan = rates.plan(cfg, cfg.teams[0], NOW)
    assert plan is not None
    counts = await ledger.rate_counts(plan)
    assert sorted(counts.used.values()) == [1, 1, 1]  # its limit, the organization, its share


async def test_a_refused_request_stores_nothing(ledger: Backend) -> None:
    cfg = limited()
    for index in range(10):
        await reserve(ledger, cfg, "a", f"r{index}")
    with pytest.raises(RateLimited) as caught:
        await reserve(ledger, cfg, "a", "over")
    assert caught.value.retry_after == 30
    assert [row.entry.id for row in await ledger.rows()] == [f"r{i}" for i in range(10)]
    assert (await ledger.totals([DAY]))[DAY].reserved_nanos == 10 * 500_000_000


async def test_concurrent_reservations_never_pass_the_limit(ledger: Backend) -> None:
    cfg = limited()
    results = await asyncio.gather(*(admitted(ledger, cfg, "a", f"r{i}") for i in range(30)))
    assert sum(results) == 10


async def test_a_share_is_kept_for_its_team_in_the_ledger(ledger: Backend) -> None:
    cfg = limited(RateLimit("minute", "images", 8))
    # b borrows what a is not promised (4 of 8), then is refused; a still gets its 4.
    results = [await admitted(ledger, cfg, "b", f"b{i}") for i in range(6)]
    assert results == [True] * 4 + [False] * 2
    results = [await admitted(ledger, cfg, "a", f"a{i}") for i in range(5)]
    assert results == [True] * 4 + [False]


async def test_a_share_taken_away_mid_window_is_kept_for_nobody(ledger: Backend) -> None:
    # a, c and d hold shares of 12 (3, 3 and 6); a uses its 3, then a reload takes its
    # share away: b may borrow only what c and d are not promised, and they get theirs.
    def shares(a: str) -> Config:
        return config(
            (
                team("a", *([RateShare("minute", Decimal(a))] if a else [])),
                team("b"),
                team("c", RateShare("minute", Decimal("0.25"))),
                team("d", RateShare("minute", Decimal("0.5"))),
            ),
            RateLimit("minute", "images", 12),
        )

    before, after = shares("0.25"), shares("")
    assert [await admitted(ledger, before, "a", f"a{i}") for i in range(3)] == [True] * 3
    borrowed = sum([await admitted(ledger, after, "b", f"b{i}") for i in range(12)])
    assert borrowed == 0  # 3 used, 9 promised to c and d
    assert [await admitted(ledger, after, "c", f"c{i}") for i in range(3)] == [True] * 3
    assert [await admitted(ledger, after, "d", f"d{i}") for i in range(6)] == [True] * 6


async def test_a_share_given_mid_window_counts_what_its_team_borrowed(ledger: Backend) -> None:
    # b borrows the 6 of 12 that a's share leaves, then a reload gives b the other half:
    # what b borrowed is its use of its new promise, and the organization stays within 12.
    def shares(b: str) -> Config:
        return config(
            (
                team("a", RateShare("minute", Decimal("0.5"))),
                team("b", *([RateShare("minute", Decimal(b))] if b else [])),
            ),
            RateLimit("minute", "images", 12),
        )

    before, after = shares(""), shares("0.5")
    assert sum([await admitted(ledger, before, "b", f"b{i}") for i in range(8)]) == 6
    assert sum([await admitted(ledger, after, "a", f"a{i}") for i in range(8)]) == 6
    assert sum([await admitted(ledger, after, "b", f"c{i}") for i in range(8)]) == 0


async def test_a_day_limit_keeps_its_count_when_the_time_zone_changes(ledger: Backend) -> None:
    # NOW is 20:27 UTC: Tokyo's day began at 15:00 UTC, after the UTC day did; what UTC's
    # day counted still counts (more than Tokyo's own day, never less).
    def daily(timezone: str) -> Config:
        return config((team("a", RateLimit("day", "requests", 3)),), timezone=timezone)

    assert [await admitted(ledger, daily("UTC"), "a", f"r{i}") for i in range(3)] == [True] * 3
    assert not await admitted(ledger, daily("Asia/Tokyo"), "a", "tokyo")
    tokyo = daily("Asia/Tokyo")
    plan = rates.plan(tokyo, tokyo.teams[0], NOW)
    assert plan is not None
    assert list((await ledger.rate_counts(plan)).used.values()) == [3]
    assert list((await ledger.rate_windows(plan.slots)).values()) == [3]


async def test_counts_of_old_windows_are_forgotten(ledger: Backend) -> None:
    cfg = limited()
    await reserve(ledger, cfg, "a", "old", now=NOW - 3600)
    await reserve(ledger, cfg, "a", "new")
    assert await ledger.forget_counts(NOW - 60) == 1  # the old minute of the team
    plan = rates.plan(cfg, cfg.teams[0], NOW)
    assert plan is not None
    assert len((await ledger.rate_counts(plan)).used) == 1  # the minute's team count


async def test_two_replicas_on_postgresql_count_together(tmp_path: Path) -> None:
    url = pg.ledger_url("postgresql", tmp_path)
    cfg = limited(RateLimit("minute", "images", 14))
    replicas = [await open_ledger(url), await open_ledger(url)]
    try:
        asks = [
            admitted(replicas[i % 2], cfg, name, f"{name}{i}")
            for i in range(24)
            for name in ("a", "b")
        ]
        results = await asyncio.gather(*asks)
        by_team = {"a": sum(results[0::2]), "b": sum(results[1::2])}
        assert sum(by_team.values()) <= 14
        assert by_team["a"] >= 7  # its share (half of 14), whatever b did
        assert by_team["a"] <= 10  # its own limit
    finally:
        for replica in replicas:
            await replica.close()
        pg.drop_schema(url)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_version_6_ledger_migrates_to_count_rates(kind: str, tmp_path: Path) -> None:
    url = pg.ledger_at_version(kind, tmp_path, 6)
    try:
        assert await migrate_ledger(url) == (6, SCHEMA_VERSION)
        ledger = await open_ledger(url)
        try:
            cfg = limited()
            assert await admitted(ledger, cfg, "a", "r1")
        finally:
            await ledger.close()
    finally:
        if kind == "postgresql":
            pg.drop_schema(url)
