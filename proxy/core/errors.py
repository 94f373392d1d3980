"""The one exception tree of Tollgate.

    TollgateError
     ├── ConfigError                 configuration invalid (list of `file:line: message`)
     ├── LedgerError                 the ledger cannot be reached or is unusable
     │    ├── LedgerUnavailable      the database is unreachable right now: retrying may help
     │    │    └── LedgerConnectionLost  a connection broke (closed, reset, ended by the
     │    │                              server): a fresh one may well work at once
     │    ├── NoReservation          a settlement names a request the ledger has no row of
     │    └── LedgerMissing          no ledger where a command that only reads looks for one
     ├── MalformedAnswer             an upstream 2xx body unlike OpenAI's
     ├── RepeatArrived               another attempt of a repeat reserved first: it is
     │                               answered from that one (caught by the pipeline)
     └── RequestError                answered to the client in OpenAI's error shape
          ├── InvalidRequest         400 invalid_request
          │    ├── BatchUnsupported  400 invalid_request: the Batch API does not take the model
          │    └── OtherProject      400 object_in_other_project: the team's former project's
          ├── InvalidConfig          400 invalid_config: a reload refused, the old one stays
          ├── UnpricedModel          400 unpriced_model
          ├── AuthenticationFailed   401 invalid_api_key
          ├── PolicyViolation        403 policy_violation
          ├── NotFound               404 not_found
          │    └── PreviousResponseNotFound  404 previous_response_not_found
          ├── MethodNotAllowed       405 method_not_allowed
          ├── IdempotencyConflict    409 idempotency_conflict
          ├── AnswerNotKept          409 answer_not_kept: a repeat of a charged first attempt
          │                          whose answer is not kept (never sent again)
          ├── RequestTimeout         408 request_timeout
          ├── RequestTooLarge        413 request_too_large
          ├── UnsupportedEncoding    415 unsupported_content_encoding
          ├── BudgetExceeded         429 budget_exceeded
          ├── RateLimited            429 rate_limit_exceeded (retry after `Retry-After`)
          ├── InternalError          500 internal_error
          ├── UpstreamFailure        the upstream gave no answer (`maybe_billed`: after the send)
          │    ├── UpstreamUnavailable    502 upstream_unavailable
          │    └── UpstreamTimeout        504 upstream_timeout
          │         └── DeadlineExceeded  504 upstream_timeout: past `total_timeout_s`
          └── ServiceUnavailable     503 service_unavailable
               ├── Overloaded        503 server_overloaded (retry after a second)
               ├── Superseded        503 configuration_reloaded: a replaced worker that
               │                     could not read the new configuration (retry)
               └── Reloaded          503 configuration_reloaded: reloads landed while the
                                     request was decided, each time it was (retry)

Only the web layer turns a RequestError into an HTTP answer (`proxy.web.responses`);
only the CLI prints a ConfigError and exits.
"""

from __future__ import annotations

from typing import Literal


class TollgateError(Exception):
    """Base of every error Tollgate raises on purpose."""


class ConfigError(TollgateError):
    """The configuration is invalid; `problems` holds one `file:line: message` each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class LedgerError(TollgateError):
    """The ledger is unreachable or its schema is unusable."""


class LedgerUnavailable(LedgerError):
    """The ledger's database cannot be reached right now (a later retry may succeed)."""


class LedgerConnectionLost(LedgerUnavailable):
    """A connection to the ledger's database broke: closed or reset, or ended by the server
    (a restart, `pg_terminate_backend`, a session left idle inside a transaction by a paused
    process, a connection dropped by the network). The pool's other idle connections are
    replaced as well, so a retry on a fresh connection may succeed at once."""


class NoReservation(LedgerError):
    """A settlement named a request the ledger holds no row of (its reservation was never
    written)."""


class LedgerMissing(LedgerError):
    """No ledger at the URL a command that only reads was given (a mistyped path): it is
    not created, which would report an empty history as if it were the real one."""


