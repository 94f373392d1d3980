"""The frozen values a loaded configuration is made of (README, "Configuration")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from proxy.core.models import Period
from proxy.core.pricing import PriceBook

Metric = Literal[
    "usd", "text_input_tokens", "image_input_tokens", "image_output_tokens", "total_tokens"
]
TOKEN_METRICS: tuple[Metric, ...] = (
    "text_input_tokens",
    "image_input_tokens",
    "image_output_tokens",
    "total_tokens",
)
Knob = Literal["quality", "size", "model"]
KNOBS: tuple[Knob, ...] = ("quality", "size", "model")
OnExhausted = Literal["downgrade", "reject"]

MiB = 1024 * 1024
_EMPTY: Mapping[str, frozenset[str]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Budget:
    """A hard limit over one period: nano-dollars when `metric == "usd"`, else tokens."""

    period: Period
    metric: Metric
    limit: int
    alert_at: tuple[Decimal, ...] = ()
    """Soft thresholds, fractions of `limit` in (0, 1], ascending."""
    where: str = ""
    """`file:line` of the entry, for messages."""


@dataclass(frozen=True, slots=True)
class Allow:
    """What a team may request; None means no restriction."""

    models: frozenset[str] | None = None
    endpoints: frozenset[str] | None = None
    max_quality: str | None = None
    max_n: int | None = None
    sizes: frozenset[str] | None = None
    params: Mapping[str, frozenset[str]] = field(default_factory=lambda: _EMPTY, hash=False)
    """Allowed values of other request fields, as text (`true`/`false` for booleans)."""


@dataclass(frozen=True, slots=True)
class ThrottleTier:
    """Above this fraction of the team's tightest USD budget, cap quality at `max_quality`."""

    above: Decimal
    max_quality: str


@dataclass(frozen=True, slots=True)
class Downgrade:
    order: tuple[Knob, ...] = KNOBS
    fallback_model: str | None = None


Unbounded = Literal["inject", "refuse"]


@dataclass(frozen=True, slots=True)
class ResponsesPolicy:
    """How the Responses API's open bounds are closed for a team (`responses:`).

    A request without `max_output_tokens` or `max_tool_calls` leaves its cost unbounded:
    under `unbounded: inject` Tollgate writes these defaults into it (and says so in
    `x-tollgate-downgraded`); under `refuse` it answers 400."""

    max_output_tokens: int = 8192
    max_tool_calls: int = 1
    unbounded: Unbounded = "inject"


