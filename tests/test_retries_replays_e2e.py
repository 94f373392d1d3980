"""Retries never pay twice, for what a replay says and for firsts that were charged: a replay
carries the Tollgate headers its first answer carried (a stream's reserved cost and room
left included) and a date of its own; a repeat of a first that was charged is never sent
again, whether its stream broke off after it was sent (it is replayed as its client got
it) or its answer was not kept (`409 answer_not_kept`).

Through the official Python SDK where a client would send the request; raw POSTs where the
case is an SDK's retry that the SDK itself cannot be made to send at that moment.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import (
    DEADLINE_S,
    DEFAULT_TEAMS,
    DESIGN_KEY,
    Simulator,
    Tollgate,
    key_hash,
    run_tollgate,
    wait_for,
)
from tests.retries_e2e import (
    LATENCY_MS,
    TOOL,
    body,
    clean,
    configure,
    fresh,
    in_background,
    post,
    sdk,
    settled,
    sim,
)

__all__ = ["clean", "fresh", "sim"]  # the shared fixtures

STORE_BYTES = 400_000
"""What is kept for repeats in all: an answer padded past it is not kept."""
TEAMS = {
    **DEFAULT_TEAMS,
    "design": f"""
        name: design
        keys:
          - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}
        budgets:
          - {{period: month, limit_usd: 900}}
    """,
}
IMAGES, RESPONSES = "/v1/images/generations", "/v1/responses"


@pytest.fixture(scope="module")
def gate(sim: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("replays")
    settings = f"retries: {{store_bytes: {STORE_BYTES}}}\n"
    configure(root, sim, settings, timeout_s=10, teams=TEAMS)
    yield from run_tollgate(root)


def forwarded(sim: Simulator, path: str) -> list[dict[str, Any]]:
    """The requests that reached the upstream at `path` (`IMAGES`, `RESPONSES`)."""
    found = httpx.get(f"{sim.url}/_sim/arrivals").json()["requests"]
    return [a for a in found if a["method"] == "POST" and a["raw_path"] == path]


def asked(kind: str, prompt: str, stream: bool) -> dict[str, Any]:
    """The keyword arguments of the SDK's call for `kind`."""
    if kind == "images":
        extra: dict[str, Any] = {"stream": True, "partial_images": 1} if stream else {}
        return {**body(prompt), **extra}
    return {
        "model": "gpt-5.5",
        "input": prompt,
        "tools": [TOOL],
        "max_output_tokens": 300,
        "max_tool_calls": 1,
        **({"stream": True} if stream else {}),
    }


def call(client: openai.OpenAI, kind: str, arguments: dict[str, Any], key: str) -> Any:
    """The SDK's raw response to one call, sent with the `Idempotency-Key` `key`."""
    headers = {"Idempotency-Key": key}
    if kind == "images":
        return client.images.with_raw_response.generate(**arguments, extra_headers=headers)
    return client.responses.with_raw_response.create(**arguments, extra_headers=headers)


def event_types(parsed: Any) -> list[str]:
    """The types of a stream's events, read to its end (its error event raised, as the SDK
    raises it, recorded as `error`)."""
    seen = []
    try:
        for event in parsed:
            seen.append(event.type)
    except openai.APIError:
        seen.append("error")
    return seen


def tollgates(headers: httpx.Headers) -> dict[str, str]:
    """The Tollgate headers an answer carries for what it cost and changed: its own request
    id, cost, and the rate limits' room now excepted."""
    own = ("x-tollgate-request-id", "x-tollgate-cost-usd", "x-tollgate-replay-of")
    return {
        k: v
        for k, v in headers.items()
        if k.startswith("x-tollgate-")
        and k not in own
        and not k.startswith("x-tollgate-ratelimit-")
    }


# -- 1. what a replay says --------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("kind", ["images", "responses"])
def test_a_replay_carries_the_tollgate_headers_of_its_first_and_a_date_of_its_own(
    clean: Tollgate, sim: Simulator, kind: str, stream: bool
) -> None:
    client = sdk(clean, timeout=DEADLINE_S, max_retries=0)
    arguments = asked(kind, f"A {kind} replay, {'streamed' if stream else 'whole'}", stream)
    key = f"headers-{kind}-{stream}"
    first = call(client, kind, arguments, key)
    events = event_types(first.parse()) if stream else None
    settled(clean, 1)
    sent_at = math.floor(time.time())
    again = call(client, kind, arguments, key)
    if stream:
        assert event_types(again.parse()) == events
    else:
        assert again.http_response.content == first.http_response.content
    assert again.headers["x-tollgate-replay-of"] == first.headers["x-tollgate-request-id"]
    assert again.headers["x-tollgate-cost-usd"] == "0"
    said = tollgates(first.headers)
    # What the first said of its cost: a stream, its reservation; a whole answer, its cost.
    if stream:
        assert Decimal(said["x-tollgate-reserved-usd"]) > 0
    else:
        assert Decimal(first.headers["x-tollgate-cost-usd"]) > 0
    assert "x-tollgate-budget-remaining-usd" in said
    assert tollgates(again.headers) == said
    dates = again.http_response.headers.get_list("date")
    assert len(dates) == 1 and dated(dates[0]) >= sent_at, dates
    assert len(forwarded(sim, IMAGES if kind == "images" else RESPONSES)) == 1


