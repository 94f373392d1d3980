"""Schema-checked documents → a `Config`: the settings, the teams (`proxy.config.teams`),
and the rules across files (a team or key hash defined twice, the teams' shares of the
organization's rate limits), every problem collected as `file:line: key.path: message`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.config.fastcheck import schema_problems
from proxy.config.passthrough import passthrough_prefixes
from proxy.config.source import Document, JsonPath
from proxy.config.teams import TeamBuilder
from proxy.core.auth import key_hash
from proxy.core.errors import ConfigError
from proxy.core.pricing import PriceBook
from proxy.core.settings import (
    BODY_COPIES,
    Alerts,
    Config,
    Limits,
    RateLimit,
    Retries,
    Team,
    UpstreamSettings,
)

PriceBookLoader = Callable[[Path | None], PriceBook]
OPENAI_DOMAIN = ".api.openai.com"
GLOBAL_HOSTS = frozenset({"api.openai.com", "mtls.api.openai.com"})
"""OpenAI's endpoints billed at the price book's rates; every other host under
`api.openai.com` (us., eu., ae., au., in., jp., mtls-us., mtls-eu.) is a data-residency
endpoint, billed 10 % more for models released on or after 2026-03-05: the book is priced
so there (`upstream.data_residency`, which such a host turns on and cannot turn off)."""


HEADER_TOKEN = re.compile(r"[!-~]+")
"""What a value sent in a header (the upstream key, organization, project) may hold."""
MIN_ADMIN_TOKEN = 16
"""The fewest characters of an admin token: a short one can be guessed."""


class Builder:
    """Turns schema-checked documents into frozen values, collecting problems."""

    def __init__(self, root: Path, price_book_loader: PriceBookLoader) -> None:
        self.root = root.absolute()
        self.load_prices = price_book_loader
        self.problems: list[str] = []
        self.book: PriceBook | None = None

    def build(self, settings_doc: Document | None, team_docs: list[Document]) -> Config | None:
        settings_ok = True
        data: dict[str, Any] = {}
        inline_teams: list[tuple[Document, JsonPath]] = []
        if settings_doc is not None:
            if settings_doc.data is None:
                settings_doc.data = {}
            bad = self._check(settings_doc, "settings")
            settings_ok = not any(len(p) < 2 or p[0] != "teams" for p in bad)
            if isinstance(settings_doc.data, dict):
                data = settings_doc.data
                teams = data.get("teams")
                if isinstance(teams, list):
                    inline_teams = [
                        (settings_doc, ("teams", i))
                        for i in range(len(teams))
                        if not any(p[:2] == ("teams", i) for p in bad)
                    ]
        file_teams = [(doc, ()) for doc in team_docs if not self._check(doc, "team")]
        prices = data.get("prices", "builtin")
        if isinstance(prices, str) and prices:
            self.book = self._price_book(prices, settings_doc)

        # Made once the price book is read: each model a team names is checked against it.
        self.teams = TeamBuilder(self.book, self.problems)
        built_teams = [self.teams.team(doc, base) for doc, base in (*inline_teams, *file_teams)]
        self._check_unique(built_teams)
        if settings_doc is None or not settings_ok or self.book is None:
            return None
        return self._config(settings_doc, data, tuple(team for team, _, _ in built_teams))

    def _check(self, doc: Document, kind: str) -> list[JsonPath]:
        """Validate against the schema; the paths of the problems found."""
        if doc.data is None and kind == "team":
            self.problems.append(f"{doc.file}:1: empty file (a team needs `name` and `keys`)")
            return [()]
        canonical = _Canonical(doc.data)
        found = [
            *_schema_problems(kind, canonical),
            *((path, NOT_TEXT) for path in _not_text_in(canonical)),
        ]
        self.problems += [doc.problem(path, message) for path, message in found]
        return [path for path, _ in found]

    def _problem(self, doc: Document, path: JsonPath, message: str) -> None:
        self.problems.append(doc.problem(path, message))

    # -- settings ------------------------------------------------------------

    def _price_book(self, prices: str, doc: Document | None) -> PriceBook | None:
        path = None if prices == "builtin" else self.root / prices
        try:
            return self.load_prices(path)
        except ConfigError as exc:
            # A book that cannot be read has no line of its own: said at the `prices:`
            # line that names it, as every problem is `file:line: message`.
            unread = f"{path}: cannot read: "
            for problem in exc.problems:
                if path is not None and doc is not None and problem.startswith(unread):
                    reason = problem.removeprefix(unread)
                    self._problem(doc, ("prices",), f"cannot read {path}: {reason}")
                else:
                    self.problems.append(problem)
        except OSError as exc:
            if doc is not None:
                what = "the built-in price book" if path is None else str(path)
                self._problem(doc, ("prices",), f"cannot read {what}: {exc.strerror or exc}")
        return None

    def _config(self, doc: Document, data: dict[str, Any], teams: tuple[Team, ...]) -> Config:
        assert self.book is not None
        up = dict(data.get("upstream", {}))
        for optional in ("api_key", "organization", "project"):
            if optional in up:
                up[optional] = up[optional] or None  # an unset ${VAR} turns the setting off
            if isinstance(up.get(optional), str) and not HEADER_TOKEN.fullmatch(up[optional]):
                # Never shown: the key is a secret. Sent in a header, a space or a control
                # character (a secret file's last newline) fails every request or is sent.
                self._problem(
                    doc,
                    ("upstream", optional),
                    "must be printable ASCII without spaces (is there a newline at the end "
                    "of the file or variable it comes from?)",
                )
        if "base_url" in up:
            up["base_url"] = up["base_url"].rstrip("/")
            unusable = _unusable_url(up["base_url"])
            if "@" in _netloc(up["base_url"]):
                # Never shown: the URL holds a secret. The HTTP client would refuse every
                # request (it sends no credentials of a URL beside an Authorization header).
                self._problem(
                    doc,
                    ("upstream", "base_url"),
                    "must not hold credentials (user:password@): the upstream's key is "
                    "upstream.api_key",
                )
            elif unusable is not None:
                # Not shown either: a URL may hold a secret in its path.
                self._problem(doc, ("upstream", "base_url"), unusable)
        base_url = up.get("base_url", UpstreamSettings().base_url)
        host = (_host(base_url) or "").rstrip(".")
        regional = host.endswith(OPENAI_DOMAIN) and host not in GLOBAL_HOSTS
        if regional and up.get("data_residency") is False:
            self._problem(
                doc,
                ("upstream", "data_residency"),
                f"{host} is a data-residency endpoint, where OpenAI bills 10 % above the "
                "price book's rates for models released on or after 2026-03-05: it cannot "
                "be priced at the global rates (remove `data_residency: false`, or use "
                "https://api.openai.com/v1)",
            )
        up["data_residency"] = up.get("data_residency", regional) or regional
        for seconds in ("timeout_s", "total_timeout_s"):
            if seconds in up:
                up[seconds] = float(up[seconds])
        upstream = UpstreamSettings(**up)
        book = self.book.at_data_residency() if upstream.data_residency else self.book
        timezone = data.get("timezone", "UTC")
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            self._problem(doc, ("timezone",), f"unknown time zone {timezone!r}")
        default_model = data.get("default_model", "gpt-image-2")
        self.teams.priced(doc, ("default_model",), default_model)
        limits = self._limits(doc, data.get("limits", {}))
        passthrough = passthrough_prefixes(doc, data.get("passthrough", ()), self.problems)
        al = data.get("alerts", {})
        for index, url in enumerate(al.get("webhooks", ())):
            unusable = _unusable_url(url)
            if unusable is not None:
                # Not shown: a webhook's URL often holds its secret (Slack's, in its path).
                self._problem(doc, ("alerts", "webhooks", index), unusable)
        alerts = Alerts(
            webhooks=tuple(al.get("webhooks", ())),
            timeout_s=float(al.get("timeout_s", Alerts().timeout_s)),
        )
        org = data.get("organization", {})
        admin_token = data.get("admin_token") or None
        self._admin_token(doc, admin_token, teams)
        return Config(
            root=self.root,
            upstream=upstream,
            ledger_url=self._ledger_url(data.get("ledger", "sqlite:///tollgate.db")),
            timezone=timezone,
            admin_token=admin_token,
            prices=book,
            default_model=default_model,
            organization_budgets=self.teams.budgets(doc, ("organization", "budgets"), org),
            organization_rate_limits=self._org_rate_limits(doc, org, teams),
            teams=teams,
            limits=limits,
            passthrough=passthrough,
            alerts=alerts,
            retries=Retries(**data.get("retries", {})),
        )

    def _admin_token(self, doc: Document, token: str | None, teams: tuple[Team, ...]) -> None:
        """The admin token (never shown) is sent in a header, and is no team's key: the
        team holding it would read every team's spend and reload the configuration, and
        the admin would spend as that team."""
        if token is None:
            return
        if not HEADER_TOKEN.fullmatch(token):
            # Clients strip a header's spaces: one with a newline could never be matched.
            self._problem(
                doc,
                ("admin_token",),
                "must be printable ASCII without spaces (is there a newline at the end "
                "of the file or variable it comes from?)",
            )
        elif len(token) < MIN_ADMIN_TOKEN:
            # Whoever guesses it reads every team's spend and reloads the configuration.
            self._problem(
                doc,
                ("admin_token",),
                f"is {len(token)} characters long: use at least {MIN_ADMIN_TOKEN}, random "
                "(e.g. `openssl rand -hex 32`)",
            )
        digest = key_hash(token)
        for team in teams:
            if any(key.sha256 == digest for key in team.keys):
                self._problem(
                    doc, ("admin_token",), f"is a key of team {team.name!r}: use a token of its own"
                )

    def _limits(self, doc: Document, raw: dict[str, Any]) -> Limits:
        values: dict[str, Any] = {
            k: float(v) if k.endswith("_s") else int(v) for k, v in raw.items()
        }
        limits = Limits(**values)
        # Else the largest body allowed would be refused as "overloaded" forever, and retried.
        if limits.inflight_bytes < BODY_COPIES * limits.largest_body():
            path = ("limits", "inflight_bytes") if "inflight_bytes" in raw else ("limits",)
            self._problem(
                doc,
                path,
                f"{limits.inflight_bytes:,} bytes must be at least {BODY_COPIES} "
                f"times the largest body limit ({limits.largest_body():,} bytes): each body "
                f"is counted {BODY_COPIES} times while it is held",
            )
        return limits

    def _ledger_url(self, url: str) -> str:
        if url.startswith("postgres://"):
            return "postgresql://" + url.removeprefix("postgres://")
        if url.startswith("sqlite:///"):
            file = url.removeprefix("sqlite:///")
            if file != ":memory:" and not Path(file).is_absolute():
                return f"sqlite:///{self.root / file}"
        return url

    # -- across files --------------------------------------------------------

    def _org_rate_limits(
        self, doc: Document, org: dict[str, Any], teams: tuple[Team, ...]
    ) -> tuple[RateLimit, ...]:
        """The organization's rate limits; the teams' shares of them must each cover one,
        and those of one limit may not promise more than all of it."""
        path: JsonPath = ("organization", "rate_limits")
        limits = tuple(
            limit
            for index, entry in enumerate(org.get("rate_limits", ()))
            if isinstance(limit := self.teams.rate_limit(doc, (*path, index), entry), RateLimit)
        )
        for team in teams:
            for share in team.rate_shares:
                if not any(share.covers(limit) for limit in limits):
                    what = f"{share.model}'s " if share.model else ""
                    self.problems.append(
                        f"{share.where}: rate_limits: a share of the organization's "
                        f"{what}per-{share.per} rate limits, but `organization.rate_limits` "
                        f"has none"
                    )
        for limit in limits:
            sharing = [(t.name, s.share) for t in teams for s in t.rate_shares if s.covers(limit)]
            if sum(share for _, share in sharing) > 1:
                parts = ", ".join(f"{name} {share}" for name, share in sharing)
                self.problems.append(
                    f"{limit.where}: organization.rate_limits: the teams' shares of this "
                    f"limit add up to more than all of it ({parts})"
                )
        return limits

    def _check_unique(self, teams: list[tuple[Team, Document, JsonPath]]) -> None:
        names: dict[str, str] = {}
        hashes: dict[str, str] = {}
        for team, doc, base in teams:
            if team.name in names:
                message = f"team {team.name!r} is already defined at {names[team.name]}"
                self._problem(doc, (*base, "name"), message)
            names.setdefault(team.name, doc.where((*base, "name")))
            for index, key in enumerate(team.keys):
                path = (*base, "keys", index, "sha256")
                if key.sha256 in hashes:
                    self._problem(doc, path, f"same key hash as {hashes[key.sha256]}")
                hashes.setdefault(key.sha256, doc.where(path))


def _host(url: str) -> str | None:
    """The host `url` names; None when it names none or is no URL."""
    try:
        return urlsplit(url).hostname or None
    except ValueError:
        return None


def _netloc(url: str) -> str:
    """The `user:password@host:port` part of `url`, even of one urlsplit cannot read."""
    try:
        return urlsplit(url).netloc
    except ValueError:
        return re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]


def _unusable_url(url: str) -> str | None:
    """Why no request could be sent to `url`, or None: `https://${OPENAI_HOST}/v1` with the
    variable unset names no host, and `https://[api/v1` or a port past 65535 made `check`
    end in a traceback, or every request fail."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is no port)
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if not parts.hostname:
        return "names no host (is a variable it holds unset?)"
    return None


