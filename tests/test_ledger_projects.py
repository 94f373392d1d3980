"""The OpenAI project a row or object was created under, on both backends: recorded with a
request's reservation and by `hold`, read back by the process that adopts a held row
(`held_entry`) and with a response's row (`response`); recorded with a file or batch
(`own`, `stored`); a create without one included. Schema versions 9 and 10 keep the rows
and objects written before them, which recorded none."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.core.errors import LedgerError
from proxy.core.models import Counter, Totals
from proxy.ledger import HeldEntry, StoredObject, open_ledger
from proxy.ledger.base import Backend, Chooser, Owner, Reservation
from tests import pg
from tests.test_ledger_responses import (
    ALICE_DAY,
    ANSWERED,
    BOUND,
    DESIGN_DAY,
    exported,
    responses_entry,
    take_response,
)


def take_under(request_id: str, project: str | None) -> Chooser:
    """`take_response`, the request sent under `project` (None: without one)."""

    def choose(totals: Mapping[Counter, Totals]) -> Reservation:
        counters = (DESIGN_DAY, ALICE_DAY)
        return Reservation(responses_entry(request_id), BOUND, counters, project=project)

    return choose


@pytest.mark.parametrize("project", ["proj_A", None], ids=["project", "none"])
async def test_the_project_a_response_was_held_under_is_read_by_its_adopter(
    url: str, project: str | None
) -> None:
    first, second = await open_ledger(url), await open_ledger(url)
    try:
        await first.register(Owner("first", "host-a", 11))
        await first.reserve([], take_response("bg"))
        await first.hold("bg", "resp_bg", project)
        await first.unregister()
        await second.register(Owner("second", "host-b", 22))
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
    """'' for a request sent without a project: NULL is left to rows that recorded none (a
    request never forwarded, rows written before schema version 10)."""
    await ledger.reserve([], take_under("a", "proj_A"))
    await ledger.reserve([], take_under("b", None))
    await ledger.reserve([], take_under("c", "proj_A"))
    await ledger.record(responses_entry("d"), replace(ANSWERED, response_id=None))
    await ledger.hold("a", "resp_a", "proj_A")
    await ledger.hold("b", "resp_b")
    stored = [(await exported(ledger, i))["project"] for i in "abcd"]
    assert stored == ["proj_A", "", "proj_A", None]


@pytest.mark.parametrize("project", ["proj_A", None], ids=["project", "none"])
async def test_a_response_settled_at_once_is_found_with_its_project(
    ledger: Backend, project: str | None
) -> None:
    await ledger.reserve([], take_under("r1", project))
    await ledger.settle("r1", ANSWERED)  # it names resp_abc: never held
    found = await ledger.response("resp_abc")
    assert found is not None
    assert (found.request_id, found.team, found.held) == ("r1", "design", False)
    assert (found.project, found.project_known) == (project, True)


async def test_a_held_response_is_found_with_its_project_before_and_after_it_ends(
    ledger: Backend,
) -> None:
    await ledger.reserve([], take_under("bg", "proj_A"))
    await ledger.hold("bg", "resp_abc", "proj_A")
    held = await ledger.response("resp_abc")
    assert held is not None and (held.held, held.project, held.project_known) == (
        True,
        "proj_A",
        True,
    )
    await ledger.settle("bg", ANSWERED)
    ended = await ledger.response("resp_abc")
    assert ended is not None and (ended.held, ended.project) == (False, "proj_A")


BATCH_FILE = StoredObject("file-in", "design", "file", "batch", 10.0, project="proj_A")


@pytest.mark.parametrize(
    ("obj", "read"),
    [
        (BATCH_FILE, ("proj_A", True)),
        (replace(BATCH_FILE, id="file-none", project=None), (None, True)),
        (StoredObject("batch_1", "design", "batch", project="proj_A"), ("proj_A", True)),
        # A batch's output file, owned while its batch's project is not known: it stays so.
        (
            StoredObject("file-out", "design", "file", "batch_output", project_known=False),
            (None, False),
        ),
    ],
    ids=["file", "file-without", "batch", "unknown"],
)
async def test_a_file_or_batch_is_stored_with_the_project_it_was_created_under(
    ledger: Backend, obj: StoredObject, read: tuple[str | None, bool]
) -> None:
    await ledger.own(obj)
    found = await ledger.stored(obj.id)
    assert found is not None and (found.project, found.project_known) == read
    assert found == obj
    await ledger.own(replace(obj, project="proj_B"))  # an id recorded keeps its first record
    assert await ledger.stored(obj.id) == obj


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
    async with pg.migrated_from(kind, tmp_path, 8, V8_HELD) as ledger:
        await ledger.register(Owner("after", "host", 1))
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


# -- schema version 10 -----------------------------------------------------------------------

V9_SETTLED = (
    "INSERT INTO requests (id, started_at, team, endpoint, model, mainline_model, state, "
    "response_id, counters) VALUES ('old', 100.0, 'design', 'responses', 'gpt-image-2', "
    "'gpt-5.5', 'settled', 'resp_old', '[]')"
)
"""A response settled at once by a version 9 ledger: its row recorded no project."""
V9_FILE = (
    "INSERT INTO stored_objects (id, team, kind, purpose, created_at, lines) "
    "VALUES ('file-old', 'design', 'file', 'batch', 100.0, 2)"
)
"""A batch input file a version 9 ledger recorded, without its project."""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_version_9_ledger_migrates_and_its_objects_projects_are_unknown(
    kind: str, tmp_path: Path
) -> None:
    async with pg.migrated_from(kind, tmp_path, 9, V9_SETTLED, V9_FILE) as ledger:
        old = await ledger.response("resp_old")
        assert old is not None and (old.team, old.project, old.project_known) == (
            "design",
            None,
            False,
        )
        stored = await ledger.stored("file-old")
        assert stored is not None and (stored.lines, stored.project_known) == (2, False)
        await ledger.own(BATCH_FILE)  # and it takes the new objects
        assert await ledger.stored(BATCH_FILE.id) == BATCH_FILE