def dated(value: str) -> int:
    """The POSIX second of a `date` header."""
    return int(email.utils.parsedate_to_datetime(value).timestamp())


def test_a_repeat_that_waited_for_its_first_is_dated_when_it_is_answered(
    clean: Tollgate, sim: Simulator
) -> None:
    """The repeat arrives while its first renders, and is answered once the first ends: its
    date is then, not the second it arrived (nor its first's)."""
    sim.configure(latency_ms=LATENCY_MS)
    client = sdk(clean, timeout=DEADLINE_S, max_retries=0)
    arguments, key = asked("images", "A lock keeper, waited for", False), "waited"
    started = time.time()
    first = in_background(lambda: call(client, "images", arguments, key))
    wait_for("the first in flight", lambda: clean.rows() or None)
    again = call(client, "images", arguments, key)
    answered = first.result(timeout=DEADLINE_S)
    assert again.headers["x-tollgate-replay-of"] == answered.headers["x-tollgate-request-id"]
    # The first's answer cannot come before the simulator rendered it, nor its replay.
    rendered = math.floor(started + LATENCY_MS / 1000)
    for answer in (answered, again):
        dates = answer.http_response.headers.get_list("date")
        assert len(dates) == 1 and dated(dates[0]) >= rendered, (dates, rendered)
    assert len(forwarded(sim, IMAGES)) == 1


# -- 2. a stream broken off after it was sent ------------------------------------------


@pytest.mark.parametrize("kind", ["images", "responses"])
def test_a_keyed_repeat_of_a_stream_that_broke_off_is_replayed_never_sent_again(
    clean: Tollgate, sim: Simulator, kind: str
) -> None:
    client = sdk(clean, timeout=DEADLINE_S, max_retries=0)
    arguments = asked(kind, "A quay [[fault:truncate]]", stream=True)
    key = f"broken-{kind}"
    first = call(client, kind, arguments, key)
    events = event_types(first.parse())
    assert events[-1] == "error", events
    first_id = first.headers["x-tollgate-request-id"]
    if kind == "images":
        row = settled(clean, 1)[0]
        assert (row["outcome"], row["status"], row["flagged"]) == ("upstream_error", 200, 1)
        assert row["cost_nanos"] == row["estimated_nanos"] > 0  # its bound: unchanged
    else:
        # The response it named is followed to its end, and charged what it billed.
        settled(clean, 1)
    path = IMAGES if kind == "images" else RESPONSES
    assert len(forwarded(sim, path)) == 1
    again = call(client, kind, arguments, key)
    assert event_types(again.parse()) == events
    assert again.headers["x-tollgate-replay-of"] == first_id
    assert len(forwarded(sim, path)) == 1, "the repeat of a charged stream was sent again"
    rows = settled(clean, 2)
    repeat = next(r for r in rows if r["id"] == again.headers["x-tollgate-request-id"])
    assert (repeat["outcome"], repeat["cost_nanos"]) == ("replayed", 0)


def test_a_repeat_following_a_stream_that_breaks_off_ends_as_its_first_did(
    clean: Tollgate, sim: Simulator
) -> None:
    """The repeat arrives while the first streams, follows it live, and when the upstream
    breaks off gets the error event the first's client got; nothing is sent again."""
    sim.configure(latency_ms=3000)
    client = sdk(clean, timeout=DEADLINE_S, max_retries=0)
    arguments = asked("images", "A jetty [[fault:truncate]], followed", stream=True)
    seen: list[str] = []

    def first_stream() -> tuple[Any, list[str]]:
        raw = call(client, "images", arguments, "followed-broken")
        got = []
        try:
            for event in raw.parse():
                got.append(event.type)
                seen.append(event.type)
        except openai.APIError as exc:
            got.append(f"error: {exc.message}")
        return raw, got

    first = in_background(first_stream)
    wait_for("the first's first event", lambda: seen or None)
    again = call(client, "images", arguments, "followed-broken")
    followed = []
    try:
        for event in again.parse():
            followed.append(event.type)
    except openai.APIError as exc:
        followed.append(f"error: {exc.message}")
    raw, got = first.result(timeout=DEADLINE_S)
    assert got[-1].startswith("error: The upstream's stream broke off"), got
    assert followed == got
    assert again.headers["x-tollgate-replay-of"] == raw.headers["x-tollgate-request-id"]
    assert len(forwarded(sim, IMAGES)) == 1


