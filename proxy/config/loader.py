"""Configuration files → a validated `Config`, or a `ConfigError` listing every problem.

Two passes per file: the JSON Schema (shape, types, unknown keys), then the
checks it cannot express (priced models, quality names, time zone, money exact
to the nano-dollar, duplicates across files). Each problem reads
`file:line: key.path: message`.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.config.fastcheck import schema_problems
from proxy.config.prices import load_price_book
from proxy.config.source import Document, JsonPath, read_document
from proxy.core.errors import ConfigError
from proxy.core.models import NANOS_PER_USD
from proxy.core.paths import TOLLGATE_PATHS, canonical, under
from proxy.core.pricing import MainlinePrices, ModelPrices, PriceBook
from proxy.core.settings import (
    BODY_COPIES,
    KNOBS,
    RATE_METRICS,
    READ_ONLY,
    TOKEN_METRICS,
    Alerts,
    Allow,
    Budget,
    Config,
    Downgrade,
    Limits,
    Metric,
    Passthrough,
    RateLimit,
    RateShare,
    ResponsesPolicy,
    Retries,
    Team,
    TeamKey,
    ThrottleTier,
    UpstreamSettings,
)

# Paths other than the Images API through which OpenAI bills image generation: passthrough
# may read there, never write (a POST would be spend Tollgate did not price).
SPENDING_DOORS = ("/v1/responses", "/v1/batches", "/v1/files")

PriceBookLoader = Callable[[Path | None], PriceBook]

SETTINGS_FILE = "tollgate.yaml"
TEAMS_DIR = "teams"
# Request fields that have their own `allow` setting.
_DEDICATED_PARAMS = {"model": "models", "quality": "max_quality", "n": "max_n", "size": "sizes"}


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    """`$TOLLGATE_CONFIG`, else `./policies`."""
    env = os.environ if env is None else env
    return Path(env.get("TOLLGATE_CONFIG") or "policies")


def load_config(
    path: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    price_book_loader: PriceBookLoader = load_price_book,
) -> Config:
    """Read a configuration directory (tollgate.yaml + teams/*.yaml) or single file.

    Raises ConfigError with every problem found, each `file:line: message`.
    """
    env = os.environ if env is None else env
    given = Path(path)
    if given.is_dir():
        read = _read_directory(given, env)
    elif given.is_file():
        read = _read_file(given, env)
    else:
        raise ConfigError([f"{given}: no such file or directory"])
    builder = _Builder(given.parent if given.is_file() else given, price_book_loader)
    config = builder.build(read.settings, read.teams)
    problems = read.problems + builder.problems
    if problems or config is None:
        in_order = _in_file_order(problems, read.files)
        raise ConfigError(in_order or [f"{given}: invalid configuration"])
    return config


@dataclass
class _Read:
    """The documents of a configuration, the files in reading order, and what was wrong."""

    settings: Document | None
    teams: list[Document] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _read_directory(given: Path, env: Mapping[str, str]) -> _Read:
    """`tollgate.yaml` and every `teams/*.yaml` (or `.yml`), by file name."""
    settings_path = given / SETTINGS_FILE
    read = _Read(None, files=[str(settings_path)])
    if settings_path.is_file():
        read.settings, found = read_document(settings_path, str(settings_path), env)
        read.problems += found
    else:
        read.problems.append(f"{settings_path}: not found (the global settings file)")
    team_files = sorted(
        (p for p in (given / TEAMS_DIR).glob("*") if p.suffix in (".yaml", ".yml") and p.is_file()),
        key=lambda p: p.name,
    )
    for team_file in team_files:
        doc, found = read_document(team_file, str(team_file), env)
        read.files.append(str(team_file))
        read.problems += found
        if doc is not None:
            read.teams.append(doc)
    return read


def _read_file(given: Path, env: Mapping[str, str]) -> _Read:
    """A single file holding the settings and, under `teams:`, every team."""
    doc, found = read_document(given, str(given), env)
    return _Read(doc, files=[str(given)], problems=found)


def _in_file_order(problems: list[str], files: list[str]) -> list[str]:
    """Problems grouped by file (in reading order), then by line."""

    def position(problem: str) -> tuple[int, int]:
        for index, file in enumerate(files):
            if problem.startswith(file + ":"):
                line = problem[len(file) + 1 :].partition(":")[0]
                return index, int(line) if line.isdigit() else 0
        return len(files), 0

    return sorted(problems, key=position)


class _Builder:
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

        built_teams = [self._team(doc, base) for doc, base in (*inline_teams, *file_teams)]
        self._check_unique(built_teams)
        if settings_doc is None or not settings_ok or self.book is None:
            return None
        return self._config(settings_doc, data, tuple(team for team, _, _ in built_teams))

    def _check(self, doc: Document, kind: str) -> list[JsonPath]:
        """Validate against the schema; the paths of the problems found."""
        if doc.data is None and kind == "team":
            self.problems.append(f"{doc.file}:1: empty file (a team needs `name` and `keys`)")
            return [()]
        found = _schema_problems(kind, _Canonical(doc.data))
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
            self.problems += exc.problems
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
        if "base_url" in up:
            up["base_url"] = up["base_url"].rstrip("/")
        for seconds in ("timeout_s", "total_timeout_s"):
            if seconds in up:
                up[seconds] = float(up[seconds])
        upstream = UpstreamSettings(**up)
        timezone = data.get("timezone", "UTC")
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            self._problem(doc, ("timezone",), f"unknown time zone {timezone!r}")
        default_model = data.get("default_model", "gpt-image-2")
        self._priced(doc, ("default_model",), default_model)
        limits = self._limits(doc, data.get("limits", {}))
        passthrough = self._passthrough(doc, data.get("passthrough", ()))
        al = data.get("alerts", {})
        alerts = Alerts(
            webhooks=tuple(al.get("webhooks", ())),
            timeout_s=float(al.get("timeout_s", Alerts().timeout_s)),
        )
        org = data.get("organization", {})
        return Config(
            root=self.root,
            upstream=upstream,
            ledger_url=self._ledger_url(data.get("ledger", "sqlite:///tollgate.db")),
            timezone=timezone,
            admin_token=data.get("admin_token") or None,
            prices=self.book,
            default_model=default_model,
            organization_budgets=self._budgets(doc, ("organization", "budgets"), org),
            organization_rate_limits=self._org_rate_limits(doc, org, teams),
            teams=teams,
            limits=limits,
            passthrough=passthrough,
            alerts=alerts,
            retries=Retries(**data.get("retries", {})),
        )

    def _passthrough(self, doc: Document, entries: list[Any]) -> tuple[Passthrough, ...]:
        """The `passthrough:` prefixes; one that is not a canonical path, or that covers an
        image endpoint (images are never forwarded unmetered), is refused."""
        found: dict[str, Passthrough] = {}
        for index, raw in enumerate(entries):
            where: JsonPath = ("passthrough", index)
            if isinstance(raw, dict):
                where = (*where, "path")
                prefix = str(raw["path"])
                methods = frozenset(raw.get("methods", READ_ONLY))
            else:
                prefix, methods = str(raw), READ_ONLY
            prefix = prefix.removesuffix("/")
            if canonical(prefix.encode()) != prefix:
                self._problem(
                    doc,
                    where,
                    f"{prefix!r} is not a plain path: no '.' or '..' segments, empty "
                    "segments, '%' escapes, backslashes or spaces",
                )
            elif covers(prefix, "/v1/images"):
                self._problem(doc, where, f"{prefix!r} would forward image requests unmetered")
            elif covers(prefix, TOLLGATE_PATHS):
                self._problem(
                    doc, where, f"{prefix!r} would forward {TOLLGATE_PATHS}, Tollgate's own paths"
                )
            elif methods - READ_ONLY and any(covers(prefix, door) for door in SPENDING_DOORS):
                self._problem(
                    doc,
                    where,
                    f"{prefix!r} with {', '.join(sorted(methods - READ_ONLY))} would let image "
                    "spend through unmetered (the Responses image tool, batches and their "
                    "files): only GET and HEAD may be passed through there",
                )
            elif prefix in found:
                self._problem(doc, where, f"{prefix!r} is listed twice")
            else:
                found[prefix] = Passthrough(prefix, methods)
        return tuple(found.values())

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

    # -- teams ---------------------------------------------------------------

    def _team(self, doc: Document, base: JsonPath) -> tuple[Team, Document, JsonPath]:
        raw: dict[str, Any] = doc.data
        for part in base:
            raw = raw[part]  # type: ignore[index]
        allow = self._allow(doc, (*base, "allow"), raw.get("allow", {}))
        dg = raw.get("downgrade", {})
        downgrade = Downgrade(
            order=tuple(dg.get("order", KNOBS)),
            fallback_model=dg.get("fallback_model"),
        )
        if downgrade.fallback_model is not None:
            self._priced(doc, (*base, "downgrade", "fallback_model"), downgrade.fallback_model)
        budgets = self._budgets(doc, (*base, "budgets"), raw)
        rates = [
            self._rate_limit(doc, (*base, "rate_limits", index), entry)
            for index, entry in enumerate(raw.get("rate_limits", ()))
        ]
        team = Team(
            name=raw["name"],
            cost_center=raw.get("cost_center") or None,
            openai_project=raw.get("openai_project"),
            keys=tuple(TeamKey(id=k["id"], sha256=k["sha256"].lower()) for k in raw["keys"]),
            budgets=budgets,
            per_user=self._budgets(doc, (*base, "per_user"), raw),
            allow=allow,
            throttle=self._throttle(doc, base, raw, allow, downgrade, budgets),
            on_exhausted=raw.get("on_exhausted", "downgrade"),
            downgrade=downgrade,
            responses=ResponsesPolicy(**raw.get("responses", {})),
            rate_limits=tuple(limits for limits in rates if isinstance(limits, RateLimit)),
            rate_shares=tuple(share for share in rates if isinstance(share, RateShare)),
            source=doc.file,
        )
        seen: dict[str, int] = {}
        for index, key in enumerate(team.keys):
            if key.id in seen:
                self._problem(
                    doc,
                    (*base, "keys", index, "id"),
                    f"duplicate key id {key.id!r} (also keys[{seen[key.id]}])",
                )
            seen.setdefault(key.id, index)
        return team, doc, base

    def _budgets(self, doc: Document, path: JsonPath, parent: Any) -> tuple[Budget, ...]:
        entries = parent.get(path[-1], []) if isinstance(parent, dict) else []
        return tuple(
            self._budget(doc, (*path, index), entry) for index, entry in enumerate(entries)
        )

    def _budget(self, doc: Document, path: JsonPath, raw: dict[str, Any]) -> Budget:
        metric: Metric = "usd"
        if "limit_usd" in raw:
            limit = self._nanos(doc, (*path, "limit_usd"), raw["limit_usd"])
        else:
            metric = next(m for m in TOKEN_METRICS if m in raw)
            limit = int(raw[metric])
        return Budget(
            period=raw["period"],
            metric=metric,
            limit=limit,
            alert_at=tuple(sorted(Decimal(str(x)) for x in raw.get("alert_at", ()))),
            where=doc.where(path),
        )

    def _rate_limit(
        self, doc: Document, path: JsonPath, raw: dict[str, Any]
    ) -> RateLimit | RateShare:
        model = raw.get("model")
        if model is not None:
            self._priced(doc, (*path, "model"), model, mainline=True)
        if "share" in raw:
            share = Decimal(str(raw["share"]))
            return RateShare(raw["per"], share, model, doc.where(path))
        metric = next(m for m in RATE_METRICS if m in raw)
        return RateLimit(raw["per"], metric, int(raw[metric]), model, doc.where(path))

    def _org_rate_limits(
        self, doc: Document, org: dict[str, Any], teams: tuple[Team, ...]
    ) -> tuple[RateLimit, ...]:
        """The organization's rate limits; the teams' shares of them must each cover one,
        and those of one limit may not promise more than all of it."""
        path: JsonPath = ("organization", "rate_limits")
        limits = tuple(
            limit
            for index, entry in enumerate(org.get("rate_limits", ()))
            if isinstance(limit := self._rate_limit(doc, (*path, index), entry), RateLimit)
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

    def _nanos(self, doc: Document, path: JsonPath, value: float) -> int:
        nanos = Decimal(str(value)) * NANOS_PER_USD
        if nanos != nanos.to_integral_value():
            self._problem(doc, path, f"must be exact to the nano-dollar (9 decimals), got {value}")
        return int(nanos)

    def _allow(self, doc: Document, path: JsonPath, raw: dict[str, Any]) -> Allow:
        models = raw.get("models")
        for index, model in enumerate(models or ()):
            # The Responses API's mainline model is allowed (or not) by the same list.
            self._priced(doc, (*path, "models", index), model, mainline=True)
        candidates = self._models(models)
        if "max_quality" in raw:
            self._quality(doc, (*path, "max_quality"), raw["max_quality"], candidates)
        for index, size in enumerate(raw.get("sizes", ())):
            if size != "auto" and candidates and not any(m.accepts_size(size) for m in candidates):
                message = f"{size!r} is not a size any allowed model accepts"
                self._problem(doc, (*path, "sizes", index), message)
        params: dict[str, frozenset[str]] = {}
        for name, values in raw.get("params", {}).items():
            if name in _DEDICATED_PARAMS:
                self._problem(
                    doc, (*path, "params", name), f"use allow.{_DEDICATED_PARAMS[name]} instead"
                )
            params[name] = frozenset(_as_text(v) for v in values)
        return Allow(
            models=frozenset(models) if models is not None else None,
            endpoints=frozenset(raw["endpoints"]) if "endpoints" in raw else None,
            max_quality=raw.get("max_quality"),
            max_n=raw.get("max_n"),
            sizes=frozenset(raw["sizes"]) if "sizes" in raw else None,
            params=MappingProxyType(params),
        )

    def _throttle(
        self,
        doc: Document,
        base: JsonPath,
        raw: dict[str, Any],
        allow: Allow,
        downgrade: Downgrade,
        budgets: tuple[Budget, ...],
    ) -> tuple[ThrottleTier, ...]:
        entries = raw.get("throttle", [])
        names = [*(allow.models or ()), *filter(None, [downgrade.fallback_model])]
        candidates = self._models(names if allow.models is not None else None)
        tiers: dict[Decimal, int] = {}
        for index, entry in enumerate(entries):
            path = (*base, "throttle", index)
            self._quality(doc, (*path, "max_quality"), entry["max_quality"], candidates)
            above = Decimal(str(entry["above"]))
            if above in tiers:
                self._problem(
                    doc, (*path, "above"), f"duplicate tier {above} (also throttle[{tiers[above]}])"
                )
            tiers.setdefault(above, index)
        if entries and not any(b.metric == "usd" for b in budgets):
            self._problem(
                doc,
                (*base, "throttle"),
                "needs a USD budget in `budgets` (tiers are fractions of the tightest one)",
            )
        found = (ThrottleTier(Decimal(str(e["above"])), e["max_quality"]) for e in entries)
        return tuple(sorted(found, key=lambda t: t.above))

    # -- price-book checks ---------------------------------------------------

    def _priced(self, doc: Document, path: JsonPath, model: str, mainline: bool = False) -> None:
        """A problem unless `model` is an image model of the book (or, with `mainline`, one
        of its mainline text models)."""
        if self.book is None or self.book.find(model) is not None:
            return
        if self.book.find_mainline(model) is not None:
            if not mainline:
                message = f"model {model!r} is a mainline text model; an image model is needed"
                self._problem(doc, path, message)
            return
        known = sorted({*_all_models(self.book), *(_all_mainline(self.book) if mainline else ())})
        close = difflib.get_close_matches(model, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        self._problem(doc, path, f"model {model!r} is not in the price book{hint}")

    def _models(self, names: Iterable[str] | None) -> list[ModelPrices]:
        """The priced models among `names`; every priced model when None."""
        if self.book is None:
            return []
        if names is None:
            return list(_all_models(self.book).values())
        return [m for m in map(self.book.find, names) if m is not None]

    def _quality(
        self, doc: Document, path: JsonPath, quality: str, candidates: list[ModelPrices]
    ) -> None:
        ladder = list(dict.fromkeys(q for m in candidates for q in m.qualities))
        if ladder and quality not in ladder:
            self._problem(
                doc,
                path,
                f"{quality!r} is not a quality of the allowed models (known: {', '.join(ladder)})",
            )

    # -- across files --------------------------------------------------------

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


def _all_models(book: PriceBook) -> Mapping[str, ModelPrices]:
    # The price book's own table; a stand-in without one gets no enumeration.
    models = getattr(book, "models", None)
    return cast(Mapping[str, ModelPrices], models) if isinstance(models, Mapping) else {}


def _all_mainline(book: PriceBook) -> Mapping[str, MainlinePrices]:
    mainline = getattr(book, "mainline", None)
    return cast(Mapping[str, MainlinePrices], mainline) if isinstance(mainline, Mapping) else {}


def _as_text(value: object) -> str:
    """A request value as policy text: booleans as JSON spells them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def covers(prefix: str, path: str) -> bool:
    """Whether passthrough of `prefix` reaches `path` or anything under it (any letter case)."""
    prefix = prefix.lower()
    return (path + "/").startswith(prefix) or under(prefix, path)


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
