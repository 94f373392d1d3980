"""Request bodies held in memory: a cap on their bytes in one process, and how long one may take.

A body is read whole before it is priced (the image sizes are in it), and until the request
is answered the process holds it, its parsed copy and, when a field is downgraded, the body
re-encoded: about `BODY_COPIES` times its length. Without a cap, 200 concurrent 20 MiB edits
held 4.65 GB; at the 128 MiB an edit may weigh, as many would hold tens of GiB.

`BodyBudget` charges a body `BODY_COPIES` times its declared Content-Length before reading
it (a chunked body, as its chunks arrive) and refuses with 503 `server_overloaded` a body
that would pass `limits.inflight_bytes`. The charge is written in the request's ASGI scope,
and the web layer gives it back in one `finally` when the handler is done with the body,
whatever ended the request: an answer, an error, a client gone, a cancelled task.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from proxy.config import Limits
from proxy.config.settings import BODY_COPIES
from proxy.errors import Overloaded, RequestTimeout
from proxy.metrics import Metrics

SCOPE_KEY = "tollgate.body_bytes"
"""The bytes a request is charged, in its ASGI scope."""


class BodyBudget:
    """The request-body bytes held by one process, against `limits.inflight_bytes`.

    budget.take(scope, content_length)   # raises Overloaded past the cap
    ...                                  # read, parse, forward, answer
    budget.release(scope)                # in a finally: gives back what scope holds
    """

    __slots__ = ("_metrics", "cap", "held", "idle_s", "total_s")

    def __init__(self, limits: Limits, metrics: Metrics | None = None) -> None:
        self.held = 0
        self._metrics = metrics
        self.configure(limits)

    def configure(self, limits: Limits) -> None:
        """Apply reloaded limits; bodies already charged keep their charge."""
        self.cap = limits.inflight_bytes
        self.idle_s = limits.body_idle_timeout_s
        self.total_s = limits.body_timeout_s

    def take(self, scope: MutableMapping[str, Any], length: int) -> None:
        """Charge `length` more body bytes to the request of `scope`, or refuse it."""
        charge = length * BODY_COPIES
        if self.held + charge > self.cap:
            if self._metrics is not None:
                self._metrics.refused("inflight_bytes")
            raise Overloaded(
                "Tollgate is holding as many request bodies as it safely can; retry in a moment."
            )
        self.held += charge
        scope[SCOPE_KEY] = scope.get(SCOPE_KEY, 0) + charge
        if self._metrics is not None:
            self._metrics.body_bytes.inc(charge)

    def release(self, scope: MutableMapping[str, Any]) -> None:
        """Give back everything the request of `scope` was charged (once; then a no-op)."""
        charge = scope.pop(SCOPE_KEY, 0)
        if charge:
            self.held -= charge
            if self._metrics is not None:
                self._metrics.body_bytes.dec(charge)

    def timed_out(self, received: int) -> RequestTimeout:
        """The answer to a client that stopped sending its body after `received` bytes."""
        if self._metrics is not None:
            self._metrics.refused("body_timeout")
        return RequestTimeout(
            f"The request body was not received in time (after {received:,} bytes; Tollgate "
            f"waits {self.idle_s:g} s between parts and {self.total_s:g} s in all)."
        )