def raw_stream(gate: Tollgate, prompt: str, retry: int, timeout: float) -> httpx.Response | None:
    """A stream as the SDK sends it (its retry count `retry`), read to its end; None when
    the client gave up first (its connection then closed: the client is gone)."""
    asked = {**body(prompt), "stream": True, "partial_images": 1}
    return post(gate, asked, retry=retry, timeout=timeout)


def test_an_sdk_retry_of_a_stream_that_broke_off_after_its_client_left_is_replayed(
    clean: Tollgate, sim: Simulator
) -> None:
    """The SDK gave up on the first attempt (its client gone, so its stream was kept), and
    its retry comes after the stream broke off."""
    sim.configure(latency_ms=2000)
    prompt = "A mooring [[fault:truncate]]"
    assert raw_stream(clean, prompt, 0, timeout=0.5) is None
    first = settled(clean, 1)[0]
    assert (first["outcome"], first["status"]) == ("upstream_error", 200)
    assert first["cost_nanos"] > 0
    again = raw_stream(clean, prompt, 1, timeout=DEADLINE_S)
    assert again is not None
    assert again.headers["x-tollgate-replay-of"] == first["id"]
    assert "event: error" in again.text and "partial_image" in again.text
    assert len(forwarded(sim, IMAGES)) == 1, "the retry of a charged stream was sent again"


def test_an_sdk_retry_of_a_stream_that_broke_off_under_its_client_is_not_sent_again(
    clean: Tollgate, sim: Simulator
) -> None:
    """Its client read the broken stream to its end: nothing was kept, and a retry that
    finds it is answered `409 answer_not_kept`, never forwarded."""
    prompt = "A slipway [[fault:truncate]]"
    first = raw_stream(clean, prompt, 0, timeout=DEADLINE_S)
    assert first is not None and "event: error" in first.text
    settled(clean, 1)
    again = raw_stream(clean, prompt, 1, timeout=DEADLINE_S)
    assert again is not None
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "answer_not_kept"
    assert again.headers["x-should-retry"] == "false"
    assert again.headers["x-tollgate-replay-of"] == first.headers["x-tollgate-request-id"]
    assert len(forwarded(sim, IMAGES)) == 1


# -- 3. a charged first whose answer was not kept ----------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_keyed_repeat_of_an_answer_too_large_to_keep_is_refused_never_sent_again(
    clean: Tollgate, sim: Simulator, stream: bool
) -> None:
    sim.configure(payload_bytes=STORE_BYTES * 2)
    client = sdk(clean, timeout=DEADLINE_S, max_retries=0)
    arguments = asked("images", "A lighthouse, too large to keep", stream)
    key = f"too-large-{stream}"
    first = call(client, "images", arguments, key)
    if stream:
        assert event_types(first.parse())[-1] == "image_generation.completed"
    assert first.http_response.status_code == 200
    settled(clean, 1)
    with pytest.raises(openai.ConflictError) as raised:
        call(client, "images", arguments, key)
    answer = raised.value.response
    assert raised.value.code == "answer_not_kept"
    assert answer.headers["x-tollgate-replay-of"] == first.headers["x-tollgate-request-id"]
    assert answer.headers["x-tollgate-cost-usd"] == "0"
    assert len(forwarded(sim, IMAGES)) == 1, "a keyed repeat of a charged first was sent again"
    rows = settled(clean, 2)
    assert sorted(r["outcome"] for r in rows) == ["ok", "replayed"]
    # A new key is a new request, sent and charged.
    call(client, "images", arguments, f"{key}-new")
    assert len(forwarded(sim, IMAGES)) == 2


def test_an_sdk_retry_of_an_answer_its_client_got_is_still_a_new_request(
    clean: Tollgate, sim: Simulator
) -> None:
    """No key, and its client read its answer: nothing was kept, and an SDK retry of the
    same content is a new request (README, "Retries never pay twice")."""
    asked = body("A harbour, asked again")
    first = post(clean, asked, retry=0)
    assert first is not None and first.status_code == 200
    settled(clean, 1)
    again = post(clean, asked, retry=1)
    assert again is not None and again.status_code == 200
    assert "x-tollgate-replay-of" not in again.headers
    assert len(forwarded(sim, IMAGES)) == 2
