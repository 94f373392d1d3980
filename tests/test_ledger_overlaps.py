"""A counter read with the windows of another time zone that overlap it (both ledgers)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from zoneinfo import ZoneInfo

from proxy.core.models import Counter, Totals
from proxy.core.periods import read_counter, window
from proxy.ledger import overlaps
from tests.test_ledger import AnyLedger, ledger, take

__all__ = ["ledger"]  # the fixture, used by name

UTC, TOKYO = ZoneInfo("UTC"), ZoneInfo("Asia/Tokyo")
NOON = datetime(2026, 11, 26, 12, 0, tzinfo=UTC).timestamp()


def day_counter(at: float, tz: ZoneInfo, *, read: bool) -> Counter:
    w = window("day", at, tz)
    if read:
        return read_counter("team", "design", "", w, tz)
    return Counter("team", "design", "", "day", w.start)


async def test_a_day_read_in_a_new_zone_holds_the_spend_counted_in_the_former_one(
    ledger: AnyLedger,
) -> None:
    # Written under UTC. Tokyo's day of the 26th runs from 15:00 UTC on the 25th: it
    # overlaps UTC's days of the 25th and the 26th, not that of the 24th.
    written = [day_counter(NOON - days * 86400, UTC, read=False) for days in (2, 1, 0)]
    for n, (counter, estimate) in enumerate(zip(written, (3, 5, 7), strict=True)):
        await ledger.reserve([], take(f"r{n}", counters=(counter,), estimate=estimate))
    tokyo = day_counter(NOON, TOKYO, read=True)
    assert tokyo.start not in {c.start for c in written}
    seen: list[Mapping[Counter, Totals]] = []
    await ledger.reserve([tokyo], take("r3", counters=(tokyo,), estimate=11, seen=seen))
    assert seen[0][tokyo].reserved_nanos == 5 + 7
    assert (await ledger.totals([tokyo]))[tokyo].reserved_nanos == 5 + 7 + 11


async def test_a_day_read_in_one_zone_holds_its_own_window_alone(ledger: AnyLedger) -> None:
    yesterday = day_counter(NOON - 86400, UTC, read=False)
    tomorrow = day_counter(NOON + 86400, UTC, read=False)
    await ledger.reserve([], take("r1", counters=(yesterday,), estimate=3))
    await ledger.reserve([], take("r2", counters=(tomorrow,), estimate=11))
    today = day_counter(NOON, UTC, read=True)
    await ledger.reserve([], take("r3", counters=(today,), estimate=5))
    assert (await ledger.totals([today]))[today].reserved_nanos == 5


def test_totals_sum_the_rows_in_a_counters_bounds_each_as_last_found() -> None:
    tokyo_day = day_counter(NOON, TOKYO, read=True)
    utc_day = day_counter(NOON, UTC, read=True)
    _, high = overlaps.bounds(tokyo_day)
    inside = tokyo_day.start + 9 * 3600  # a UTC day's start within the Tokyo day
    key = ("team", "design", "", "day")
    found = [
        (*key, tokyo_day.start, 10, 1, 0, 0, 0, 0),
        (*key, inside, 4, 9, 0, 0, 0, 0),  # a stale copy: the last one found counts
        (*key, inside, 5, 2, 0, 0, 0, 3),
        (*key, high + 86_400, 1_000, 0, 0, 0, 0, 0),  # a later window
        ("team", "other", "", "day", tokyo_day.start, 7, 0, 0, 0, 0, 0),
    ]
    never = Counter("user", "design", "ana", "day", tokyo_day.start)
    totals = overlaps.totals_of([tokyo_day, utc_day, never], found)
    assert totals[tokyo_day] == Totals(15, 3, 0, 0, 0, 3)
    assert totals[never] is overlaps.NOTHING
    alone = overlaps.totals_of([tokyo_day], found[:1])
    assert alone[tokyo_day] == Totals(10, 1, 0, 0, 0, 0)
