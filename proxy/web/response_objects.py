"""A response's own paths: `GET /v1/responses/{id}`, `GET …/input_items`,
`POST …/cancel` and `DELETE /v1/responses/{id}`, for the team that created it.

A response belongs to the team whose request made it (its ledger row); any other team,
and any id Tollgate never forwarded, gets the 404 OpenAI answers for an unknown id, so
one team cannot even learn that another's response exists. What is forwarded goes with
the company key, under the OpenAI project the response was created under (where OpenAI
keeps it, whatever the team's project is now: `proxy.web.projects`), its answer passed
through as it comes.

`POST /v1/responses/input_tokens` (the SDK's `responses.input_tokens.count`) is free, and
forwarded as OpenAI's token count for a team's own context: the response it continues and
the files it names must be the team's, as for a new response; its body is re-encoded from
Tollgate's reading of it, under the team's project.

A background response is settled by the followers when it ends (`proxy.web.follow`): a
cancel wakes them; a delete waits for them to settle it first, since a deleted response
can no longer be read for its usage.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from proxy.core.budgets import allow_endpoint
from proxy.core.errors import InvalidRequest, NotFound, PreviousResponseNotFound
from proxy.core.parsing import json_object
from proxy.core.settings import Team
from proxy.doors.responses import read_count
from proxy.web.admission import read_body
from proxy.web.gateway import path_of, query_of
from proxy.web.observe import KeyRefusals
from proxy.web.pipeline import for_team, forward_as_is, owned_files
from proxy.web.projects import created_under, same_project
from proxy.web.responses import error_response, streamed_response
from proxy.web.runtime import Runtime

DELETE_WAIT_POLLS = 3
"""How many times a delete asks the upstream whether a held response has ended."""


class ResponseObjects:
    """The paths below `/v1/responses/{response_id}`."""

    def __init__(self) -> None:
        self.key_refusals = KeyRefusals("responses")

    async def handle(self, request: Request, runtime: Runtime) -> Response:
        return await for_team(request, runtime, self.key_refusals, self._forward)

    async def _forward(
        self, request: Request, runtime: Runtime, team: Team, headers: dict[str, str]
    ) -> Response:
        response_id = request.path_params["response_id"]
        row = await runtime.ledger.response(response_id)
        if row is None or row.team != team.name:
            raise NotFound(f"Response with id '{response_id}' not found.")
        query = query_of(request, runtime)
        if request.method == "DELETE" and row.held:
            await self.settle_first(runtime, row.request_id, response_id)
        elif request.method == "DELETE" and row.in_flight:
            # A stream still being read: deleted now, a stream cut after it could not
            # be read back for its usage.
            raise InvalidRequest(
                "This response is still streaming: delete it once its stream has ended "
                "(cancel it first if it runs in the background). Tollgate settles its "
                "cost from the response, which a delete would remove."
            )
        answer = await forward_as_is(request, runtime, query, created_under(runtime, row))
        if path_of(request).endswith("/cancel"):
            runtime.followers.nudge()
        return streamed_response(answer, headers)

    async def settle_first(self, runtime: Runtime, request_id: str, response_id: str) -> None:
        """A held response is read for its usage before it may be deleted: by this process
        when it follows it, else by the one that does (another worker or replica, or the
        next process once one that stopped is adopted), which the ledger says it has done
        once the row is no longer held."""
        followers = runtime.followers
        for _ in range(DELETE_WAIT_POLLS):
            followed = followers.following.get(request_id)
            if followed is None:
                row = await runtime.ledger.response(response_id)
                if row is None or row.request_id != request_id or not row.held:
                    return  # settled
                break  # followed elsewhere: it is settled there once it ends
            if await followed.poll(runtime):
                followers.following.pop(request_id, None)
                return
        raise InvalidRequest(
            "This background response has not ended, or Tollgate has not settled it yet: "
            "cancel it first (POST /v1/responses/{id}/cancel), then delete it (retry "
            "shortly if this persists). Tollgate settles its cost from the response, which "
            "a delete would remove."
        )


class InputTokens:
    """`POST /v1/responses/input_tokens`: free, for the team's own context."""

    def __init__(self) -> None:
        self.key_refusals = KeyRefusals("responses")

    async def handle(self, request: Request, runtime: Runtime) -> Response:
        return await for_team(request, runtime, self.key_refusals, self._count)

    async def _count(
        self, request: Request, runtime: Runtime, team: Team, headers: dict[str, str]
    ) -> Response:
        config = runtime.config
        project = config.project_of(team.name)
        allow_endpoint(team, "responses")
        query = query_of(request, runtime)
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip()
        if media_type.lower() != "application/json":
            raise InvalidRequest(
                "Unsupported content type for /v1/responses/input_tokens: send application/json."
            )
        body = await read_body(request, config.limits.edits_bytes, runtime.bodies)
        count = read_count(json_object(body))
        if count.files:
            await owned_files(runtime, team, count.files)
        if count.previous is not None:
            row = await runtime.ledger.response(count.previous)
            if row is None or row.team != team.name:
                raise PreviousResponseNotFound(
                    f"Previous response with id '{count.previous}' not found.",
                    param="previous_response_id",
                )
            same_project(runtime, row, project, f"Previous response '{count.previous}'")
        answer = await runtime.upstream.send(
            "/responses/input_tokens",
            count.encode(),
            "application/json",
            request.headers.items(),
            method="POST",
            query=query,
            project=project,
        )
        return streamed_response(answer, headers)


async def websocket_refused(request: Request, runtime: Runtime) -> Response:
    """`GET /v1/responses` is the Responses API's WebSocket mode: not supported (yet)."""
    return error_response(WEBSOCKET_REFUSAL)


WEBSOCKET_REFUSAL = InvalidRequest(
    "The Responses API's WebSocket mode is not supported by Tollgate: send "
    "POST /v1/responses (with stream: true for events)."
)
