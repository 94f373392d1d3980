"""Which project a team's object is asked for under (`proxy.web.projects`): the one it was
created under, as recorded, else the team's now; and a new request that would build on an
object of another project is refused."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from proxy.core.errors import OtherProject
from proxy.ledger import HeldEntry, ResponseRow, StoredObject
from proxy.web.projects import Recorded, created_under, same_project
from tests.test_ledger_responses import BOUND, responses_entry


def runtime_with(projects: dict[str, str | None]) -> Any:
    """Just what `created_under` reads of a runtime: the configured projects of teams."""
    return SimpleNamespace(config=SimpleNamespace(project_of=projects.get))


NOW = runtime_with({"design": "proj_B"})
"""The team `design` moved to proj_B."""


def recorded(kind: str, project: str | None, known: bool = True) -> Any:
    if kind == "held":
        return HeldEntry(responses_entry("bg"), BOUND, project, known)
    if kind == "response":
        return ResponseRow("resp_1", "r1", "design", 1, 1, 0, 0, False, project, known)
    return StoredObject("file-1", "design", "file", "batch", project=project, project_known=known)


KINDS = ["held", "response", "file"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("project", "known", "asked"),
    [
        ("proj_A", True, "proj_A"),  # the team moved to proj_B since
        (None, True, None),  # created without a project: asked for without one
        (None, False, "proj_B"),  # not recorded: the team's project now
    ],
)
def test_an_object_is_asked_for_under_the_project_it_was_created_under(
    kind: str, project: str | None, known: bool, asked: str | None
) -> None:
    assert created_under(NOW, recorded(kind, project, known)) == asked


@pytest.mark.parametrize(("kind", "param"), [("response", "previous_response_id"),
                                             ("file", "input_file_id")])  # fmt: skip
def test_a_new_request_building_on_another_projects_object_is_refused(
    kind: str, param: str
) -> None:
    found: Recorded = recorded(kind, "proj_A")
    with pytest.raises(OtherProject) as refused:
        same_project(NOW, found, "proj_B", "It")
    assert (refused.value.status, refused.value.code) == (400, "object_in_other_project")
    assert refused.value.param == param
    assert "It was created under OpenAI project proj_A" in refused.value.message
    assert "now go under proj_B" in refused.value.message
    with pytest.raises(OtherProject, match="under \\(none: the upstream key's default"):
        same_project(NOW, found, None, "It")


@pytest.mark.parametrize("kind", ["response", "file"])
def test_a_new_request_in_the_objects_own_project_goes_through(kind: str) -> None:
    same_project(NOW, recorded(kind, "proj_B"), "proj_B", "It")
    same_project(NOW, recorded(kind, None), None, "It")
    same_project(NOW, recorded(kind, None, known=False), "proj_B", "It")  # the best guess
