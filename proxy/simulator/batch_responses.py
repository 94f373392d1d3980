"""A batch line for `/v1/responses`, run as the Responses API would answer it (pure).

A batch for the endpoint `/v1/responses` is read as an image batch is
(`batch_lines.read_input`: one mainline `model` a batch). Each line is then answered as
the same request sent directly (`responses.read_order`, `response_tokens.tokens_of`),
non-streamed: its `response.body` is the Responses object, with `usage` (the mainline
model's tokens) and `tool_usage.image_gen` (the image tool's), status `completed`, or
`incomplete` when `max_output_tokens` cut the answer. Refused as a line error (400):
`stream` and `background` (a batch line is neither), `previous_response_id` (the
simulated batch keeps no responses to continue), and an image tool whose model the Batch
API does not take (`ModelRule.batch`). Fault markers as for image lines (`batch_lines`):
`500`, `503`, `429` answer their error, `timeout` and `reset` a 500, `nousage` drops
`usage` and `tool_usage` (billed); `failed` ends the response `failed` after its image
calls (billed as directly). Its record entry is the direct request's, with `batch_id` and
`custom_id`; `costs` bills it at the batch rate.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.simulator.batch_lines import InputLine
from proxy.simulator.billing import Entry
from proxy.simulator.faults import fault_error, moderation_error, pick_response_fault
from proxy.simulator.refusals import ApiError, invalid
from proxy.simulator.response_answers import Snapshot, Status, response_json
from proxy.simulator.response_tokens import (
    ResponseTokens,
    failed_tokens,
    response_entry,
    tokens_of,
)
from proxy.simulator.responses import ResponseOrder, read_order

REFUSED_IN_BATCH = {
    "stream": "Streaming is not supported in the Batch API.",
    "background": "Background mode is not supported in the Batch API.",
    "previous_response_id": "The simulated Batch API keeps no responses to continue: "
    "'previous_response_id' is not supported in a batch line.",
}


@dataclass(frozen=True)
class ResponseLineResult:
    """What running one `/v1/responses` line gave: a 200 (billed) or an error."""

    line: InputLine
    status: int
    order: ResponseOrder | None = None
    tokens: ResponseTokens | None = None
    error: ApiError | None = None
    with_usage: bool = True
    final: Status = "completed"

    @property
    def billed(self) -> bool:
        return self.tokens is not None

    @property
    def batch_tokens(self) -> tuple[int, int]:
        """(input, output) tokens for the batch's `usage`: the mainline's and the tool's."""
        if self.tokens is None:
            return 0, 0
        main, tool = self.tokens.mainline, self.tokens.image_gen
        return (
            main.input + tool.text_input + tool.image_input,
            main.output + tool.image_output + tool.text_output,
        )

    def body(self, *, created: int, padding: int, request_id: str) -> dict[str, Any]:
        """The line's `response.body`: the Responses object, or its error body."""
        if self.order is None or self.tokens is None:
            assert self.error is not None
            return self.error.body()
        snap = Snapshot(
            f"resp_{uuid.uuid4().hex}",
            self.order,
            self.tokens,
            created,
            self.final,
            padding,
            self.with_usage,
        )
        return response_json(snap)

    def entry(
        self,
        request_id: str,
        booked: float,
        batch_id: str,
        authorization: str | None,
        headers: Mapping[str, str],
    ) -> Entry:
        """The line's record entry, as its direct request's, booked when the batch ended."""
        return response_entry(
            request_id,
            booked,
            self.line.raw.fields,
            self.order,
            self.tokens,
            status=self.status,
            stream=False,
            authorization=authorization,
            headers=headers,
            batch_id=batch_id,
            custom_id=self.line.custom_id,
        )


def run_response_line(line: InputLine) -> ResponseLineResult:
    """The line answered as the Responses API would answer it, sent directly."""
    order = None
    fields = line.raw.fields
    try:
        for name, message in REFUSED_IN_BATCH.items():
            if fields.get(name):
                raise invalid(message, param=name)
        order = read_order(dict(fields))
        if order.tool is not None and not order.tool.model.batch:
            raise invalid(
                f"The model '{order.tool.model.name}' is not supported by the Batch API.",
                param="tools.model",
            )
        fault = pick_response_fault(order.prompt, None)
        if fault in ("timeout", "reset"):
            fault = "500"
        error = (fault_error(fault) if fault else None) or moderation_error(order.prompt)
        if error is not None:
            raise error
    except ApiError as error:
        return ResponseLineResult(line, error.status, order, error=error)
    tokens = tokens_of(order)
    final: Status = "incomplete" if tokens.incomplete else "completed"
    if fault == "failed":
        tokens, final = failed_tokens(tokens), "failed"
    return ResponseLineResult(line, 200, order, tokens, with_usage=fault != "nousage", final=final)
