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

import asyncio
import contextlib
from collections.abc import AsyncGenerator, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect, Request

from proxy.core.errors import InvalidRequest, Overloaded, RequestTimeout, RequestTooLarge
from proxy.core.settings import BODY_COPIES, Limits
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

    def __init__(self, limits: Limits, metrics: Metrics) -> None:
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
            self._metrics.refused("inflight_bytes")
            raise Overloaded(
                "Tollgate is holding as many request bodies as it safely can; retry in a moment."
            )
        self.held += charge
        scope[SCOPE_KEY] = scope.get(SCOPE_KEY, 0) + charge
        self._metrics.body_bytes.inc(charge)

    def release(self, scope: MutableMapping[str, Any]) -> None:
        """Give back everything the request of `scope` was charged (once; then a no-op)."""
        charge = scope.pop(SCOPE_KEY, 0)
        if charge:
            self.held -= charge
            self._metrics.body_bytes.dec(charge)

    def timed_out(self, received: int) -> RequestTimeout:
        """The answer to a client that stopped sending its body after `received` bytes."""
        self._metrics.refused("body_timeout")
        return RequestTimeout(
            f"The request body was not received in time (after {received:,} bytes; Tollgate "
            f"waits {self.idle_s:g} s between parts and {self.total_s:g} s in all)."
        )


class BodyDeadline:
    """The idle and the total bound of one body, on one timer that cancels the reading task.

        deadline = BodyDeadline(idle_s, total_s)
        try:
            async for chunk in request.stream():
                deadline.progress()
        except asyncio.CancelledError:
            if not deadline.expired:
                raise
            ...  # the body is late: 408
        finally:
            deadline.close()

    Cheaper than `asyncio.timeout` rescheduled per chunk: this one timer is set once and
    moved only when it fires after data came (README, "Benchmarks"). The timer can only fire
    while the task waits for a chunk, so its cancellation always lands in that wait.
    """

    __slots__ = ("_end", "_handle", "_idle_s", "_last", "_loop", "_task", "expired")

    def __init__(self, idle_s: float, total_s: float) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "a deadline is for the task reading the body"
        now = loop.time()
        self._loop, self._task, self._idle_s = loop, task, idle_s
        self._end = now + total_s
        self._last = now
        self.expired = False
        self._handle = loop.call_at(min(self._end, now + idle_s), self._check)

    def progress(self) -> None:
        """Data came: the idle bound counts from now."""
        self._last = self._loop.time()

    def close(self) -> None:
        """The body is read (or reading stopped); an expired deadline's cancel is undone."""
        self._handle.cancel()
        if self.expired:
            self._task.uncancel()

    def _check(self) -> None:
        due = min(self._end, self._last + self._idle_s)
        if self._loop.time() < due:  # data came since the timer was set
            self._handle = self._loop.call_at(due, self._check)
            return
        self.expired = True
        self._task.cancel()


async def read_body(request: Request, limit: int, budget: BodyBudget) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes, with 503 when
    it would pass the bytes `budget` lets the process hold (before it is read when its
    length is declared), with 408 when the client pauses or takes too long sending it.

    What `budget` charges stays in the request's scope until the web layer releases it."""
    scope = request.scope
    charged = declared_length(request, limit)
    if charged is not None:
        budget.take(scope, charged)
    else:
        charged = 0
    chunks: list[bytes] = []
    size = 0
    # Closed as soon as the loop ends, whatever ends it: its deadline's timer with it.
    async with contextlib.aclosing(body_chunks(request, limit, budget)) as body:
        async for chunk in body:
            size += len(chunk)
            if size > charged:  # a chunked body: charged as it comes
                budget.take(scope, size - charged)
                charged = size
            chunks.append(chunk)
    return b"".join(chunks)


async def body_chunks(
    request: Request, limit: int, budget: BodyBudget
) -> AsyncGenerator[bytes, None]:
    """The request body chunk by chunk, refused with 413 once it passes `limit` bytes (at
    once when its declared length does), 408 when the client pauses or takes too long. For
    a body that is spooled to disk rather than held (a file upload), only the chunk in hand
    is in memory, so nothing is charged to `budget`'s cap (`read_body` charges what it
    holds). Close it when done (`contextlib.aclosing`): its deadline ends with it."""
    declared_length(request, limit)
    size = 0
    deadline = BodyDeadline(budget.idle_s, budget.total_s)
    try:
        async for chunk in request.stream():
            deadline.progress()
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            yield chunk
    except ClientDisconnect:
        raise InvalidRequest("The client disconnected before sending the whole body.") from None
    except asyncio.CancelledError:
        if not deadline.expired:
            raise
        raise budget.timed_out(size) from None
    finally:
        deadline.close()


def declared_length(request: Request, limit: int) -> int | None:
    """The body's declared `Content-Length` (None when it declares none, or not as digits:
    the body is then bounded as it comes); 413 when it passes `limit`."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        return None
    length = int(declared)
    if length > limit:
        raise too_large(limit)
    return length


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"Request body is larger than the {limit:,} bytes Tollgate accepts on this endpoint."
    )
