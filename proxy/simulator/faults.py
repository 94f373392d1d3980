"""Faults the simulator can play, chosen by a prompt marker or the runtime config (pure).

    [[fault:500]]       500 server_error
    [[fault:503]]       503 server overloaded
    [[fault:429]]       429 rate_limit_exceeded with retry-after: 1 (and the
                        `x-ratelimit-*` headers that say the minute's room is used)
    [[fault:quota]]     429 insufficient_quota (`credit_balance_exhausted`): the
                        organization is out of credit; OpenAI sends no retry advice
    [[fault:403]]       403 unsupported_country_region_territory
    [[fault:timeout]]   no answer for an hour (ends when the client goes away)
    [[fault:reset]]     the connection is closed without an HTTP answer
    [[fault:garbage]]   200 with a body that is not JSON (billed); in a stream, the last
                        completed event's data
    [[fault:nousage]]   200 without `usage` (billed)
    [[fault:truncate]]  a stream cut before its completed event (billed)
    [[fault:dropcompleted]] a stream of several images ends cleanly without its last
                        image's completed event (billed for every image): OpenAI does not
                        document how many completed events a stream of `n` > 1 sends
    [[fault:texttokens]] usage reports `TEXT_OUTPUT_TOKENS` text output tokens too (in
                        `output_tokens_details`, and in the first completed event of a
                        stream), whatever the model
    [[fault:textnodetails]] usage reports `UNDETAILED_TEXT_TOKENS` text output tokens per
                        image (billed as text output) within `output_tokens`, without
                        `output_tokens_details`: as the Images API's stream events,
                        whose schema has none, and its answers seen without them report
                        them; whatever the model
    [[fault:echo]]      answers as usual (billed) but echoes the `Authorization` header
                        it received, as a debugging proxy might: in an
                        `x-echo-authorization` header and in an `echo` field
                        (`authorization`, and `authorization_b64` base64-encoded) of the
                        JSON body, of every stream event (each sent in two writes split
                        inside the echoed key) and of error bodies. Set at run time
                        (`POST /_sim/config {"fault": "echo"}`), it also echoes in 401
                        answers (given before the prompt is read) and `GET /v1/models`.

    [[fault:failed]]    (Responses only) the response fails after its image calls: its
                        stream ends with `response.failed`, a non-stream answer is a 200
                        `status: "failed"` response; billed for the images and the
                        mainline input (the answer text is never written)
    [[fault:zerotool]]  (Responses only) `tool_usage.image_gen` reports zero counts though
                        the image calls completed, as OpenAI's does when their usage records
                        are missing ("calls with missing or incomplete usage records may be
                        skipped"); billed for the images all the same
    [[fault:skipcall]]  (Responses only) `tool_usage.image_gen` leaves out the last image
                        call's tokens (its usage record missing) while the others are
                        counted: a sum that looks plausible; billed for every image

On the Responses API (`POST /v1/responses`) the faults play as on the Images API, but
for `texttokens`, `textnodetails` and `echo`, which change nothing there.

A prompt containing the word `forbidden` is blocked by moderation (400, not billed).
"""

from __future__ import annotations

import base64
import re
from typing import Literal, get_args

from proxy.simulator.refusals import ApiError

Fault = Literal[
    "500",
    "503",
    "429",
    "quota",
    "403",
    "timeout",
    "reset",
    "garbage",
    "nousage",
    "truncate",
    "dropcompleted",
    "texttokens",
    "textnodetails",
    "echo",
]
FAULTS: tuple[Fault, ...] = get_args(Fault)
# Faults answered before any work is done: nothing is billed.
UNBILLED_FAULTS: frozenset[Fault] = frozenset(
    {"500", "503", "429", "quota", "403", "timeout", "reset"}
)
_MARKER = re.compile(r"\[\[fault:([a-z0-9]+)\]\]")
_FORBIDDEN = re.compile(r"\bforbidden\b", re.IGNORECASE)
GARBAGE_BODY = b"this is not json{"
TIMEOUT_SECONDS = 3600.0
TEXT_OUTPUT_TOKENS = 150
UNDETAILED_TEXT_TOKENS = 1000
"""The most text output Tollgate's price book reserves for one gpt-image-1.5 image."""
ECHO_HEADER = "x-echo-authorization"


def parse_fault(value: object) -> Fault | None:
    """A fault name from the runtime config (None clears it); raises ValueError otherwise."""
    if value is None:
        return None
    text = str(value)
    for fault in FAULTS:
        if fault == text:
            return fault
    raise ValueError(f"unknown fault {text!r}; expected one of {', '.join(FAULTS)} or null")


def pick_fault(prompt: str, configured: Fault | None) -> Fault | None:
    """The fault a request plays: its prompt marker first, else the configured one."""
    for match in _MARKER.finditer(prompt):
        if match[1] in FAULTS:
            return parse_fault(match[1])
    return configured


ResponseFault = Fault | Literal["failed", "zerotool", "skipcall"]


def pick_response_fault(prompt: str, configured: Fault | None) -> ResponseFault | None:
    """The fault a Responses request plays: `pick_fault`'s, or `failed`, `zerotool` or
    `skipcall` by its marker."""
    for match in _MARKER.finditer(prompt):
        if match[1] == "failed":
            return "failed"
        if match[1] == "zerotool":
            return "zerotool"
        if match[1] == "skipcall":
            return "skipcall"
        if match[1] in FAULTS:
            return parse_fault(match[1])
    return configured


def fault_error(fault: ResponseFault) -> ApiError | None:
    """The error answer of a fault that is answered with one."""
    if fault == "500":
        return ApiError(
            500,
            "The server had an error while processing your request. Sorry about that!",
            type="server_error",
        )
    if fault == "503":
        return ApiError(
            503,
            "The engine is currently overloaded, please try again later.",
            type="server_error",
        )
    if fault == "429":
        return ApiError(
            429,
            "Rate limit reached for images per minute. Please try again in 1s.",
            type="requests",
            code="rate_limit_exceeded",
            headers={
                "retry-after": "1",
                "x-ratelimit-limit-requests": "5",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "1s",
            },
        )
    if fault == "quota":
        return ApiError(
            429,
            "You exceeded your current quota, please check your plan and billing details.",
            type="insufficient_quota",
            code="credit_balance_exhausted",
        )
    if fault == "403":
        return ApiError(
            403,
            "Country, region, or territory not supported",
            type="request_forbidden",
            code="unsupported_country_region_territory",
        )
    return None


def echo(authorization: str | None) -> dict[str, str]:
    """The `echo` field of the echo fault: the Authorization header as received."""
    value = authorization or ""
    return {
        "authorization": value,
        "authorization_b64": base64.b64encode(value.encode()).decode("ascii"),
    }


def echoed(error: ApiError, authorization: str | None) -> ApiError:
    """`error` with the echo fault's header and `echo` field."""
    return ApiError(
        error.status,
        error.message,
        type=error.type,
        param=error.param,
        code=error.code,
        extra={**error.extra, "echo": echo(authorization)},
        headers={**error.headers, ECHO_HEADER: authorization or ""},
    )


def moderation_error(prompt: str) -> ApiError | None:
    """The safety system's answer to a prompt with the trigger word, else None."""
    if not _FORBIDDEN.search(prompt):
        return None
    return ApiError(
        400,
        "Your request was rejected by the safety system. If you believe this is an error, "
        "contact us at help.openai.com.",
        type="image_generation_user_error",
        code="moderation_blocked",
        extra={"moderation_details": {"moderation_stage": "input", "categories": ["violence"]}},
    )
