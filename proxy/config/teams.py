"""A team's values from its schema-checked document: keys, budgets, rate limits, allow,
throttle and downgrade, each model and quality checked against the price book.

`proxy.config.builder` asks it for the teams, and for the organization's budgets and rate
limits (written as a team's are) and its default model; problems are collected, not raised.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Any, cast

from proxy.config.source import Document, JsonPath
from proxy.core.image_params import PARAMS, TOOL_CHOICES
from proxy.core.models import NANOS_PER_USD
from proxy.core.pricing import MainlinePrices, ModelPrices, PriceBook
from proxy.core.settings import (
    KNOBS,
    RATE_METRICS,
    TOKEN_METRICS,
    Allow,
    Budget,
    Downgrade,
    Metric,
    RateLimit,
    RateShare,
    ResponsesPolicy,
    Team,
    TeamKey,
    ThrottleTier,
)

# Request fields that have their own `allow` setting.
_DEDICATED_PARAMS = {"model": "models", "quality": "max_quality", "n": "max_n", "size": "sizes"}
_PARAM_NAMES = frozenset(PARAMS) - {"prompt", *_DEDICATED_PARAMS} | frozenset(TOOL_CHOICES)
"""What `allow.params` may name: the Images API's parameters and the image tool's choices."""


class TeamBuilder:
    """Turns a team's schema-checked document into a frozen `Team` (and budgets, rate limits
    and model names wherever written into theirs), adding each problem found to `problems`,
    the builder's list; `book` is None when the price book could not be read."""

    def __init__(self, book: PriceBook | None, problems: list[str]) -> None:
        self.book = book
        self.problems = problems

    def _problem(self, doc: Document, path: JsonPath, message: str) -> None:
        self.problems.append(doc.problem(path, message))

    def team(self, doc: Document, base: JsonPath) -> tuple[Team, Document, JsonPath]:
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
            self.priced(doc, (*base, "downgrade", "fallback_model"), downgrade.fallback_model)
            self._fallback_allowed(doc, (*base, "downgrade", "fallback_model"), allow, downgrade)
        budgets = self.budgets(doc, (*base, "budgets"), raw)
        rates = [
            self.rate_limit(doc, (*base, "rate_limits", index), entry)
            for index, entry in enumerate(raw.get("rate_limits", ()))
        ]
        team = Team(
            name=raw["name"],
            cost_center=raw.get("cost_center") or None,
            openai_project=raw.get("openai_project"),
            keys=tuple(TeamKey(id=k["id"], sha256=k["sha256"].lower()) for k in raw["keys"]),
            budgets=budgets,
            per_user=self.budgets(doc, (*base, "per_user"), raw),
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

    def budgets(self, doc: Document, path: JsonPath, parent: Any) -> tuple[Budget, ...]:
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

    def rate_limit(
        self, doc: Document, path: JsonPath, raw: dict[str, Any]
    ) -> RateLimit | RateShare:
        model = raw.get("model")
        if model is not None:
            self.priced(doc, (*path, "model"), model, mainline=True)
        if "share" in raw:
            share = Decimal(str(raw["share"]))
            return RateShare(raw["per"], share, model, doc.where(path))
        metric = next(m for m in RATE_METRICS if m in raw)
        return RateLimit(raw["per"], metric, int(raw[metric]), model, doc.where(path))

    def _nanos(self, doc: Document, path: JsonPath, value: float) -> int:
        written = doc.written.get(path)  # as written: a float may hold fewer digits
        amount = Decimal(written.replace("_", "")) if written is not None else Decimal(str(value))
        nanos = amount * NANOS_PER_USD
        if nanos != nanos.to_integral_value():
            shown = written if written is not None else value
            self._problem(doc, path, f"must be exact to the nano-dollar (9 decimals), got {shown}")
        return int(nanos)

    def _allow(self, doc: Document, path: JsonPath, raw: dict[str, Any]) -> Allow:
        models = raw.get("models")
        for index, model in enumerate(models or ()):
            # The Responses API's mainline model is allowed (or not) by the same list.
            self.priced(doc, (*path, "models", index), model, mainline=True)
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
            elif name not in _PARAM_NAMES:
                # A rule on a name no request carries never applies: `moderatoin: [auto]`
                # left `moderation` open.
                close = difflib.get_close_matches(name, sorted(_PARAM_NAMES), n=1)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else "known: " + ", ".join(sorted(_PARAM_NAMES))
                )
                self._problem(
                    doc, (*path, "params", name), f"not a request parameter Tollgate reads ({hint})"
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

    def _fallback_allowed(
        self, doc: Document, path: JsonPath, allow: Allow, downgrade: Downgrade
    ) -> None:
        """A problem unless `allow.models` lets the team use its fallback model: a downgrade
        must never send a model the team's policy refuses when asked for directly."""
        name = downgrade.fallback_model
        if name is None or allow.models is None or name in allow.models:
            return
        found = self.book.find(name) if self.book is not None else None
        if found is not None and found.name in allow.models:
            return
        self._problem(
            doc,
            path,
            f"model {name!r} is not in allow.models ({', '.join(sorted(allow.models))}): a "
            "downgrade would send a model the team may not use; add it to allow.models or "
            "choose one of them",
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

    def priced(self, doc: Document, path: JsonPath, model: str, mainline: bool = False) -> None:
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