class MalformedAnswer(TollgateError):
    """The upstream answered 2xx with a body that is not what OpenAI sends."""


class RepeatArrived(TollgateError):
    """A repeat was about to be reserved when the ledger found an attempt of the same request
    (its `Idempotency-Key`, or its content for an SDK retry) that it had not waited for: two
    attempts that arrived together, on two workers or replicas. The reservation is not
    taken; the repeat is answered from that attempt, as if it had arrived after it."""


class RequestError(TollgateError):
    """An error answered to the client as `{"error": {...}}`."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.message = message
        self.param = param
        super().__init__(message)

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(RequestError):
    pass


class BatchUnsupported(InvalidRequest):
    """A batch line for a model the Batch API does not take (its price book entry has no
    `batch:` rates): refused before the file is uploaded."""


class OtherProject(InvalidRequest):
    """A `previous_response_id` or a batch's `input_file_id` naming an object its team
    created under another OpenAI project than the one its requests go under now (its
    `openai_project` changed since): a new request cannot use it (see
    `proxy.web.projects`)."""

    code = "object_in_other_project"


class InvalidConfig(RequestError):
    """A configuration sent to a running Tollgate (a reload) that it refused."""

    code = "invalid_config"


class UnpricedModel(RequestError):
    code = "unpriced_model"


class AuthenticationFailed(RequestError):
    status = 401
    code = "invalid_api_key"

    def __init__(
        self, message: str, *, reason: Literal["missing_key", "invalid_key"] = "invalid_key"
    ) -> None:
        super().__init__(message)
        self.reason = reason
        """Why, in a word, for the metric of refused keys (the message names the key)."""


class PolicyViolation(RequestError):
    status = 403
    code = "policy_violation"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class PreviousResponseNotFound(NotFound):
    """A `previous_response_id` that names no response of the caller's team."""

    code = "previous_response_not_found"


class IdempotencyConflict(RequestError):
    """An `Idempotency-Key` reused with another content."""

    status = 409
    code = "idempotency_conflict"

    def headers(self) -> dict[str, str]:
        # The official SDKs retry 409 unless told not to; the same body conflicts again.
        return {"x-should-retry": "false"}


class AnswerNotKept(RequestError):
    """A repeat of a first attempt that was charged (OpenAI may have billed it) whose
    answer is not kept to be replayed: it is not sent again, which would bill it twice."""

    status = 409
    code = "answer_not_kept"

    def headers(self) -> dict[str, str]:
        # The official SDKs retry 409 unless told not to; the retry would get this again.
        return {"x-should-retry": "false"}


class MethodNotAllowed(RequestError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"allow": ", ".join(self.allowed)}


class RequestTimeout(RequestError):
    """The client stopped sending its body; the connection is closed after the answer."""

    status = 408
    code = "request_timeout"

    def headers(self) -> dict[str, str]:
        # The rest of a stalled body may still arrive: nothing sensible can follow it.
        return {"connection": "close"}


class RequestTooLarge(RequestError):
    status = 413
    code = "request_too_large"


class UnsupportedEncoding(RequestError):
    """A compressed body: Tollgate reads and prices the body itself, so it must be plain."""

    status = 415
    code = "unsupported_content_encoding"


