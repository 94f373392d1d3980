"""The Batch API's input files: JSONL read line by line, each line priced (pure).

A batch input file (`POST /v1/files`, purpose `batch`) holds up to 50,000 requests, one
JSON object a line:

    {"custom_id": "…", "method": "POST", "url": "/v1/images/generations", "body": {…}}

`BatchFile` reads it as it arrives, in chunks, and checks every line as the same request
sent directly would be checked (`proxy.doors.images`): a JSON body the Images API takes
on that endpoint, a priced model the Batch API accepts, the team's `allow` policy. Each
line is bounded at the model's batch rates (`ModelPrices.for_batch`) and written out
again from its parse (`encoded`), so the file forwarded is the file priced. A
`/v1/responses` line goes through the Responses door instead (`batch_responses`), bounded
at the batch rates of its mainline model and of its image tool's model. A line the
policy would change (a quality above `allow.max_quality`) is refused rather than changed:
a batch runs unattended, with no header to say what changed. Every bad line is listed
(`line 12: …`, up to `MAX_PROBLEMS` of them, then how many more), and any one refuses the
whole file before it is uploaded.

A file may be run as a batch long after it was uploaded, under a configuration reloaded
since: `bound_now` checks its lines again, when the batch is created, against the team's
`allow` policy and the price book in force then, and bounds the batch at today's rates.
What the policy reads of a line beyond the few fields the ledger keeps of it (its fields
as given, whether it gives input images) is kept with it (`policy_text`), so a tightened
`allow.params` holds for a file uploaded before it as for one uploaded after.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from proxy.core.budgets import allow_endpoint, apply_allow
from proxy.core.errors import InvalidRequest, PolicyViolation, RequestError, UnpricedModel
from proxy.core.image_params import USER_PARAMS
from proxy.core.models import Endpoint, Estimate, ImageRequest, InputImage, Usage
from proxy.core.parsing import json_object, parse_request
from proxy.core.pricing import MainlinePrices, ModelPrices, estimate
from proxy.core.settings import Config, Team
from proxy.doors.batch_responses import response_line
from proxy.doors.images import priced

MAX_LINES = 50_000
MAX_LINE_BYTES = 64 * 1024 * 1024
"""A longer line is refused (an edit's inline images included, a line stays far below)."""
MAX_CUSTOM_ID = 4096
"""The longest `custom_id`, in characters: its line's answer is found by it in the output
file, whose strings are read up to `CUSTOM_ID_BYTES` (images are dropped unread)."""
CUSTOM_ID_BYTES = 12 * MAX_CUSTOM_ID
"""The most bytes JSON may write a `custom_id` of `MAX_CUSTOM_ID` characters in (each an
emoji escaped as two `\\uXXXX`)."""
MAX_PROBLEMS = 100
URLS: dict[str, Endpoint] = {
    "/v1/images/generations": "generations",
    "/v1/images/edits": "edits",
    "/v1/responses": "responses",
}
LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})


@dataclass(frozen=True, slots=True)
class PricedLine:
    """One line as priced: what the ledger keeps of it, and its bound."""

    custom_id: str
    line: int
    endpoint: Endpoint
    model: str
    quality: str
    size: str
    n: int
    user: str | None
    bound_nanos: int
    usage: Usage
    file_ids: tuple[str, ...]
    """The files its images name (each must be the team's)."""
    mainline: str | None = None
    """A `/v1/responses` line's mainline model (`model` is its image tool's)."""
    policy: str | None = None
    """What the team's `allow` rules read of it beyond the fields above (`policy_text`)."""


KEPT_AS_COLUMNS = frozenset({"model", "n", "quality"})
"""Fields of a line the ledger keeps in columns of their own, which `allow` reads from
there (`allow.params` may not name them); `size` stays in the policy text too: whether it
was given says how a size left out is refused."""


def policy_text(request: ImageRequest) -> str:
    """What the team's `allow` rules read of a line's request beyond the fields its
    `PricedLine` keeps: whether it gives input images, and its fields as given, as compact
    JSON (`policy_request` reads it back). A user field whose value is the line's `user`
    is written `null`: the lines of a file that differ only by their users have one text.

    `policy_text(request)` is `[0,[["size","1024x1024"],["user",null]]]` for a generation
    that gives those fields (and model, n, quality)."""
    inputs = bool(request.images) or request.mask is not None or request.markup is not None
    given = [
        [name, None if name in USER_PARAMS and value == request.user else value]
        for name, value in request.params
        if name not in KEPT_AS_COLUMNS
    ]
    return json.dumps([int(inputs), given], separators=(",", ":"))


