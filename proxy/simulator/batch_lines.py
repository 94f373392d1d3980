"""A batch's input file read into lines, and each line run as the Images API would answer
it (pure).

OpenAI checks a batch's file while the batch is `validating`, and fails the whole batch
(status `failed`, every problem in `errors.data` with its 1-based `line`) when:
    empty_file            the file has no line
    too_many_tasks        more than 50,000 lines
    invalid_json_line     a line is not a JSON object
    missing_required_parameter   a line lacks `custom_id`, `method`, `url` or `body`
    invalid_request       `method` is not POST, or `body` is not an object
    duplicate_custom_id   a `custom_id` seen on an earlier line
    url_mismatch          a line's `url` is not the batch's endpoint
    model_mismatch        a line's model differs from the first line's (one model a batch)
    unsupported_model     the model is one the Batch API does not accept: DALL·E and
                          gpt-image-2.6-* (`ModelRule.batch`); a line without `model`
                          gets the endpoint's default, as the Images API would
A line that passes is run: validated exactly as the same request sent directly
(`validation.validate`, plus `stream` refused), its prompt's fault marker played, and
moderated. It answers 200 with the Images API's body (with `usage`), or the error the
direct request would get, as the line's `response` (`status_code`, `body`).

Fault markers in a batch: `[[fault:500]]`, `[[fault:503]]`, `[[fault:429]]`,
`[[fault:quota]]` and `[[fault:403]]` answer their error (not billed), `timeout` and
`reset` a 500 (a batch has no connection to hang or cut); `nousage` and `texttokens`
change the body as they do directly (billed); `garbage`, `truncate` and `echo` change
nothing. The configured fault does not apply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from proxy.core.models import Endpoint
from proxy.simulator.answers import response_body
from proxy.simulator.catalogue import DEFAULT_MODELS, MODELS
from proxy.simulator.faults import (
    Fault,
    fault_error,
    moderation_error,
    pick_fault,
)
from proxy.simulator.forms import RawRequest
from proxy.simulator.refusals import ApiError, invalid
from proxy.simulator.tokens import Tokens, played_tokens
from proxy.simulator.validation import ImageOrder, validate

MAX_LINES = 50_000
BATCH_ENDPOINTS: Mapping[str, Endpoint] = MappingProxyType(
    {
        "/v1/images/generations": "generations",
        "/v1/images/edits": "edits",
        "/v1/responses": "responses",
    }
)
# What OpenAI's Batch API accepts, though the simulator runs only image and Responses
# batches (`batch_responses`).
OPENAI_BATCH_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
)


@dataclass(frozen=True)
class LineProblem:
    """Why a batch failed validation, at one line (1-based; None: the whole file)."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "line": self.line, "param": self.param}


@dataclass(frozen=True)
class InputLine:
    """One valid-looking line: its `custom_id` and its body as a JSON image request."""

    custom_id: str
    raw: RawRequest


@dataclass(frozen=True)
class BatchInput:
    """A file that passed validation: its lines, in order, and the batch's model."""

    model: str
    lines: tuple[InputLine, ...]


@dataclass(frozen=True)
class LineResult:
    """What running one line gave: a 200 with its order and tokens (billed), or an error."""

    line: InputLine
    status: int
    order: ImageOrder | None = None
    tokens: Tokens | None = None
    error: ApiError | None = None
    with_usage: bool = True

    @property
    def billed(self) -> bool:
        return self.tokens is not None

    @property
    def batch_tokens(self) -> tuple[int, int]:
        """(input, output) tokens for the batch's `usage`."""
        if self.tokens is None:
            return 0, 0
        return self.tokens.input_total, self.tokens.output_total + self.tokens.text_output

    def body(self, *, created: int, padding: int, request_id: str) -> dict[str, Any]:
        """The line's `response.body`: the Images API's answer, or its error body."""
        if self.order is None or self.tokens is None:
            assert self.error is not None
            return self.error.body()
        return response_body(
            self.order,
            self.tokens,
            created=created,
            padding=padding,
            request_id=request_id,
            with_usage=self.with_usage,
        )


