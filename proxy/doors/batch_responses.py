"""A batch file's `/v1/responses` line: checked, bounded and written out again as the
Responses door does a direct `POST /v1/responses` (pure).

The line's body goes through `ResponsesDoor.parse` and `ResponsesDoor.admit` (every check
and the bound of the direct door, the team's `responses:` caps written in, `service_tier`
sent as `default`), priced at the Batch API's rates of both its mainline model and its
image tool's model (`admit(batch=True)`: a model the price book gives no batch rates is
refused), and is forwarded as `ResponsesDoor.encode` writes it. Refused besides, as what
cannot run unattended in a batch or cannot be bounded there:
    stream, background     a batch line is answered once, whole, in the output file
    previous_response_id   the response it continues is read from OpenAI's store when the
                           line runs, hours later, and may be gone or changed; its tokens,
                           billed again as input, are not bounded at upload
and, as for image lines, a line the team's `allow` policy would change (a quality above
`allow.max_quality`): a batch line is never changed.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.core.budgets import Variant, allow_endpoint
from proxy.core.errors import InvalidRequest
from proxy.core.settings import Config, Team
from proxy.doors.responses import ResponseBody, ResponsesDoor

DOOR = ResponsesDoor()
NOT_IN_A_BATCH = {
    "stream": "'stream' cannot be used in a batch: a batch line is answered whole, in the "
    "batch's output file",
    "background": "'background' cannot be used in a batch: a batch line already runs in "
    "the background",
    "previous_response_id": "'previous_response_id' cannot be used in a batch: the response "
    "it continues is read from OpenAI's store when the line runs, and Tollgate cannot bound "
    "its tokens at upload. Send the conversation's items in 'input' instead",
}

FLAGS = frozenset({"stream", "background"})
"""The parameters of `NOT_IN_A_BATCH` a line may still give as `false`."""


def response_line(
    team: Team, config: Config, body: dict[str, Any]
) -> tuple[ResponseBody, Variant, bytes]:
    """(the body as parsed, its variant bounded at batch rates, the body to forward) for a
    `/v1/responses` line's `body`; a RequestError when it is refused."""
    for name, reason in NOT_IN_A_BATCH.items():
        # Absent or null, or `false` for a flag: not `0`, which equals False in Python and
        # would be forwarded as given.
        value = body.get(name)
        if value is not None and not (value is False and name in FLAGS):
            raise InvalidRequest(reason, param=name)
    allow_endpoint(team, "responses")
    raw = json.dumps(body, separators=(",", ":")).encode()
    parsed = DOOR.parse("application/json", raw, config, team)
    variant = DOOR.admit(team, parsed, config, batch=True)
    if variant.changes:
        change = variant.changes[0]
        raise InvalidRequest(
            f"{change.knob} {change.before} is above what team {team.name} may request "
            f"({change.knob}={change.after} at most): a batch line is not changed"
        )
    sent, _ = DOOR.encode(parsed, variant)
    return parsed, variant, sent