def policy_request(request: ImageRequest, text: str) -> ImageRequest:
    """`request` (rebuilt from a line's columns, its `user` among them) with what
    `policy_text` kept of it."""
    inputs, given = json.loads(text)
    return replace(
        request,
        images=(InputImage(),) if inputs else (),
        params=tuple(
            (str(name), str(request.user if value is None else value)) for name, value in given
        ),
    )


@dataclass
class BatchFile:
    """A batch input file read as it arrives: `feed` chunks, then `finish`; each returns
    the lines written out again (canonical JSON, one a line)."""

    team: Team
    config: Config
    lines: list[PricedLine] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """`line N: reason`, in order, at most `MAX_PROBLEMS`."""
    more_problems: int = 0
    endpoint: Endpoint | None = None
    """The endpoint of its lines (a batch has one)."""
    bound_nanos: int = 0
    usage: Usage = field(default_factory=Usage)
    _count: int = 0
    _tail: bytearray = field(default_factory=bytearray)
    """The start of a line whose end has not arrived yet."""
    _ids: set[str] = field(default_factory=set)
    _skipping: bool = False
    """The rest of a line refused as too long is arriving: dropped up to its newline."""

    def feed(self, chunk: bytes) -> bytes:
        if self._skipping:
            start = chunk.find(b"\n")
            if start < 0:
                return b""
            chunk, self._skipping = chunk[start + 1 :], False
        # Only the new chunk is searched, and a long line grows in place: copying and
        # searching it again at each chunk took seconds of the event loop for one line.
        end = chunk.rfind(b"\n")
        if end < 0:
            self._tail += chunk
            if len(self._tail) > MAX_LINE_BYTES:
                self._count += 1
                self._problem(f"longer than {MAX_LINE_BYTES:,} bytes")
                self._tail, self._skipping = bytearray(), True
            return b""
        data = bytes(self._tail + chunk[:end])
        self._tail = bytearray(chunk[end + 1 :])
        return b"".join(self._line(raw) for raw in data.split(b"\n"))

    def finish(self) -> bytes:
        """The last line (it may lack its newline); then the file as a whole is checked."""
        tail, self._tail = bytes(self._tail), bytearray()
        out = self._line(tail) if tail.strip() else b""
        if self._count == 0:
            self._problems_append("the file holds no request: a batch needs at least one line")
        elif self._count > MAX_LINES:
            self._problems_append(
                f"the file holds {self._count:,} lines; the Batch API takes at most {MAX_LINES:,}"
            )
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        """Every problem, one a line, for the 400 that refuses the file."""
        count = len(self.problems) + self.more_problems
        more = [f"… and {self.more_problems:,} more"] if self.more_problems else []
        head = f"The batch file was not uploaded: {count:,} problem(s)."
        return "\n".join([head, *self.problems, *more])

    # -- one line ------------------------------------------------------------------

    def _line(self, raw: bytes) -> bytes:
        self._count += 1
        if self._count > MAX_LINES:
            return b""
        raw = raw.removesuffix(b"\r")
        if len(raw) > MAX_LINE_BYTES:  # however the file arrived in chunks
            self._problem(f"longer than {MAX_LINE_BYTES:,} bytes")
            return b""
        try:
            priced_line, encoded = self._read(raw, self._count)
        except RequestError as exc:
            self._problem(exc.message)
            return b""
        self.lines.append(priced_line)
        self.bound_nanos += priced_line.bound_nanos
        self.usage = self.usage + priced_line.usage
        return encoded

    def _read(self, raw: bytes, number: int) -> tuple[PricedLine, bytes]:
        if not raw.strip():
            raise InvalidRequest("an empty line (every line must be one request)")
        given = json_object(raw)
        unknown = sorted(set(given) - LINE_KEYS)
        if unknown:
            raise InvalidRequest(f"unknown field {unknown[0]!r}")
        custom_id = given.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise InvalidRequest("'custom_id' must be a non-empty string")
        if len(custom_id) > MAX_CUSTOM_ID:
            raise InvalidRequest(f"'custom_id' is longer than {MAX_CUSTOM_ID:,} characters")
        if custom_id in self._ids:
            raise InvalidRequest(f"custom_id {custom_id!r} is used by an earlier line")
        self._ids.add(custom_id)
        if given.get("method") != "POST":
            raise InvalidRequest("'method' must be \"POST\"")
        url = given.get("url")
        endpoint = URLS.get(url) if isinstance(url, str) else None
        if endpoint is None or not isinstance(url, str):
            raise InvalidRequest(
                f"url {url!r} is not one Tollgate meters in a batch: use "
                f"{', '.join(URLS)} (JSON bodies)"
            )
        if self.endpoint is None:
            self.endpoint = endpoint
        elif endpoint != self.endpoint:
            raise InvalidRequest(
                f"url {url} differs from the file's first line: a batch has one endpoint"
            )
        body = given.get("body")
        if not isinstance(body, dict):
            raise InvalidRequest("'body' must be a JSON object")
        if endpoint == "responses":
            return self._price_response(custom_id, number, url, body)
        return self._price(custom_id, number, endpoint, url, body)

    def _price_response(
        self, custom_id: str, number: int, url: str, body: dict[str, Any]
    ) -> tuple[PricedLine, bytes]:
        parsed, variant, sent = response_line(self.team, self.config, body)
        request = variant.request
        line = PricedLine(
            custom_id,
            number,
            "responses",
            request.model,
            request.quality,
            request.size,
            request.n,
            request.user,
            variant.estimate.cost_nanos,
            variant.estimate.usage,
            parsed.files,
            request.mainline,
            policy_text(request),
        )
        return line, _encoded(custom_id, url, sent)

    def _price(
        self, custom_id: str, number: int, endpoint: Endpoint, url: str, body: dict[str, Any]
    ) -> tuple[PricedLine, bytes]:
        parsed = parse_request(
            endpoint, "application/json", json.dumps(body).encode(), self.config.default_model
        )
        request = parsed.request
        if request.stream:
            raise InvalidRequest("'stream' cannot be used in a batch")
        model = priced(self.config.prices, request.model)
        if not model.accepts_batch:
            raise UnpricedModel(f"model {model.name!r} is not accepted by the Batch API")
        self.config.prices.check_endpoint(model, endpoint)
        model.validate(request)
        variant = apply_allow(self.team, request, model.for_batch())
        if variant.changes:
            change = variant.changes[0]
            raise InvalidRequest(
                f"{change.knob} {change.before} is above what team {self.team.name} may "
                f"request ({change.knob}={change.after} at most): a batch line is not changed"
            )
        sent, _ = parsed.encode({})
        encoded = _encoded(custom_id, url, sent)
        references = parsed.references or {}
        refs = [*references.get("images", ()), references.get("mask") or {}]
        files = tuple(r["file_id"] for r in refs if isinstance(r, dict) and "file_id" in r)
        line = PricedLine(
            custom_id,
            number,
            endpoint,
            request.model,
            request.quality,
            request.size,
            request.n,
            request.user,
            variant.estimate.cost_nanos,
            variant.estimate.usage,
            files,
            policy=policy_text(request),
        )
        return line, encoded

    def refuse(self, number: int, reason: str) -> None:
        """Line `number` found bad after it was read (a file it names is not the team's)."""
        self._problems_append(f"line {number}: {reason}")

    def _problem(self, reason: str) -> None:
        self.refuse(self._count, reason)

    def _problems_append(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.more_problems += 1


class StoredLine(Protocol):
    """What the ledger keeps of a priced line (`proxy.ledger.BatchLine`)."""

    @property
    def line(self) -> int: ...
    @property
    def endpoint(self) -> Endpoint: ...
    @property
    def model(self) -> str: ...
    @property
    def quality(self) -> str: ...
    @property
    def size(self) -> str: ...
    @property
    def n(self) -> int: ...
    @property
    def user(self) -> str | None: ...
    @property
    def mainline(self) -> str | None: ...
    @property
    def bound_nanos(self) -> int: ...
    @property
    def policy(self) -> str | None: ...


def user_shares(lines: Iterable[StoredLine], bound: Estimate) -> dict[str, Estimate]:
    """Each user the lines name (`safety_identifier`, else `user`), with the share of the
    batch's `bound` that the lines naming that user may cost: the bound (its cost and each
    kind of its usage) in the proportion of their bounds at upload to the file's, rounded
    up, never above the bound. A user whose lines are the whole file gets the whole bound;
    with no rate changed since the upload, each share is at least its lines' bounds. One
    pass over the lines, whatever the number of users."""
    parts: dict[str, int] = {}
    whole = 0
    for line in lines:
        whole += line.bound_nanos
        if line.user:
            parts[line.user] = parts.get(line.user, 0) + line.bound_nanos
    if whole <= 0:
        return dict.fromkeys(parts, bound)
    usage = bound.usage
    names = [f.name for f in fields(usage)]
    return {
        user: Estimate(
            Usage(**{n: _share(getattr(usage, n), part, whole) for n in names}),
            _share(bound.cost_nanos, part, whole),
        )
        for user, part in parts.items()
    }


def _share(amount: int, part: int, whole: int) -> int:
    return min(amount, -(-amount * part // whole))


@dataclass(frozen=True, slots=True)
class Refused:
    """Why a line is refused now; `policy`: by the team's `allow` rules (a 403), not by
    the price book."""

    reason: str
    policy: bool


def bound_now(
    team: Team, config: Config, lines: Iterable[StoredLine], priced_at: Estimate
) -> Estimate:
    """The bound of a batch of a file priced at upload (`priced_at`), under the
    configuration in force now; a RequestError listing every line that it refuses: a
    PolicyViolation when each is refused by the team's `allow` rules (a line is never
    changed), else InvalidRequest (a model no longer priced or accepted by the Batch API).

    Each line is checked as at upload against the team's `allow` rules in force now, its
    `allow.params` too, from what its upload kept of it (`policy_text`; a line stored
    before that was kept is checked on its model, n, quality and size alone).

    The bound is never below the upload's. Its output is each line's output ceiling now;
    its input, the file's as priced at upload (the prompts and images are not kept). Priced
    at the dearest rates of the file's models (OpenAI runs a batch of one model only), it
    holds every line whatever its model: a reload that raised a rate since the upload
    otherwise leaves the batch reserved below what it is settled at. The mainline tokens of
    `/v1/responses` lines (as bounded at upload) are priced so too, at the dearest batch
    rates of the file's mainline models (their standard-context rates: the file's tokens
    summed would pass any long-context threshold that no line passes; a line that did was
    bounded at those rates at upload, which the bound never goes below)."""
    problems: list[str] = []
    policy_only = True
    output = text_output = images = 0
    models: dict[str, ModelPrices] = {}
    mainlines: dict[str, MainlinePrices] = {}
    # Lines asking the same thing get the same answer: each kind is checked once (a file of
    # 50,000 lines holds a handful of kinds, and this runs on the event loop). A line's
    # user changes no answer; its fields as given (`policy`, which holds its user) change
    # one only where `allow.params` or `allow.sizes` reads them, and count as its kind there
    # only; its user, only where `allow.params` names a user field: a file naming 50,000
    # users is otherwise checked as one of a single user.
    reads_policy = bool(team.allow.params) or team.allow.sizes is not None
    reads_user = any(name in team.allow.params for name in USER_PARAMS)
    seen: dict[
        tuple[Any, ...], Refused | tuple[ModelPrices | None, Usage, MainlinePrices | None]
    ] = {}
    for stored in lines:
        kind = (stored.endpoint, stored.model, stored.n, stored.quality, stored.size)
        policy = stored.policy if reads_policy else None
        key = (*kind, stored.mainline, policy, stored.user if reads_user else None)
        found = seen.get(key)
        if found is None:
            if stored.endpoint == "responses" and stored.n == 0:
                # No image tool (or one it may not call): the line makes no image, and its
                # upload checked and bounded its mainline model alone; the image model it
                # was recorded with (the default, unless a tool named one) is not checked.
                found = (None, Usage(), None)
            else:
                found = _checked_again(team, config, *kind, policy, stored.user)
            if not isinstance(found, Refused) and stored.mainline is not None:
                found = _mainline_again(team, config, stored.mainline, found)
            seen[key] = found
        if isinstance(found, Refused):
            problems.append(f"line {stored.line}: {found.reason}")
            policy_only = policy_only and found.policy
            continue
        model, ceiling, mainline = found
        if model is not None:
            models[model.name] = model
        if mainline is not None:
            mainlines[mainline.name] = mainline
        output += ceiling.image_output
        text_output += ceiling.text_output
        images += ceiling.images
    if problems:
        count = len(problems)
        shown = problems[:MAX_PROBLEMS] + ([f"… and {count - MAX_PROBLEMS:,} more"]
                                           if count > MAX_PROBLEMS else [])  # fmt: skip
        refusal = PolicyViolation if policy_only else InvalidRequest
        meets = f"team {team.name}'s policy" if policy_only else "Tollgate's configuration"
        raise refusal(
            "\n".join([
                f"This batch file no longer meets {meets}: {count:,} problem(s). Fix the "
                "lines and upload the file again.",
                *shown,
            ]),
            param="input_file_id",
        )  # fmt: skip
    usage = replace(
        priced_at.usage.as_bound(),  # stored without its writes to the prompt cache
        image_output=max(priced_at.usage.image_output, output),
        text_output=max(priced_at.usage.text_output, text_output),
        images=max(priced_at.usage.images, images),
    )
    cost = max((model.bound_cost(usage) for model in models.values()), default=0)
    cost += max((mainline.cost(usage) for mainline in mainlines.values()), default=0)
    return Estimate(usage, max(priced_at.cost_nanos, cost))


def _mainline_again(
    team: Team, config: Config, name: str, found: tuple[ModelPrices | None, Usage, None]
) -> Refused | tuple[ModelPrices | None, Usage, MainlinePrices]:
    """Why a `/v1/responses` line of mainline model `name` is refused now, or `found` with
    that model at its batch rates (standard context, see `bound_now`). The team must still
    be allowed `/v1/responses`: a line that calls no image tool is checked here alone."""
    try:
        allow_endpoint(team, "responses")
    except PolicyViolation as exc:
        return Refused(exc.message, policy=True)
    mainline = config.prices.find_mainline(name)
    if mainline is None or not mainline.accepts_batch:
        return Refused(f"model {name!r} is not accepted by the Batch API", policy=False)
    allowed = team.allow.models
    if allowed is not None and not {name, mainline.name} & allowed:
        return Refused(f"team {team.name} may not use model {name!r}", policy=True)
    return found[0], found[1], replace(mainline.for_batch(), long_context=None)


def _checked_again(
    team: Team,
    config: Config,
    endpoint: Endpoint,
    name: str,
    n: int,
    quality: str,
    size: str,
    policy: str | None,
    user: str | None,
) -> Refused | tuple[ModelPrices, Usage, None]:
    """Why a line asking this is refused now, or its model at batch rates and its output
    ceiling; `policy`: the line's `policy_text`, None where the team's rules do not read it
    (or it was not kept)."""
    request = ImageRequest(
        endpoint=endpoint, model=name, n=n, quality=quality, size=size, user=user
    )  # fmt: skip
    try:
        model = priced(config.prices, name)
        if not model.accepts_batch:
            raise UnpricedModel(f"model {model.name!r} is not accepted by the Batch API")
    except RequestError as exc:
        return Refused(exc.message, policy=False)
    try:
        if policy is None:
            # Not read, or stored before it was kept: its `allow.params` checked at upload.
            variant = apply_allow(team, request, model.for_batch(), params=False)
        else:
            variant = apply_allow(team, policy_request(request, policy), model.for_batch())
    except RequestError as exc:
        return Refused(exc.message, policy=isinstance(exc, PolicyViolation))
    if variant.changes:
        change = variant.changes[0]
        return Refused(
            f"{change.knob} {change.before} is above what team {team.name} may request "
            f"({change.knob}={change.after} at most)",
            policy=True,
        )
    return model.for_batch(), estimate(model.for_batch(), request).usage, None


def _encoded(custom_id: str, url: str, body: bytes) -> bytes:
    """A line as forwarded: canonical JSON, `body` as Tollgate wrote it."""
    return (
        b'{"custom_id":' + json.dumps(custom_id).encode()
        + b',"method":"POST","url":"' + url.encode() + b'","body":' + body + b"}\n"
    )  # fmt: skip
