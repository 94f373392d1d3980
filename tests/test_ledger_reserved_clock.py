"""A reservation's age is the ledger's clock's (`reserved_clock`, schema version 16): the
age past which a reclaim charges it whatever its owner, and the age a repeat reads of its
first attempt. Its `started_at` is the wall clock of the replica that wrote it, which may
be minutes off another's."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.ledger import FirstAttempt, Reservation
from proxy.ledger.base import Backend, Chooser
from proxy.web.repeats import began
from tests import pg
from tests.conftest import age_reservations
from tests.test_ledger import ALICE_DAY, DESIGN_DAY, ESTIMATE, entry, take

HOUR = 3600.0


def keyed(request_id: str, started_at: float) -> Chooser:
    """A reservation carrying an `Idempotency-Key` (its digest `key-1`), as a repeat finds."""

    def choose(totals: object) -> Reservation:
        made = replace(entry(request_id, started_at), idempotency_key="key-1", content_digest="c")
        return Reservation(made, ESTIMATE, (DESIGN_DAY, ALICE_DAY))

    return choose


async def test_a_reservation_is_aged_on_the_ledgers_clock_not_by_its_start(
    ledger: Backend,
) -> None:
    now = time.time()
    # Written by replicas whose clocks are an hour behind and an hour ahead of the judge's.
    await ledger.reserve([], take("behind", started_at=now - 2 * HOUR))
    await ledger.reserve([], take("ahead", started_at=now + HOUR))
    assert await ledger.reclaim(now, older_than_s=HOUR) == 0  # both were reserved just now
    await age_reservations(ledger, HOUR + 1)
    assert await ledger.reclaim(now, older_than_s=HOUR) == 2
    rows = {row.entry.id: row.settlement for row in await ledger.rows()}
    assert {s.error_code for s in rows.values() if s is not None} == {"outcome_unknown"}


async def test_a_first_attempt_is_read_with_its_age_on_the_ledgers_clock(
    ledger: Backend,
) -> None:
    now = time.time()
    await ledger.reserve([], keyed("first", started_at=now - 2 * HOUR))  # its clock behind
    await age_reservations(ledger, 50.0)
    first = await ledger.first_attempt("design", 0.0, key="key-1")
    assert first is not None and first.age_s is not None
    assert 50.0 <= first.age_s < 60.0
    assert now + 5 - 60.0 < began(first, now + 5) <= now + 5 - 50.0  # placed on this clock


V15_RESERVED = (
    "INSERT INTO requests (id, started_at, team, endpoint, state, estimated_nanos, "
    "reserved_nanos, counters, owner) VALUES "
    "('{id}', {started}, 'design', 'generations', 'reserved', 5, 5, '[]', 'live')"
)
"""A reservation a version 15 ledger's live process made: no ledger clock recorded."""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_version_15_ledger_migrates_and_its_reservations_are_aged_by_their_start(
    kind: str, tmp_path: Path
) -> None:
    old = V15_RESERVED.format(id="old", started=100.0)
    recent = V15_RESERVED.format(id="recent", started=900.0)
    async with pg.migrated_from(kind, tmp_path, 15, old, recent) as ledger:
        first = await ledger.first_attempt("design", 0.0, content="c")
        assert first is None
        assert await ledger.reclaim(1000.0, older_than_s=500.0) == 1  # by `started_at`
        states = {row.entry.id: row.settlement is None for row in await ledger.rows()}
        assert states == {"old": False, "recent": True}
        await ledger.reserve([], take("new", started_at=100.0))  # and it records the clock
        assert await ledger.reclaim(1000.0, older_than_s=500.0) == 0


def test_a_first_attempt_reserved_before_the_clock_was_recorded_began_at_its_start() -> None:
    first = FirstAttempt("r", 100.0, False, None, None, 0, "c")
    assert began(first, 5000.0) == 100.0
    assert began(replace(first, age_s=7.0), 5000.0) == 4993.0