RatePer = Literal["minute", "day"]
RATE_PERS: tuple[RatePer, ...] = ("minute", "day")
RateMetric = Literal["images", "requests", "tokens"]
RATE_METRICS: tuple[RateMetric, ...] = ("images", "requests", "tokens")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `limit` images, requests or tokens per minute or day (README, "Rate
    limits"), of one model's requests or of all."""

    per: RatePer
    metric: RateMetric
    limit: int
    model: str | None = None
    where: str = ""
    """`file:line` of the entry, for messages."""

    def matches(self, model: str | None, mainline: str | None) -> bool:
        """Whether a request of image model `model` (and mainline model `mainline`, on
        the Responses API) counts against this limit."""
        return self.model is None or self.model in (model, mainline)


@dataclass(frozen=True, slots=True)
class RateShare:
    """A team's guaranteed fraction of each organization rate limit of the same `per`
    (and of `model`'s, when it names one): that much of the limit is kept for it."""

    per: RatePer
    share: Decimal
    model: str | None = None
    where: str = ""

    def covers(self, limit: RateLimit) -> bool:
        return limit.per == self.per and (self.model is None or self.model == limit.model)

    def of(self, limit: RateLimit) -> int:
        """The part of `limit` it guarantees, rounded down."""
        return int(self.share * limit.limit)


@dataclass(frozen=True, slots=True)
class TeamKey:
    id: str
    sha256: str
    """Lowercase hex SHA-256 of the secret key; the secret itself is never stored."""


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    cost_center: str | None
    keys: tuple[TeamKey, ...]
    budgets: tuple[Budget, ...]
    per_user: tuple[Budget, ...]
    allow: Allow
    throttle: tuple[ThrottleTier, ...]
    """Sorted by `above`, ascending."""
    openai_project: str | None = None
    """The OpenAI project (`proj_…`) the team's requests are sent under, instead of
    `upstream.project`: OpenAI's usage and costs by project then match the team."""
    on_exhausted: OnExhausted = "downgrade"
    downgrade: Downgrade = field(default_factory=Downgrade)
    responses: ResponsesPolicy = field(default_factory=ResponsesPolicy)
    rate_limits: tuple[RateLimit, ...] = ()
    rate_shares: tuple[RateShare, ...] = ()
    source: str = ""
    """The file the team was read from."""


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    base_url: str = "https://api.openai.com/v1"
    api_key: str | None = None
    timeout_s: float = 300.0
    """The longest the upstream may stay silent: before its answer starts, between chunks."""
    total_timeout_s: float | None = None
    """The longest one exchange may last, from the request's arrival to its answer's last
    byte (a stream that keeps sending is cut there); None: `2 × timeout_s`."""
    organization: str | None = None
    """Replaces the client's `OpenAI-Organization` header when set."""
    project: str | None = None
    """Replaces the client's `OpenAI-Project` header when set."""
    max_connections: int = 4096
    data_residency: bool = False
    """Whether the upstream is a regional (data-residency) endpoint, which bills eligible
    models 10 % above the price book's rates: the book is then priced so
    (`PriceBook.at_data_residency`)."""

    @property
    def deadline_s(self) -> float:
        """The total deadline of an exchange (`total_timeout_s`, else twice `timeout_s`)."""
        return self.total_timeout_s if self.total_timeout_s is not None else 2 * self.timeout_s


GiB = 1024 * MiB
BODY_COPIES = 3
"""How many times its length a request body is charged against `Limits.inflight_bytes`: the
bytes read, the parsed copy (multipart parts or the decoded JSON) and the re-encoded body
forwarded when a field is downgraded coexist until the request is answered."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may make the process hold, and for how long."""

    generations_bytes: int = 1 * MiB
    edits_bytes: int = 128 * MiB
    variations_bytes: int = 128 * MiB
    files_bytes: int = 201 * MiB
    """A file upload (`POST /v1/files`: a batch file of up to 200 MB, and its form). Spooled
    to disk as it arrives, never held in memory: not counted in `inflight_bytes`."""
    inflight_bytes: int = 1 * GiB
    """Request bodies held in memory at once by one process, each charged `BODY_COPIES`
    times its length; a body that would pass it is refused (503) before it is read."""
    header_timeout_s: float = 10.0
    """From a connection's first byte (or the end of its previous answer) to the end of the
    request's headers; a connection that takes longer is closed."""
    body_idle_timeout_s: float = 30.0
    """Longest pause while a body is sent: the request then gets 408."""
    body_timeout_s: float = 300.0
    """Longest time to receive a whole body: the request then gets 408."""
    max_connections: int | None = None
    """Client connections held open by one process; None: sized from its file-descriptor
    limit (`proxy.web.connections.default_max_connections`)."""

    def largest_body(self) -> int:
        return max(self.generations_bytes, self.edits_bytes, self.variations_bytes)


HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
HTTP_METHODS: tuple[HttpMethod, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
READ_ONLY: frozenset[HttpMethod] = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Passthrough:
    """A `/v1/*` path prefix forwarded unmetered, and the methods forwarded under it."""

    prefix: str
    """Canonical, without a trailing `/`; it covers itself and the paths below it."""
    methods: frozenset[HttpMethod] = READ_ONLY
    """GET (and HEAD) unless the configuration names others."""


@dataclass(frozen=True, slots=True)
class Alerts:
    webhooks: tuple[str, ...] = ()
    timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Retries:
    """How repeats of a request are answered (README, "Retries never pay twice")."""

    enabled: bool = True
    window_s: float = 600.0
    """How long after a request its repeats are recognised (and its answer kept)."""
    store_bytes: int = 256 * MiB
    """The bodies of kept answers, in all, shared by every worker and replica."""


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration. Build it with `load_config`."""

    root: Path
    """The (absolute) directory holding tollgate.yaml, or the single file's directory."""
    upstream: UpstreamSettings
    ledger_url: str
    timezone: str
    admin_token: str | None
    """None when the admin API is off."""
    prices: PriceBook = field(repr=False, compare=False, hash=False)
    default_model: str = "gpt-image-2"
    organization_budgets: tuple[Budget, ...] = ()
    organization_rate_limits: tuple[RateLimit, ...] = ()
    teams: tuple[Team, ...] = ()
    limits: Limits = field(default_factory=Limits)
    passthrough: tuple[Passthrough, ...] = ()
    alerts: Alerts = field(default_factory=Alerts)
    retries: Retries = field(default_factory=Retries)
    _by_key_hash: Mapping[str, tuple[Team, TeamKey]] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _by_name: Mapping[str, Team] = field(init=False, repr=False, compare=False, hash=False)
    _promises: tuple[Mapping[str, int], ...] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        index = {key.sha256: (team, key) for team in self.teams for key in team.keys}
        object.__setattr__(self, "_by_key_hash", MappingProxyType(index))
        object.__setattr__(self, "_by_name", MappingProxyType({t.name: t for t in self.teams}))
        promises = tuple(
            MappingProxyType(
                {
                    team.name: share.of(limit)
                    for team in self.teams
                    for share in team.rate_shares
                    if share.covers(limit)
                }
            )
            for limit in self.organization_rate_limits
        )
        object.__setattr__(self, "_promises", promises)

    def promises(self) -> tuple[Mapping[str, int], ...]:
        """For each organization rate limit, each team's promise of it (only the teams with
        a share of it); built once: a request must not walk every team."""
        return self._promises

    def team_by_key_hash(self) -> Mapping[str, tuple[Team, TeamKey]]:
        """SHA-256 hex of a secret key -> (its team, the key entry); built once."""
        return self._by_key_hash

    def team_named(self, name: str | None) -> Team | None:
        """The team called `name`; None for no team, or one no longer configured."""
        return self._by_name.get(name) if name is not None else None

    def project_of(self, team: str | None) -> str | None:
        """The OpenAI project a team's requests are billed to: its `openai_project`, else
        `upstream.project`; None when neither is set (the upstream key's default project)."""
        found = self.team_named(team)
        if found is not None and found.openai_project is not None:
            return found.openai_project
        return self.upstream.project
