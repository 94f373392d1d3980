"""The OpenAI project a held row was created under, on both backends: recorded by `hold`,
read back by the process that adopts the row (`held_entry`), a create without one
included; schema version 9 keeps the rows held before it, which recorded none."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.core.errors import LedgerError
from proxy.ledger import HeldEntry, migrate_ledger, open_ledger
from proxy.ledger.base import Backend, Owner
from proxy.ledger.sqlite import SCHEMA_VERSION
from proxy.web.follow import created_under
from tests import pg
from tests.test_ledger_responses import (
    ANSWERED,
    BOUND,
    exported,
    responses_entry,
    take_response,
)


@pytest.mark.parametrize("project", ["proj_A", None], ids=["project", "none"])
async def test_the_project_a_response_was_held_under_is_read_by_its_adopter(
    url: str, project: str | None
) -> None:
    first, second = await open_ledger(url), await open_ledger(url)
    try:
        await first.register(Owner("first", "host-a", 11), 10.0)
        await first.reserve([], take_response("bg"))
        await first.hold("bg", "resp_bg", project)
        await first.unregister()
        await second.register(Owner("second", "host-b", 22), 20.0)
        assert await second.adopt(["first"]) == 1
        assert await second.held() == [("bg", "resp_bg")]
        assert await second.held_entry("bg") == HeldEntry(
            responses_entry("bg"), BOUND, project, project_known=True
        )
        await second.settle("bg", ANSWERED)
        assert await second.held_entry("bg") is None  # settled: no longer held
    finally:
        await first.close()
        await second.close()


async def test_held_entry_is_none_for_a_row_not_held_or_unknown(ledger: Backend) -> None:
    await ledger.reserve([], take_response("plain"))
    assert await ledger.held_entry("plain") is None  # in flight, but not held
    assert await ledger.held_entry("nope") is None
    with pytest.raises(LedgerError, match="no request nope"):
        await ledger.hold("nope", "resp_x", "proj_A")


async def test_the_project_is_stored_as_sent(ledger: Backend) -> None:
    """'' for a create sent without a project: NULL is left to rows that recorded none."""
    await ledger.reserve([], take_response("a"))
    await ledger.reserve([], take_response("b"))
    await ledger.reserve([], take_response("c"))
    await ledger.hold("a", "resp_a", "proj_A")
    await ledger.hold("b", "resp_b")
    assert [(await exported(ledger, i))["project"] for i in "abc"] == ["proj_A", "", None]


# -- schema version 9 ------------------------------------------------------------------------

V8_HELD = (
    "INSERT INTO requests (id, started_at, team, endpoint, model, mainline_model, state, "
    "held, response_id, estimated_nanos, reserved_nanos, images, counters, owner) VALUES "
    "('old', 100.0, 'design', 'responses', 'gpt-image-2', 'gpt-5.5', 'reserved', 1, "
    "'resp_old', 500000000, 500000000, 1, '[]', 'gone')"
)
"""A background response held by a version 8 ledger's process, which then stopped."""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_version_8_ledger_migrates_and_keeps_its_held_rows(
    kind: str, tmp_path: Path
) -> None:
    url = pg.ledger_at_version(kind, tmp_path, 8, V8_HELD)
    try:
        assert SCHEMA_VERSION == 9
        assert await migrate_ledger(url) == (8, 9)
        ledger = await open_ledger(url)
        try:
            await ledger.register(Owner("after", "host", 1), 200.0)
            assert await ledger.adopt(["gone"]) == 1
            assert await ledger.held() == [("old", "resp_old")]
            old = await ledger.held_entry("old")
            assert old is not None and (old.entry.id, old.entry.estimated_nanos) == (
                "old",
                500_000_000,
            )
            assert (old.project, old.project_known) == (None, False)  # it recorded none
            await ledger.reserve([], take_response("new"))  # and it takes the new rows
            await ledger.hold("new", "resp_new", "proj_A")
            new = await ledger.held_entry("new")
            assert new is not None and (new.project, new.project_known) == ("proj_A", True)
        finally:
            await ledger.close()
        assert await migrate_ledger(url) == (9, 9)
    finally:
        if kind == "postgresql":
            pg.drop_schema(url)


# -- the project an adopted row is followed under --------------------------------------------


def runtime_with(projects: dict[str, str | None]) -> Any:
    """Just what `created_under` reads of a runtime: the configured projects of teams."""
    return SimpleNamespace(config=SimpleNamespace(project_of=projects.get))


@pytest.mark.parametrize(
    ("recorded", "known", "followed"),
    [
        ("proj_A", True, "proj_A"),  # the team moved to proj_B since
        (None, True, None),  # created without a project: followed without one
        (None, False, "proj_B"),  # held before version 9: the team's project now
    ],
)
def test_an_adopted_row_is_followed_under_the_project_it_was_created_under(
    recorded: str | None, known: bool, followed: str | None
) -> None:
    held = HeldEntry(responses_entry("bg"), BOUND, recorded, known)
    assert created_under(runtime_with({"design": "proj_B"}), held) == followed
