"""Observe a finished request: its metrics and its one structured log line; and the
requests refused for their key, which are only counted."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Container

from starlette.requests import Request
from starlette.responses import Response

from proxy.core.auth import WORD, bearer_token, carries_key, identify, key_hash
from proxy.core.errors import AuthenticationFailed
from proxy.core.models import Change, Entry, Outcome, Settlement, usd_text
from proxy.core.pricing import AUTO, PriceBook
from proxy.core.settings import Team, TeamKey
from proxy.web.gateway import path_of
from proxy.web.responses import error_response
from proxy.web.runtime import Runtime

log = logging.getLogger("tollgate.requests")
KEY_REFUSALS_LOG_EVERY_S = 10.0


def observe(
    runtime: Runtime, entry: Entry, settlement: Settlement, changes: tuple[Change, ...]
) -> None:
    """Count a finished request in the metrics and write its log line."""
    prices = runtime.config.prices
    runtime.metrics.finished(
        entry,
        settlement,
        changes,
        priced=lambda m: prices.find(m) is not None or prices.find_mainline(m) is not None,
        listed=lambda m, size: listed_size(prices, m, size),
    )
    log_request(entry, settlement)


POPULAR_SIZES = frozenset(
    {"1024x1024", "1536x1024", "1024x1536", "2048x2048", "2048x1152", "3840x2160", "2160x3840"}
)
"""The sizes OpenAI's guide names as popular for the models that take any size."""


def listed_size(prices: PriceBook, model: str, size: str) -> bool:
    """Whether `size` is `auto`, one of the sizes `model` lists, or a popular one: the
    images metric keeps its label, where any other (an arbitrary size) would make a series
    of its own."""
    found = prices.find(model)
    return found is None or size == AUTO or size in found.sizes or size in POPULAR_SIZES


def log_request(entry: Entry, settlement: Settlement) -> None:
    """One structured line per request: never a key, a prompt or image data. A Responses
    request names its mainline model and the part of its cost that model's tokens are."""
    if log.isEnabledFor(logging.INFO):
        log.info(request_line(entry, settlement))


# The line's keys and their order never change: the template spells them once, and each
# value is encoded alone, which takes half the time `json.dumps` of a dict takes (2.1 vs
# 4.4 µs). `tests/test_observe.py` holds it equal to `json.dumps` of the same values.
_LINE = "{" + ", ".join(f'"{key}": %s' for key in (
    "request_id", "upstream_request_id", "team", "key_id", "endpoint", "model_requested",
    "model", "mainline_model", "quality_requested", "quality", "size_requested", "size",
    "n_requested", "n", "stream", "downgrades", "outcome", "status", "error_code", "cost_usd",
    "mainline_cost_usd", "estimated_usd", "flagged", "latency_ms",
)) + "}"  # fmt: skip
_quoted = json.encoder.encode_basestring_ascii


def _text(value: str | None) -> str:
    return "null" if value is None else _quoted(value)


def _number(value: float | None) -> str:
    if value is None:
        return "null"
    return repr(value) if math.isfinite(value) else json.dumps(value)


def request_line(entry: Entry, settlement: Settlement) -> str:
    """The JSON log line of a finished request (see `log_request`)."""
    mainline = entry.mainline_model
    return _LINE % (
        _text(entry.id), _text(settlement.upstream_request_id), _text(entry.team),
        _text(entry.key_id), _text(entry.endpoint), _text(entry.model_requested),
        _text(entry.model), _text(mainline), _text(entry.quality_requested),
        _text(entry.quality), _text(entry.size_requested), _text(entry.size),
        _number(entry.n_requested), _number(entry.n), "true" if entry.stream else "false",
        _text(entry.downgrades or None),
        _text(settlement.outcome), _number(settlement.status), _text(settlement.error_code),
        _quoted(usd_text(settlement.cost_nanos)),
        _quoted(usd_text(settlement.mainline_cost_nanos)) if mainline else "null",
        _quoted(usd_text(entry.estimated_nanos)), "true" if settlement.flagged else "false",
        _number(round(settlement.latency_ms, 1)),
    )  # fmt: skip