class BudgetExceeded(RequestError):
    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"

    def __init__(
        self, message: str, *, param: str | None = None, remaining_usd: str | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.remaining_usd = remaining_usd
        """The room left in the tightest USD budget, as `x-tollgate-budget-remaining-usd`
        says it on every answer (None: the team has no USD budget)."""

    def headers(self) -> dict[str, str]:
        # The official SDKs retry 429 unless told not to; more money will not appear.
        headers = {"x-should-retry": "false"}
        if self.remaining_usd is not None:
            headers["x-tollgate-budget-remaining-usd"] = self.remaining_usd
        return headers


SDK_LONGEST_WAIT_S = 120
"""The longest `Retry-After` the official SDKs wait out before they retry."""


class RateLimited(RequestError):
    """A team's (or the organization's) rate limit has no room until its window turns.
    `Retry-After` says when: the SDKs wait that long and retry (a wait of a day exceeds
    what they wait, so they give up at once)."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: int,
        metric: str,
        headers: dict[str, str],
        per: str = "minute",
        never: bool = False,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.never = never
        """The request asks more than the limit holds in a whole window: no retry fits."""
        self.metric = metric
        self.per = per
        """The window of the limit that refused: `minute` or `day`."""
        self.rate_headers = headers
        """`x-tollgate-ratelimit-*`: the room of each metric's tightest limit."""

    def headers(self) -> dict[str, str]:
        found = {**self.rate_headers, "retry-after": str(self.retry_after)}
        if self.never or self.retry_after > SDK_LONGEST_WAIT_S:
            # Too large for any window, or a day's limit: no retry will find room soon.
            found["x-should-retry"] = "false"
        return found


class UpstreamFailure(RequestError):
    """No answer from the upstream. `maybe_billed` when the request may have reached it
    (the connection broke or went silent after it was sent): OpenAI bills a generation it
    accepted even if its answer never arrives, so such a request is charged its bound.
    `detail`: what the HTTP client said of the failure, for the log only (it names the
    upstream's host, port and URL, and may quote what the upstream sent)."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        maybe_billed: bool = False,
        detail: str | None = None,
    ) -> None:
        super().__init__(message, param=param)
        self.maybe_billed = maybe_billed
        self.detail = detail

    def headers(self) -> dict[str, str]:
        # The official SDKs retry a 502 or 504: a request that may have been billed would
        # be billed again (its repeats are answered with this failure; see `repeats`).
        return {"x-should-retry": "false"} if self.maybe_billed else {}

    @property
    def ledger_code(self) -> str:
        """The error code its ledger row records."""
        return self.code


class UpstreamUnavailable(UpstreamFailure):
    status = 502
    type = "api_error"
    code = "upstream_unavailable"


class InternalError(RequestError):
    """A fault of Tollgate's own: the traceback is in its log, not in the answer."""

    status = 500
    type = "server_error"
    code = "internal_error"


class ServiceUnavailable(RequestError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class Overloaded(ServiceUnavailable):
    """Tollgate holds as much as it safely can (request bodies in memory, connections)."""

    type = "server_error"
    code = "server_overloaded"

    def headers(self) -> dict[str, str]:
        # Unlike a budget, this clears in moments: the SDKs wait and retry.
        return {"retry-after": "1", "x-should-retry": "true"}


class Superseded(ServiceUnavailable):
    """A request that reached its decision on a worker replaced by a reload (`--workers N`)
    that could not read the new configuration: it would be admitted under the one the reload
    replaced. The SDKs retry it, on a new connection, which a new worker takes."""

    type = "server_error"
    code = "configuration_reloaded"

    def headers(self) -> dict[str, str]:
        return {"x-should-retry": "true", "connection": "close"}


class Reloaded(ServiceUnavailable):
    """A request whose reservation was about to be written under a configuration that a
    reload replaced meanwhile (it waited for the ledger, or for a batch's plan): admitted,
    it would pass a budget lowered or a key revoked by a reload already answered. Nothing
    is reserved or forwarded, and Tollgate decides it again under the new configuration
    (`proxy.web.in_force.decided`); answered only when reloads overtook every attempt, it
    tells the SDKs to retry."""

    type = "server_error"
    code = "configuration_reloaded"

    def headers(self) -> dict[str, str]:
        return {"x-should-retry": "true"}


class UpstreamTimeout(UpstreamFailure):
    status = 504
    type = "api_error"
    code = "upstream_timeout"


class DeadlineExceeded(UpstreamTimeout):
    """The exchange outlived its total deadline: answered as any upstream timeout, recorded
    as `deadline_exceeded`."""

    @property
    def ledger_code(self) -> str:
        return "deadline_exceeded"
