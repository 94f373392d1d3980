"""What a door is: the typed interface the pipeline calls (see `proxy.doors`)."""

from __future__ import annotations

from typing import Protocol, TypeVar

from proxy.core.budgets import Variant
from proxy.core.errors import RequestError
from proxy.core.models import Asked, Endpoint, ImageRequest
from proxy.core.settings import Config, Limits, Team
from proxy.core.settlement import Bound, Metered, StreamEnd

Parsed = TypeVar("Parsed")


class AnswerMeter(Protocol):
    """Reads a whole answer's usage as its chunks pass."""

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> Metered:
        """What the answer held. Raises `MalformedAnswer` when the answer is not what the
        upstream sends."""
        ...


class StreamMeter(Protocol):
    """Follows a stream's events as they pass."""

    response_id: str | None
    """A Responses stream's response id, once its opening event named it."""

    def feed(self, chunk: bytes) -> None: ...

    def end(self, broken: str | None) -> StreamEnd:
        """What was seen once the stream is over (`broken`: how it broke off, if it did)."""
        ...

    def cut_short(self, failure: RequestError) -> bytes:
        """What the client is sent after the events relayed when the upstream's stream
        broke off (`failure`: how), so that its SDK fails as it would have reading the
        upstream itself; empty when the stream has no such event."""
        ...


class Door(Protocol[Parsed]):
    """One door: the requests of one upstream endpoint."""

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint's name in the ledger, the metrics and the policies."""
        ...

    @property
    def upstream_path(self) -> str:
        """Where its requests go, below the upstream's base URL."""
        ...

    def body_limit(self, limits: Limits) -> int:
        """The largest body accepted."""
        ...

    def parse(self, content_type: str, body: bytes, config: Config, team: Team) -> Parsed:
        """The body understood (and, where it leaves its cost open, bounded by the team's
        policy); InvalidRequest in OpenAI's words when it is not."""
        ...

    def request(self, parsed: Parsed) -> ImageRequest:
        """What the client asked for, as the ledger and the budgets see it."""
        ...

    def asked(self, content_type: str, body: bytes, config: Config) -> Asked:
        """What a request refused before it was understood (`parse` refused its body, or a
        step before `request`) asked, as far as its body can be read, for its ledger row
        (`proxy.core.asked`): never anything its refusal or any decision reads."""
        ...

    def names_model(self, parsed: Parsed) -> bool:
        """False when the default model was applied."""
        ...

    def file_ids(self, parsed: Parsed) -> tuple[str, ...]:
        """The uploaded files the request names by id (the pipeline checks each is one
        its team uploaded through Tollgate)."""
        ...

    def previous(self, parsed: Parsed) -> str | None:
        """The id of an earlier response the request continues, whose context it carries
        (the pipeline checks the team created it)."""
        ...

    def carry(self, parsed: Parsed, tokens: int, images: int) -> Parsed:
        """The request with the context of its `previous` response counted in its bound:
        `tokens` billed again as input, `images` its tool may be given."""
        ...

    def digest(self, parsed: Parsed) -> bytes:
        """What the request asks, the same for every sending of it (a retry draws a new
        multipart boundary): what its repeats are recognised by."""
        ...

    def injected(self, parsed: Parsed) -> str:
        """The bounds Tollgate wrote into the request (`max_tool_calls=unset->1`), for
        `x-tollgate-downgraded`; empty when none."""
        ...

    def admit(self, team: Team, parsed: Parsed, config: Config) -> Variant:
        """The request priced and put through the team's `allow` policy: UnpricedModel,
        PolicyViolation or InvalidRequest when it cannot be sent at all."""
        ...

    def bound(self, parsed: Parsed, variant: Variant) -> Bound:
        """What the forwarded `variant` is reserved at."""
        ...

    def encode(self, parsed: Parsed, variant: Variant) -> tuple[bytes, str]:
        """The exact bytes to forward for `variant`, built from the parse, and their
        content type."""
        ...

    def answer_meter(self) -> AnswerMeter: ...

    def stream_meter(self) -> StreamMeter: ...