def log_unmetered(
    request_id: str,
    team: str,
    key_id: str,
    endpoint: str,
    request: Request,
    response: Response,
    outcome: Outcome,
    error_code: str | None,
    started: float,
    keys: Container[str] = (),
) -> None:
    """The line of a request that leaves no row in the ledger: one forwarded under
    `passthrough:` (`endpoint` "passthrough", its cost null: unmetered), or one on a team's
    own objects (a listing, an upload, a file's, a batch's or a stored response's path,
    free). Which team sent what with the company key, and OpenAI's id for it, are in the
    log as for every other request; no key is (`logged_path`: `keys`, the hashes of the
    teams' keys)."""
    if not log.isEnabledFor(logging.INFO):
        return
    line = {
        "request_id": request_id,
        "upstream_request_id": response.headers.get("x-request-id"),
        "team": response.headers.get("x-tollgate-team", team), "key_id": key_id,
        "endpoint": endpoint, "method": request.method, "path": logged_path(request, keys),
        "outcome": outcome, "status": response.status_code, "error_code": error_code,
        "cost_usd": response.headers.get("x-tollgate-cost-usd"),
        "latency_ms": round((time.monotonic() - started) * 1000, 1),
    }  # fmt: skip
    log.info(json.dumps(line))


def logged_path(request: Request, keys: Container[str] = ()) -> str:
    """The path of `request` as its log line shows it: without the client's own key, nor
    any team's (a word whose hash is in `keys`), which a client may have written into it
    (`GET /v1/models/tg_...`, refused) and which no log line shows. A path that still
    carries one, encoded in a way no word of it spells, is not shown at all."""
    path = path_of(request)
    token = bearer_token(request.headers.get("authorization"))
    if token and len(token) >= 8:
        path = path.replace(token, REDACTED)
    if keys:
        path = WORD.sub(lambda m: REDACTED if key_hash(m[0]) in keys else m[0], path)
    if carries_key(path, token, keys):
        return "(a path that holds a key, not shown)"
    return path


REDACTED = "[redacted]"


def unmetered_outcome(response: Response, error_code: str | None) -> Outcome:
    """`ok`; `upstream_error` for an error the upstream answered; else `client_error`."""
    if response.status_code < 400:
        return "ok"
    return (
        "upstream_error"
        if error_code is None and "x-request-id" in response.headers
        else ("client_error")
    )


class KeyRefusals:
    """Requests refused for a missing or unknown key: anyone can send them, as fast as they
    like, so they are counted in a metric and a throttled log line, never in the ledger
    (a ledger row each grew the database by ~9 kB per refused request)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._unlogged = 0
        self._next_log = 0.0

    def key_of(
        self, request: Request, runtime: Runtime, headers: dict[str, str]
    ) -> tuple[Team, TeamKey] | Response:
        """The team and key the request carries (the team named in `headers`), or the
        refusal to answer when it carries no key Tollgate knows."""
        try:
            team, key = identify(
                request.headers.get("authorization"), runtime.config.team_by_key_hash()
            )
        except AuthenticationFailed as exc:
            return self.refuse(request, exc, headers, runtime)
        headers["x-tollgate-team"] = team.name
        return team, key

    def team_of(
        self, request: Request, runtime: Runtime, headers: dict[str, str]
    ) -> Team | Response:
        """The team whose key the request carries, or the refusal (see `key_of`)."""
        found = self.key_of(request, runtime, headers)
        return found if isinstance(found, Response) else found[0]

    def refuse(
        self,
        request: Request,
        exc: AuthenticationFailed,
        headers: dict[str, str],
        runtime: Runtime,
    ) -> Response:
        runtime.metrics.unauthenticated(self.endpoint, exc.reason)
        self._unlogged += 1
        now = time.monotonic()
        if now >= self._next_log:
            # The key itself is never logged, not even redacted.
            client = request.client.host if request.client else "?"
            log.warning(
                "refused %d request(s) on %s for their key in the last %.0f s "
                "(latest: %s from %s)",
                self._unlogged, self.endpoint, KEY_REFUSALS_LOG_EVERY_S, exc.reason, client,
            )  # fmt: skip
            self._unlogged = 0
            self._next_log = now + KEY_REFUSALS_LOG_EVERY_S
        return error_response(exc, {**headers, "x-tollgate-cost-usd": "0"})
