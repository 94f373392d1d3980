"""What a forwarded request costs once its exchange is over (pure).

Every way an exchange can end is priced here, from what was reserved (the `Bound`)
and what was seen of the answer:

    answered     a 2xx answer, metered: its usage at the model's rates (flagged
                 `usage_over_bound` when that passes the bound); without usage, the bound
                 (flagged); per-image models at their per-image price (flagged)
    refused      an error answer from the upstream: nothing is billed
    unknown      the answer broke off, was unreadable or outlived its deadline: the
                 upstream may have billed, so the bound is charged, flagged (or what the
                 part that was read reported, when that costs more)
    not_answered the upstream never answered: the bound (flagged) when the request may
                 have reached it, else nothing
    stream_ended a stream's end (completed, errored, cut short) as one of the above

Charging the bound when the outcome is unknown keeps the promise that settled spend
never falls below what the upstream billed: an operator resolves a flagged row
(`tollgate ledger resolve`) once the bill says what it really was.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from proxy.core.budgets import Variant
from proxy.core.errors import RequestError, UpstreamFailure
from proxy.core.models import Charge, Usage
from proxy.core.pricing import MainlinePrices, ModelPrices

STREAM_TRUNCATED = "stream_truncated"
MALFORMED_ANSWER = "malformed_answer"
ANSWER_NOT_HELD = "answer_not_held"
"""A whole 2xx answer Tollgate had no memory or disk to hold while it metered it."""
OVER_BOUND = "usage_over_bound"
IMAGES_MISSING = "stream_images_missing"
"""A stream that ended cleanly with fewer completed images than it asked for."""
ROUNDING_NANOS = 2
"""How far a charge may pass its bound by rounding alone: a Responses request's two parts
are each rounded up once when charged, its bound once over both."""


@dataclass(frozen=True, slots=True)
class Bound:
    """What a request was reserved at: the upper bound of its cost and the usage behind it."""

    model: ModelPrices
    n: int
    quality: str
    size: str
    cost_nanos: int
    usage: Usage
    mainline: MainlinePrices | None = None
    """The Responses API's mainline model: its tokens are priced at its own rates."""
    mainline_nanos: int = 0
    """The part of `cost_nanos` that is the mainline model's."""
    repriced: bool = False
    """Rebuilt from a held reservation by a process that adopted it: its models' prices are
    the book's now, which a reload or a restart may have raised since it was reserved. It
    is then charged no more than it was reserved at (capped, flagged): what was priced and
    reserved is what it may settle at, whatever the book says later."""

    @classmethod
    def of(cls, sent: Variant, mainline: MainlinePrices | None = None) -> Bound:
        """The bound of the variant that is forwarded (`mainline`: a Responses request's
        mainline model, whose bound is the variant's `base`)."""
        request = sent.request
        return cls(
            sent.model,
            request.n,
            request.quality,
            request.size,
            sent.estimate.cost_nanos,
            sent.estimate.usage,
            mainline,
            sent.base.cost_nanos,
        )

    def charged(self) -> Charge:
        """The bound as a charge: its cost and usage (so token budgets keep counting it),
        flagged for reconciliation."""
        return Charge(
            replace(self.usage, images=self.n), self.cost_nanos, True, self.mainline_nanos
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """How an exchange is settled: its outcome, what it is charged, and why."""

    outcome: Literal["ok", "upstream_error"]
    charge: Charge
    error_code: str | None = None

    @property
    def cost_nanos(self) -> int:
        return self.charge.cost_nanos


NOTHING = Charge(Usage(), 0)
MOST_BELIEVED_NANOS = 100_000 * 10**9
"""The most one request's reported usage is believed to cost ($100,000): an answer whose
usage prices above it is charged its bound, flagged, as one without usage is. No image
request costs that much, and sums of such answers would overflow the ledger's integers."""


Call = tuple[str, str]
"""A Responses API image call that completed: the `quality` and `size` its item names."""


def answered(
    bound: Bound, usage: Usage | None, images: int, calls: tuple[Call, ...] = ()
) -> Verdict:
    """A 2xx answer carrying `usage` (None: it had none) and `images` images (a Responses
    API answer: its completed image `calls`)."""
    if bound.mainline is not None:
        return _response_answered(bound, bound.mainline, usage, images, calls)
    count = images or bound.n
    model = bound.model
    if model.per_image_billing:
        return Verdict("ok", model.per_image_charge(bound.quality, bound.size, count))
    if usage is None:
        # A successful answer without usage: charge the bound, flag for reconciliation.
        return Verdict("ok", Charge(Usage(images=count), bound.cost_nanos, flagged=True))
    return as_read(bound, model.charge(replace(usage, images=count)))


def as_read(bound: Bound, charge: Charge) -> Verdict:
    """An answer metered at `charge`, charged as it reads (`believed`), but flagged
    `usage_over_bound` when that costs more than its bound: the upstream billed beyond what
    was priced and reserved (a price book or token rule behind OpenAI's, or an upstream that
    misreports), which settled spend should never show unnoticed. What it billed is what it
    billed: the row records it, and `tollgate ledger flagged` lists it."""
    charge = believed(bound, charge)
    if charge.flagged or charge.cost_nanos <= bound.cost_nanos + ROUNDING_NANOS:
        return Verdict("ok", charge)
    return Verdict("ok", replace(charge, flagged=True), OVER_BOUND)


def believed(bound: Bound, charge: Charge) -> Charge:
    """`charge`, unless it costs more than usage can be believed to: then the bound, flagged.
    A repriced bound's charge is capped at its cost (`Bound.repriced`)."""
    if charge.cost_nanos > MOST_BELIEVED_NANOS:
        return bound.charged()
    if bound.repriced and charge.cost_nanos > bound.cost_nanos:
        mainline = min(charge.mainline_nanos, bound.cost_nanos)
        return Charge(charge.usage, bound.cost_nanos, True, mainline)
    return charge


def dearer(bound: Bound, seen: Charge | None) -> Charge:
    """The bound or what was `seen` of an answer, whichever costs more, flagged: an answer
    whose billing is uncertain is never charged less than the part of it that was read."""
    charged = bound.charged()
    if seen is None or seen.cost_nanos <= charged.cost_nanos:
        return charged
    return replace(believed(bound, seen), flagged=True)


def _response_answered(
    bound: Bound,
    mainline: MainlinePrices,
    usage: Usage | None,
    images: int,
    calls: tuple[Call, ...] = (),
) -> Verdict:
    """A Responses API answer: its mainline tokens at the mainline model's rates, its image
    tool's at the image model's. Without usage (or with images but no `tool_usage`, which
    the meter reports as None), or with fewer image output tokens than its completed
    `calls` bill at the least (`least_image_output`): the bound, flagged."""
    if usage is None or image_output_short(bound.model, usage, calls):
        return Verdict("ok", bound.charged())
    lines = replace(
        usage, mainline_input=0, mainline_cached_input=0, mainline_output=0, mainline_cache_write=0
    )
    tool = bound.model.charge(replace(lines, images=images))
    text = mainline.cost(usage)
    merged = replace(
        tool.usage,
        mainline_input=usage.mainline_input,
        mainline_cached_input=usage.mainline_cached_input,
        mainline_output=usage.mainline_output,
        mainline_cache_write=usage.mainline_cache_write,
    )
    charge = Charge(merged, tool.cost_nanos + text, tool.flagged, text)
    return as_read(bound, charge)


def image_output_short(model: ModelPrices, usage: Usage, calls: tuple[Call, ...]) -> bool:
    """Whether the image tool's usage reports fewer image output tokens than its completed
    `calls` bill at the least (each call's `ModelPrices.least_output_tokens`): OpenAI's
    `tool_usage.image_gen` "may skip calls with missing or incomplete usage records", and
    a sum that leaves out one call of several still looks plausible. Image output tokens
    are counted with those of no kind (a usage without details)."""
    if not calls:
        return False
    reported = usage.image_output + usage.unclassified_output
    return reported < sum(model.least_output_tokens(quality, size) for quality, size in calls)


def refused(error_code: str | None) -> Verdict:
    """An error answer of the upstream's own: it billed nothing."""
    return Verdict("upstream_error", NOTHING, error_code)


def unknown(bound: Bound, error_code: str, seen: Charge | None = None) -> Verdict:
    """The upstream may have billed, and what is unknown: the bound, flagged (or what the
    part of the answer that was read reported, `seen`, when that costs more)."""
    return Verdict("upstream_error", dearer(bound, seen), error_code)


def not_answered(bound: Bound, failure: RequestError) -> Verdict:
    """No answer came: the bound when the request may have reached the upstream (which
    bills what it accepted, answer or not), else nothing."""
    if isinstance(failure, UpstreamFailure):
        if failure.maybe_billed:
            return unknown(bound, failure.ledger_code)
        return refused(failure.ledger_code)
    return refused(failure.code)


@dataclass(frozen=True, slots=True)
class Metered:
    """What a whole 2xx answer was read to hold."""

    usage: Usage | None
    """None when it carried none."""
    images: int
    response_id: str | None = None
    """A Responses API answer's response id."""
    pending: bool = False
    """A background response that has not ended: it is settled when it does."""
    status: str | None = None
    """A Responses API answer's `status` (`completed`, `incomplete`, `failed`, …)."""
    calls: tuple[Call, ...] = ()
    """A Responses API answer's completed image calls."""
    ran: bool = False
    """A Responses API answer lists an image call, completed or not: the image tool ran."""


UNBILLED_ENDS = frozenset({"failed", "cancelled"})
"""Responses that may end without usage (`metered` says what each then costs)."""
KNOWN_STATUSES = frozenset({"completed", "incomplete", "queued", "in_progress", *UNBILLED_ENDS})
"""The statuses OpenAI documents for a response: the ends above, `completed` and
`incomplete`, and the pending `queued` and `in_progress`."""
STATUS_UNKNOWN = "response_status_unknown"


def metered(bound: Bound, found: Metered, partials: int = 0) -> Verdict:
    """A whole 2xx answer as metered. A Responses API response that failed or was
    cancelled is charged its usage if it reports one. Without usage, a failed one is
    charged nothing (an upstream error), unless images were made (completed, begun, or
    `partials` streamed): then the image tool ran and billed, at a cost unknown, so its bound,
    flagged. A cancelled one without usage is charged its bound, flagged, whatever was
    seen of it: OpenAI bills what a response read and wrote before its cancel, and
    whether it had begun is unknown (a team polling its own response can cancel it the
    moment it runs, between two of Tollgate's polls).
    A response in a status OpenAI does not document may still run and bill: its bound,
    flagged (or its usage when that costs more), never what it reports so far."""
    if found.status is not None and found.status not in KNOWN_STATUSES:
        seen = None
        if found.usage is not None:
            seen = answered(bound, found.usage, found.images, found.calls).charge
        return unknown(bound, STATUS_UNKNOWN, seen)
    if found.status in UNBILLED_ENDS:
        if found.usage is None:
            if found.images or found.ran or partials or found.status == "cancelled":
                return unknown(bound, f"response_{found.status}")
            return refused(f"response_{found.status}")
        charge = answered(bound, found.usage, found.images, found.calls).charge
        return Verdict("upstream_error", charge, f"response_{found.status}")
    return answered(bound, found.usage, found.images, found.calls)


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """What was seen of a stream when it ended."""

    completed: int
    """Images whose completion event (with its usage) arrived."""
    usage: Usage | None
    """The usage of those completion events, summed (a Responses stream: its terminal
    event's, None when it had none)."""
    error: Any = None
    """The `error` object of an error event, if one came."""
    unreadable: int = 0
    """Events that could not be read: each may have been a billed image."""
    broken: str | None = None
    """The ledger code of how the stream broke off, if it did (else it ended cleanly)."""
    terminal: bool = False
    """A Responses stream: its terminal event (`response.completed`, `.failed` or
    `.incomplete`) arrived."""
    response_id: str | None = None
    """A Responses stream: the id its `response.created` event gave."""
    status: str | None = None
    """A Responses stream: the status its terminal event gave."""
    unmetered: int = 0
    """Completion events that carried no usage that can be believed: what they billed is
    unknown."""
    partials: int = 0
    """Partial images that arrived: the upstream was rendering (and billing)."""
    calls: tuple[Call, ...] = ()
    """A Responses stream: the completed image calls its terminal event listed."""
    ran: bool = False
    """A Responses stream: its terminal event listed an image call, completed or not."""


def stream_ended(bound: Bound, end: StreamEnd) -> Verdict:
    """A stream is settled from its completion events only when it ended cleanly with every
    event read and every completion's usage believed; an error before any image (whole or
    partial) bills nothing; anything else was cut short and may have been billed: the
    bound, or what its completion events reported when that costs more. A Responses stream
    is settled from its one terminal event, else likewise (its mainline model may have run
    whatever the error)."""
    if bound.mainline is not None:
        if end.broken is None and end.terminal and not end.unreadable:
            found = Metered(
                end.usage, end.completed, status=end.status, calls=end.calls, ran=end.ran
            )
            return metered(bound, found, end.partials)
        code = end.broken or (
            MALFORMED_ANSWER if end.unreadable else error_code_of(end.error) or STREAM_TRUNCATED
        )
        seen = None
        if end.usage is not None:
            found = Metered(
                end.usage, end.completed, status=end.status, calls=end.calls, ran=end.ran
            )
            seen = metered(bound, found).charge
        return unknown(bound, code, seen)
    seen = answered(bound, end.usage, end.completed).charge if end.usage is not None else None
    if end.broken is None and end.completed and end.error is None and not end.unreadable:
        if end.unmetered:
            return Verdict("ok", dearer(bound, seen))
        if end.completed < bound.n:
            # Each completed event carries one image: the others never came, and whether
            # the upstream billed them (it bills the images it renders) is unknown.
            return Verdict("ok", dearer(bound, seen), IMAGES_MISSING)
        return answered(bound, end.usage, end.completed)
    if end.error is not None and not (end.completed or end.partials or end.unreadable):
        return refused(error_code_of(end.error))
    code = end.broken or (MALFORMED_ANSWER if end.unreadable else STREAM_TRUNCATED)
    return unknown(bound, code, seen if end.completed else None)


def error_code(body: bytes) -> str | None:
    """The `error.code` (else `error.type`) of an upstream error answer, if it has one."""
    try:
        return error_code_of(json.loads(body).get("error"))
    except (ValueError, AttributeError):
        return None


PLAIN_CODE = re.compile(r"[A-Za-z0-9_.:-]{1,64}", re.ASCII)
"""What an error code kept in the ledger may look like: never free text, which may quote
a piece of the company key (`sk-pro***kb0A`)."""


def error_code_of(error: Any) -> str | None:
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        if code is None:
            return None
        return str(code) if PLAIN_CODE.fullmatch(str(code)) else "unreadable_code"
    return None
