"""Which OpenAI project a team's object is asked for under.

OpenAI keeps a response, file or batch in the project it was created under and answers
404 for it in any other. A team's requests go under its `openai_project`, else
`upstream.project` (`Config.project_of`), which a reload may change. The ledger records
the project of each object Tollgate forwards (a request's row, schema version 9 for held
rows and 10 for every row; a file's or batch's record, version 10), and every read,
cancel and delete of one goes under that project (`created_under`), whatever the team's
is now. A listing (`GET /v1/files`, `GET /v1/batches`) goes under the team's project
now: it shows that project's objects.

A new request that would build on an object of the team's former project (a
`previous_response_id`, a batch's `input_file_id`) is refused (`same_project`, 400
`object_in_other_project`) rather than sent under either project. Under the team's
project now, OpenAI would not find the object. Under the former one, OpenAI would find
it but bill the new response or batch to that project, which the team no longer maps to:
its spend there would leave the team's project limits, OpenAI's usage pages and `tollgate
reconcile --by project` (which maps each team to its project now). The client starts
again in the new project instead: it sends the conversation's input again, or uploads
the batch file again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.core.errors import OtherProject
from proxy.ledger import HeldEntry, ResponseRow, StoredObject

if TYPE_CHECKING:
    from proxy.web.runtime import Runtime

Recorded = HeldEntry | ResponseRow | StoredObject
"""A team's object as the ledger recorded it, with the project it was created under."""


def created_under(runtime: Runtime, found: Recorded) -> str | None:
    """The OpenAI project an object is asked for under: the one it was created under, as
    the ledger recorded it (None: none was sent), whatever the team's is now. An object
    recorded before its project was (schema versions 9 and 10) is asked for under the
    team's project now, the best guess left."""
    if found.project_known:
        return found.project
    team = found.entry.team if isinstance(found, HeldEntry) else found.team
    return runtime.config.project_of(team or "")


def same_project(runtime: Runtime, found: Recorded, project: str | None, what: str) -> None:
    """OtherProject unless `found`, `what` names it (`Previous response 'resp_1'`), was
    created under `project`, the one its team's new request goes under."""
    made = created_under(runtime, found)
    if made == project:
        return
    if isinstance(found, StoredObject):
        param, again = "input_file_id", "Upload the file again and create the batch from it."
    else:
        param = "previous_response_id"
        again = "Start a new response: send its input again, without previous_response_id."
    raise OtherProject(
        f"{what} was created under OpenAI project {_named(made)}, and your team's requests "
        f"now go under {_named(project)}, where OpenAI does not find it. {again}",
        param=param,
    )


def _named(project: str | None) -> str:
    return project if project is not None else "(none: the upstream key's default project)"