def _line_model(endpoint: Endpoint, body: Mapping[str, Any]) -> object:
    model = body.get("model")
    if endpoint == "responses":
        return "" if model is None else model  # required: the line is refused without it
    return DEFAULT_MODELS[endpoint] if model is None else model


def _read_line(number: int, text: str, url: str) -> tuple[str, dict[str, Any]] | LineProblem:
    """A line's `custom_id` and `body`, or the problem that fails the batch."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return LineProblem("invalid_json_line", "This line is not parseable as valid JSON.", number)
    for name in ("custom_id", "method", "url", "body"):
        if data.get(name) is None:
            return LineProblem(
                "missing_required_parameter",
                f"Missing required parameter: '{name}'.",
                number,
                name,
            )
    custom_id, body = data["custom_id"], data["body"]
    if not isinstance(custom_id, str) or not custom_id:
        return LineProblem("invalid_request", "'custom_id' must be a string.", number, "custom_id")
    if data["method"] != "POST":
        message = "The only method supported is 'POST'."
        return LineProblem("invalid_request", message, number, "method")
    if not isinstance(body, dict):
        return LineProblem("invalid_request", "'body' must be a JSON object.", number, "body")
    if data["url"] != url:
        return LineProblem(
            "url_mismatch",
            f"The URL provided for this request does not match the batch endpoint '{url}'.",
            number,
            "url",
        )
    return custom_id, body


def read_input(content: bytes, url: str) -> BatchInput | list[LineProblem]:
    """The lines of a batch's file for the endpoint `url`, or every problem that fails it."""
    endpoint = BATCH_ENDPOINTS[url]
    texts = [t for t in content.decode("utf-8", errors="replace").splitlines() if t.strip()]
    if not texts:
        return [LineProblem("empty_file", "The batch input file is empty.")]
    if len(texts) > MAX_LINES:
        return [
            LineProblem(
                "too_many_tasks",
                f"The batch input file has {len(texts)} requests; the maximum is {MAX_LINES}.",
            )
        ]
    problems: list[LineProblem] = []
    lines: list[InputLine] = []
    seen: set[str] = set()
    model: object = None
    for number, text in enumerate(texts, start=1):
        read = _read_line(number, text, url)
        if isinstance(read, LineProblem):
            problems.append(read)
            continue
        custom_id, body = read
        if custom_id in seen:
            problems.append(
                LineProblem(
                    "duplicate_custom_id",
                    f"The custom_id '{custom_id}' is used more than once in this batch.",
                    number,
                    "custom_id",
                )
            )
            continue
        seen.add(custom_id)
        this_model = _line_model(endpoint, body)
        if model is None:
            model = this_model
            problems.extend(_model_problems(this_model, number))
        elif this_model != model:
            problems.append(
                LineProblem(
                    "model_mismatch",
                    f"The model '{this_model}' does not match the model '{model}' of the "
                    "batch's other requests: a batch may use one model only.",
                    number,
                    "body.model",
                )
            )
        lines.append(InputLine(custom_id, RawRequest(endpoint, "json", body)))
    if problems:
        return problems
    return BatchInput(str(model), tuple(lines))


def _model_problems(model: object, number: int) -> list[LineProblem]:
    rule = MODELS.get(model) if isinstance(model, str) else None
    if rule is None or rule.batch:
        # An unknown model is the Images API's to refuse, line by line.
        return []
    return [
        LineProblem(
            "unsupported_model",
            f"The model '{model}' is not supported by the Batch API.",
            number,
            "body.model",
        )
    ]


def _batch_fault_error(fault: Fault | None) -> ApiError | None:
    if fault in ("timeout", "reset"):
        return fault_error("500")
    return fault_error(fault) if fault else None


def run_line(line: InputLine) -> LineResult:
    """The line answered as the Images API would answer it, sent directly."""
    order = None
    try:
        if line.raw.fields.get("stream"):
            raise invalid("Streaming is not supported in the Batch API.", param="stream")
        order = validate(line.raw)
        fault = pick_fault(order.prompt, None)
        error = _batch_fault_error(fault) or moderation_error(order.prompt)
        if error is not None:
            raise error
    except ApiError as error:
        return LineResult(line, error.status, order, error=error)
    tokens = played_tokens(order, fault)
    return LineResult(line, 200, order, tokens, with_usage=fault != "nousage")
