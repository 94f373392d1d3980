"""The vocabulary that crosses module boundaries: small frozen values.

Money is carried as integer nano-dollars (1 USD = 10**9) so that sums are exact
everywhere, in Python and in SQL; `usd()` turns it into a Decimal for display.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from typing import Literal

ImagesEndpoint = Literal["generations", "edits", "variations"]
IMAGES_ENDPOINTS: tuple[ImagesEndpoint, ...] = ("generations", "edits", "variations")
Endpoint = Literal["generations", "edits", "variations", "responses", "batches"]
ENDPOINTS: tuple[Endpoint, ...] = ("generations", "edits", "variations", "responses", "batches")

Outcome = Literal[
    "ok",
    "downgraded",
    "replayed",
    "rejected_budget",
    "rejected_policy",
    "rejected_rate",
    "upstream_error",
    "client_error",
]

TokenKind = Literal[
    "text_input",
    "cached_text_input",
    "image_input",
    "cached_image_input",
    "image_output",
    "text_output",
]
TOKEN_KINDS: tuple[TokenKind, ...] = (
    "text_input",
    "cached_text_input",
    "image_input",
    "cached_image_input",
    "image_output",
    "text_output",
)

INPUT_KINDS: tuple[TokenKind, ...] = (
    "text_input",
    "cached_text_input",
    "image_input",
    "cached_image_input",
)
OUTPUT_KINDS: tuple[TokenKind, ...] = ("image_output", "text_output")

NANOS_PER_USD = 10**9

Period = Literal["day", "week", "month", "total"]
PERIODS: tuple[Period, ...] = ("day", "week", "month", "total")
Scope = Literal["organization", "team", "user"]


def usd(nanos: int) -> Decimal:
    """Nano-dollars as a Decimal number of dollars: `usd(210_720_000) == Decimal('0.21072')`."""
    return Decimal(usd_text(nanos))


def usd_text(nanos: int) -> str:
    """Nano-dollars as a plain decimal string for headers and reports (`"0.21072"`): no
    trailing zeros, never exponent notation. Integer arithmetic: a request writes several
    (headers, the log line), and Decimal's formatting takes twice as long."""
    whole, fraction = divmod(abs(nanos), NANOS_PER_USD)
    sign = "-" if nanos < 0 else ""
    if fraction == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:09d}".rstrip("0")


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of each billed kind, as OpenAI reports them (or as estimated)."""

    text_input: int = 0
    cached_text_input: int = 0
    image_input: int = 0
    cached_image_input: int = 0
    image_output: int = 0
    text_output: int = 0
    images: int = 0
    unclassified_input: int = 0
    unclassified_output: int = 0
    """Tokens OpenAI reported that no known kind accounts for: a detail Tollgate does not
    know (a future `audio_tokens`), or a total above the sum of its details. Priced at the
    model's dearest input or output rate (fail closed), never stored as such: pricing folds
    them into that kind before the ledger sees them."""
    mainline_input: int = 0
    mainline_cached_input: int = 0
    mainline_output: int = 0
    """The Responses API's mainline model (top-level `usage`): uncached input, cached
    input, and output (reasoning included). Priced at the mainline model's rates, never
    the image model's; the kinds above are the image tool's (`tool_usage.image_gen`)."""
    mainline_cache_write: int = 0
    """Of `mainline_input`, the tokens OpenAI wrote to the prompt cache
    (`input_tokens_details.cache_write_tokens`): from gpt-5.6 on, each costs the mainline
    model's `cache_write_input` rate instead of `text_input`. Counted again in no total and
    never stored: its premium is in the cost the ledger records."""

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scaled(self, n: int) -> Usage:
        return Usage(*(getattr(self, f.name) * n for f in fields(self)))

    def as_bound(self) -> Usage:
        """A reserved bound's usage as the ledger gives it back, to be priced again: every
        mainline input token counted as written to the prompt cache, as the bound counted it
        (`mainline_bound`), since no column keeps the writes. Priced without them, a bound
        read back lost the write premium: a raised rate did not raise it to what OpenAI may
        bill."""
        return replace(self, mainline_cache_write=self.mainline_input)

    @property
    def total_tokens(self) -> int:
        return (
            self.text_input
            + self.cached_text_input
            + self.image_input
            + self.cached_image_input
            + self.image_output
            + self.text_output
            + self.unclassified_input
            + self.unclassified_output
            + self.mainline_tokens
        )

    @property
    def mainline_tokens(self) -> int:
        return self.mainline_input + self.mainline_cached_input + self.mainline_output

    def tokens(self, kind: TokenKind) -> int:
        value: int = getattr(self, kind)
        return value


@dataclass(frozen=True, slots=True)
class InputImage:
    """An image given to an edit: real dimensions when uploaded, None for a URL or file id."""

    width: int | None = None
    height: int | None = None


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """What Tollgate needs to know of a request to price, decide and record it."""

    endpoint: Endpoint
    model: str
    prompt_bytes: int = 0
    n: int = 1
    quality: str = "auto"
    size: str = "auto"
    stream: bool = False
    partial_images: int = 0
    input_fidelity: str | None = None
    images: tuple[InputImage, ...] = ()
    mask: InputImage | None = None
    markup: InputImage | None = None
    """An image laid over the first one (multipart `markup`): priced as an input image."""
    user: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    """Other scalar request fields (name, value as text) for policy checks."""
    mainline: str | None = None
    """The Responses API's mainline model; None for the Images API. Its image tool runs up
    to `n` times, and each call is billed its own text and image input: `images` are the
    images one call may be given."""

    def with_changes(self, **changes: object) -> ImageRequest:
        return replace(self, **changes)  # type: ignore[arg-type]


def makes_images(mainline: str | None, n: int) -> bool:
    """Whether a request of mainline model `mainline` (None: an Images API request) and `n`
    images (calls) may call an image model. A Responses request without the image tool,
    or with `tool_choice: none` (0 calls), runs its mainline model alone: it is priced
    with the default image model (whose part bounds nothing), but recorded and counted
    under no image model, its `model`, `quality` and `size` left empty."""
    return mainline is None or n > 0


MAX_ASKED_CHARS = 256
"""The longest model, quality or size a row records of what a client asked: a model's name
is a few dozen characters (a fine-tuned one's under a hundred), a size eleven. A longer
one is refused (unpriced, or not a value the model takes), and recorded as nothing: the
ledger keeps no client text without a bound (it kept megabytes of a model's "name")."""


def kept(text: str | None) -> str | None:
    """`text` when a row may record it (at most `MAX_ASKED_CHARS` characters); else None."""
    return text if text is None or len(text) <= MAX_ASKED_CHARS else None


@dataclass(frozen=True, slots=True)
class Asked:
    """What a request refused before its body was understood asked, as far as its body
    could be read (`proxy.core.asked`): each field None when it could not be."""

    model: str | None = None
    quality: str | None = None
    size: str | None = None
    n: int | None = None
    user: str | None = None
    mainline: str | None = None
    """The Responses API's mainline model (`model` is then its image tool's)."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """An upper bound of a request's cost, reserved before it is forwarded."""

    usage: Usage
    cost_nanos: int


@dataclass(frozen=True, slots=True)
class Change:
    """One downgrade step: `quality=high->medium`."""

    knob: Literal["quality", "size", "model"]
    before: str
    after: str
    reason: Literal["policy", "throttle", "budget"]

    def __str__(self) -> str:
        return f"{self.knob}={self.before}->{self.after}"


@dataclass(frozen=True, slots=True)
class Charge:
    """What a finished request costs: the usage OpenAI reported and its price."""

    usage: Usage
    cost_nanos: int
    flagged: bool = False
    """True when the price is not the price book's exact answer: the answer carried no
    usage (the estimate was charged), or tokens of a kind the model has no rate for were
    priced at a stand-in rate."""
    mainline_nanos: int = 0
    """The part of `cost_nanos` that is the Responses API mainline model's."""


@dataclass(frozen=True, slots=True)
class Counter:
    """One aggregate the ledger keeps: spend and tokens of a scope over one window.

    The organization's counters are the sum of every team's (team = "").

    A counter a decision reads also names, in `since` and `until`, the starts of the
    counters written under another time zone that overlap its window: after the
    configuration's `timezone` changes, the spend already counted in the current period is
    in counters of other starts, and counts too (more than the window's own, never less).
    Neither takes part in a counter's identity."""

    scope: Scope
    team: str
    user: str
    period: Period
    start: float
    since: float | None = field(default=None, compare=False, repr=False)
    """The start of the window before this one in the time zone in force: counters of the
    same scope and period that started after it and before `until` count toward this one
    (None: this counter's own row only)."""
    until: float | None = field(default=None, compare=False, repr=False)
    """The end of this counter's window."""


@dataclass(frozen=True, slots=True)
class Totals:
    """What a counter holds: settled spend plus what is reserved in flight."""

    spent_nanos: int = 0
    reserved_nanos: int = 0
    text_input_tokens: int = 0
    image_input_tokens: int = 0
    image_output_tokens: int = 0
    total_tokens: int = 0

    def used(self, metric: str) -> int:
        if metric == "usd":
            return self.spent_nanos + self.reserved_nanos
        value: int = getattr(self, metric)
        return value


@dataclass(frozen=True, slots=True)
class Entry:
    """What is known of a request when it is reserved (or rejected): its ledger row.

    Built in stages as the request path learns more, each stage a new value:

        Entry(id, started_at, endpoint)          it arrived
          .identified(team, cost_center, key_id)  its key named a team
          .asked(request)                         its body was understood
                                                  (.asking(asked): refused before it was)
          .sent(request, estimated_nanos, downgrades)  what is forwarded, and its bound
    """

    id: str
    started_at: float
    endpoint: Endpoint | None
    team: str | None = None
    cost_center: str | None = None
    key_id: str | None = None
    user: str | None = None
    model_requested: str | None = None
    model: str | None = None
    quality_requested: str | None = None
    quality: str | None = None
    size_requested: str | None = None
    size: str | None = None
    n_requested: int | None = None
    n: int | None = None
    stream: bool = False
    estimated_nanos: int = 0
    downgrades: str = ""
    mainline_model: str | None = None
    """The Responses API's mainline model (`model` is then the image tool's, None when the
    request makes no image: see `makes_images`)."""
    context_images: int = 0
    """Responses API: the images in this response's context, which its image tool may be
    given (its own input images, and those a `previous_response_id` carried in)."""
    custom_id: str | None = None
    """Batch API: the line of the batch input file this row bills (its `custom_id`). Set
    only on a batch's billed lines, which are built whole when the batch ends, never staged."""
    content_digest: str | None = None
    """What a repeat of this request matches (its team, path and content: README, "Retries
    never pay twice"); None when it cannot be repeated (no SDK retry header, no key)."""
    idempotency_key: str | None = None
    """A digest of its team and `Idempotency-Key` header, when it sent one."""

    # Each stage spells its fields out: `dataclasses.replace` costs 4 µs a call, which
    # the request path would pay three times per request.

    def identified(self, team: str, cost_center: str | None, key_id: str) -> Entry:
        return Entry(self.id, self.started_at, self.endpoint, team, cost_center, key_id)

    def asked(
        self,
        request: ImageRequest,
        content_digest: str | None = None,
        idempotency_key: str | None = None,
    ) -> Entry:
        """What the client asked for (and what its repeats would match)."""
        images = makes_images(request.mainline, request.n)
        return Entry(
            self.id, self.started_at, self.endpoint, self.team, self.cost_center, self.key_id,
            user=request.user,
            model_requested=kept(request.model) if images else None,
            quality_requested=kept(request.quality) if images else None,
            size_requested=kept(request.size) if images else None,
            n_requested=request.n,
            stream=request.stream,
            mainline_model=kept(request.mainline),
            context_images=len(request.images) if request.mainline else 0,
            content_digest=content_digest,
            idempotency_key=idempotency_key,
        )  # fmt: skip

    def asking(self, asked: Asked) -> Entry:
        """What a request refused before its body was understood asked (its row then records
        what it asked, not nothing): never a stage a forwarded request goes through."""
        return Entry(
            self.id, self.started_at, self.endpoint, self.team, self.cost_center, self.key_id,
            user=asked.user,
            model_requested=asked.model,
            quality_requested=asked.quality,
            size_requested=asked.size,
            n_requested=asked.n,
            mainline_model=asked.mainline,
        )  # fmt: skip

    def sent(self, request: ImageRequest, estimated_nanos: int, downgrades: str) -> Entry:
        """What is forwarded (after any downgrade) and the bound reserved for it."""
        images = makes_images(request.mainline, request.n)
        return Entry(
            self.id, self.started_at, self.endpoint, self.team, self.cost_center, self.key_id,
            self.user, self.model_requested, request.model if images else None,
            self.quality_requested, request.quality if images else None,
            self.size_requested, request.size if images else None, self.n_requested, request.n,
            self.stream, estimated_nanos, downgrades, request.mainline, self.context_images,
            None, self.content_digest, self.idempotency_key,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Settlement:
    """How a request ended."""

    finished_at: float
    outcome: Outcome
    status: int
    usage: Usage = field(default_factory=Usage)
    cost_nanos: int = 0
    flagged: bool = False
    upstream_request_id: str | None = None
    error_code: str | None = None
    latency_ms: float = 0.0
    mainline_cost_nanos: int = 0
    """The part of `cost_nanos` that is the Responses API mainline model's."""
    response_id: str | None = None
    """The Responses API's response id (`resp_…`): who may read, cancel or continue it."""