NOT_TEXT = "NUL characters and lone surrogates are not text (no ledger row or report can hold one)"
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


_MAYBE_NOT_TEXT = re.compile(r"\\u(?:0000|d[89a-f])")


def _not_text_in(canonical: _Canonical) -> list[JsonPath]:
    """`_not_text` of a document, looked for only when its canonical JSON (ASCII: a NUL or
    a surrogate is written `\\u0000`, `\\ud800`) shows one may be there: most files hold
    none, and the search of one string costs less than the walk."""
    if _MAYBE_NOT_TEXT.search(canonical.key) is None:
        return []
    return _not_text(canonical.data, ())


def _not_text(value: Any, path: JsonPath) -> list[JsonPath]:
    """The paths of the strings in `value` that hold a NUL or a lone surrogate (a YAML
    `"\\ud800"`): a team's `cost_center` or key id made every request of the team a 500,
    its ledger row unwritable."""
    if isinstance(value, str):
        return [path] if _NOT_TEXT.search(value) else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _not_text(v, (*path, str(k)))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _not_text(v, (*path, i))]
    return []


class _Canonical:
    """A document's data, equal to another (and hashed alike) when both are written the
    same: its canonical JSON, values JSON lacks (a YAML date) tagged with their type."""

    __slots__ = ("data", "key")

    def __init__(self, data: Any) -> None:
        self.data = data
        self.key = json.dumps(data, sort_keys=True, default=lambda o: [type(o).__name__, repr(o)])

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Canonical) and other.key == self.key


@functools.lru_cache(maxsize=8192)
def _schema_problems(kind: str, doc: _Canonical) -> tuple[tuple[JsonPath, str], ...]:
    """The schema's problems with a document. Remembered: a reload of 1,000 team files
    validates only those that changed (a file found invalid is validated twice, the
    second time by jsonschema at about a millisecond)."""
    return tuple(schema_problems(kind, doc.data))
