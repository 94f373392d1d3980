"""The request-body budget, the body deadlines of `read_body`, the default connection cap."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from proxy.core.errors import InvalidRequest, Overloaded, RequestTimeout, RequestTooLarge
from proxy.core.settings import Limits
from proxy.metrics import Metrics
from proxy.web import admission
from proxy.web.admission import SCOPE_KEY, BodyBudget, read_body
from proxy.web.connections import default_max_connections
from proxy.web.files import read_form


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def held(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("tollgate_inflight_body_bytes")


def refusals(metrics: Metrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value("tollgate_overload_refusals_total", {"reason": reason})


def test_a_body_is_charged_three_times_its_length_and_given_back_once(metrics: Metrics) -> None:
    budget = BodyBudget(Limits(inflight_bytes=3000), metrics)
    scope: dict[str, Any] = {}
    budget.take(scope, 400)
    budget.take(scope, 100)
    assert budget.held == scope[SCOPE_KEY] == 1500 == held(metrics)
    budget.release(scope)
    budget.release(scope)
    assert budget.held == 0 == held(metrics)
    assert SCOPE_KEY not in scope


def test_a_body_that_would_pass_the_cap_is_refused_and_counted(metrics: Metrics) -> None:
    budget = BodyBudget(Limits(inflight_bytes=3000), metrics)
    first: dict[str, Any] = {}
    budget.take(first, 1000)
    with pytest.raises(Overloaded) as refused:
        budget.take({}, 1)
    assert refused.value.status == 503
    assert refused.value.body()["error"]["code"] == "server_overloaded"
    assert refused.value.body()["error"]["type"] == "server_error"
    assert refused.value.headers() == {"retry-after": "1", "x-should-retry": "true"}
    assert refusals(metrics, "inflight_bytes") == 1
    assert budget.held == 3000
    budget.release(first)
    budget.take({}, 1000)  # room again


def test_reloaded_limits_apply_to_the_next_body(metrics: Metrics) -> None:
    budget = BodyBudget(Limits(inflight_bytes=3000), metrics)
    budget.configure(Limits(inflight_bytes=30, body_idle_timeout_s=1.0))
    with pytest.raises(Overloaded):
        budget.take({}, 11)
    assert budget.idle_s == 1.0


def request(chunks: list[bytes] | None, headers: dict[str, str]) -> Request:
    """A request whose body is `chunks`, then nothing more for ever (None: nothing at all)."""
    pending = list(chunks or [])

    async def receive() -> dict[str, Any]:
        if chunks is not None and pending:
            return {"type": "http.request", "body": pending.pop(0), "more_body": True}
        await asyncio.Event().wait()  # the client stalls
        raise AssertionError("unreachable")

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/images/edits",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive)


async def test_a_stalled_body_is_a_408_and_stays_charged_until_released(metrics: Metrics) -> None:
    budget = BodyBudget(Limits(inflight_bytes=3000, body_idle_timeout_s=0.05), metrics)
    stalled = request([b"x" * 10], {"content-length": "100"})
    with pytest.raises(RequestTimeout) as late:
        await read_body(stalled, 1000, budget)
    assert late.value.status == 408 and late.value.code == "request_timeout"
    assert late.value.headers() == {"connection": "close"}
    assert "after 10 bytes" in late.value.message
    assert refusals(metrics, "body_timeout") == 1
    assert budget.held == 300  # the web layer releases it when the handler returns
    budget.release(stalled.scope)
    assert budget.held == 0


async def test_a_body_trickled_past_the_total_deadline_is_a_408(metrics: Metrics) -> None:
    budget = BodyBudget(Limits(body_idle_timeout_s=60, body_timeout_s=0.2), metrics)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.01)  # always within the idle bound
        return {"type": "http.request", "body": b"x", "more_body": True}

    trickle = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(RequestTimeout):
        await read_body(trickle, 10**9, budget)


async def test_a_declared_body_over_the_cap_is_refused_before_reading(metrics: Metrics) -> None:
    budget = BodyBudget(Limits(inflight_bytes=3000), metrics)
    unread = request(None, {"content-length": "1001"})
    with pytest.raises(Overloaded):
        await read_body(unread, 5000, budget)
    assert budget.held == 0 and SCOPE_KEY not in unread.scope


async def test_a_chunked_body_is_charged_as_it_comes_and_refused_midway(metrics: Metrics) -> None:
    budget = BodyBudget(Limits(inflight_bytes=3000), metrics)
    chunked = request([b"x" * 600, b"x" * 600], {"transfer-encoding": "chunked"})
    with pytest.raises(Overloaded):
        await read_body(chunked, 5000, budget)
    assert budget.held == chunked.scope[SCOPE_KEY] == 1800
    budget.release(chunked.scope)


async def test_a_whole_body_is_read_and_charged_once(metrics: Metrics) -> None:
    budget = BodyBudget(Limits(inflight_bytes=3000), metrics)
    chunks = [b'{"prompt": ', b'"a lighthouse"}']
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    whole = Request(
        {"type": "http", "method": "POST", "headers": [(b"content-length", b"26")]}, receive
    )
    assert await read_body(whole, 1000, budget) == b"".join(chunks)
    assert budget.held == 78


async def test_too_large_and_disconnected_bodies_keep_their_answers(metrics: Metrics) -> None:
    budget = BodyBudget(Limits(inflight_bytes=3000), metrics)
    with pytest.raises(RequestTooLarge):
        await read_body(request(None, {"content-length": "1001"}), 1000, budget)

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    with pytest.raises(InvalidRequest):
        await read_body(Request({"type": "http", "headers": []}, gone), 1000, budget)


@pytest.mark.parametrize(
    ("soft_limit", "expected"), [(1024, 307), (700, 203), (100, 16), (10**9, 8192)]
)
def test_the_default_connection_cap_fits_the_descriptor_limit(
    soft_limit: int, expected: int
) -> None:
    assert default_max_connections(soft_limit) == expected


async def test_a_cancellation_from_elsewhere_is_not_taken_for_a_late_body(
    metrics: Metrics,
) -> None:
    budget = BodyBudget(Limits(body_idle_timeout_s=60), metrics)
    reading = asyncio.ensure_future(read_body(request([], {}), 1000, budget))
    await asyncio.sleep(0)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert refusals(metrics, "body_timeout") is None


async def test_a_late_body_leaves_its_task_free_to_go_on(metrics: Metrics) -> None:
    budget = BodyBudget(Limits(body_idle_timeout_s=0.01), metrics)
    with pytest.raises(RequestTimeout):
        await read_body(request([], {}), 1000, budget)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # no cancellation left pending


@pytest.fixture
def deadlines(monkeypatch: pytest.MonkeyPatch) -> list[admission.BodyDeadline]:
    """Every body deadline made from now on."""
    made: list[admission.BodyDeadline] = []

    class Recorded(admission.BodyDeadline):
        def __init__(self, idle_s: float, total_s: float) -> None:
            super().__init__(idle_s, total_s)
            made.append(self)

    monkeypatch.setattr(admission, "BodyDeadline", Recorded)
    return made


def timer_ended(deadline: admission.BodyDeadline) -> bool:
    return deadline._handle.cancelled()


async def test_a_body_refused_midway_ends_its_deadline_at_once(
    metrics: Metrics, deadlines: list[admission.BodyDeadline]
) -> None:
    """Refused while its reader waits for more, the body's deadline ends with the refusal,
    not once the reader is collected: its timer would otherwise cancel whatever the task
    does next."""
    budget = BodyBudget(Limits(inflight_bytes=3000), metrics)
    chunked = request([b"x" * 600, b"x" * 600, b"x"], {"transfer-encoding": "chunked"})
    with pytest.raises(Overloaded):
        await read_body(chunked, 5000, budget)
    [deadline] = deadlines
    assert timer_ended(deadline)


async def test_an_upload_whose_form_is_refused_ends_its_deadline_at_once(
    metrics: Metrics, deadlines: list[admission.BodyDeadline]
) -> None:
    budget = BodyBudget(Limits(), metrics)
    boundary = "tollgate"
    start = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="purpose"\r\n\r\n'.encode()
        + b"x" * (70 * 1024)  # a field past the form's 64 KiB, the file still to come
    )
    upload = request(
        [start, b"x" * 1024], {"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    runtime = SimpleNamespace(config=SimpleNamespace(limits=Limits()), bodies=budget)
    with pytest.raises(InvalidRequest, match="could not be read"):
        await read_form(upload, runtime)  # type: ignore[arg-type]
    [deadline] = deadlines
    assert timer_ended(deadline)
