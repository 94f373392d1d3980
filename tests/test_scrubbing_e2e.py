"""The company key never reaches a team, even from an upstream that echoes it.

A simulated upstream playing the echo fault puts the `Authorization` header it got
in a response header and in the body (plainly and base64-encoded); through Tollgate,
no byte or header a team receives carries the key, on every way an answer is relayed,
and metering still charges what the upstream billed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from proxy.core.scrubbing import mask
from tests.conftest import (
    DESIGN_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    run_simulator,
    run_tollgate,
    start_tollgate,
    write_config,
)
from tests.test_proxy_e2e import check_charge, expected_cost, wait_settled
from tests.test_scrubbing import leaks

REFUSED_KEY = "sk-refused-company-key-0000000000000000"
"""A company key the upstream does not accept: its 401 echoes it."""
FORWARDED_ECHO = "x-ratelimit-echo"
"""A header Tollgate passes back (its `x-ratelimit-` prefix), carrying the key."""
MASKED = "Bearer [redacted]" + "*" * (len(UPSTREAM_KEY) - len("[redacted]"))


@pytest.fixture(scope="module")
def echoing() -> Iterator[Simulator]:
    """A simulator of its own: the echo fault set at run time must not reach other tests."""
    yield from run_simulator()


@pytest.fixture(autouse=True)
def calm(echoing: Simulator) -> None:
    # Tollgate passes back only known upstream headers (x-echo-authorization is dropped);
    # an upstream may echo the key in one it passes too, as this one does.
    echoing.configure(
        fault=None,
        payload_bytes=0,
        latency_ms=0,
        response_headers={FORWARDED_ECHO: f"Bearer {UPSTREAM_KEY}"},
    )


@pytest.fixture(scope="module")
def tollgate(echoing: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("echo")
    write_config(root, f"{echoing.url}/v1", settings="passthrough: [/v1/models]\n")
    yield from run_tollgate(root)


@pytest.fixture(scope="module")
def refused(echoing: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    """A Tollgate configured with a key the upstream refuses."""
    root = tmp_path_factory.mktemp("refused")
    write_config(root, f"{echoing.url}/v1")
    config = root / "tollgate.yaml"
    config.write_text(config.read_text().replace(UPSTREAM_KEY, REFUSED_KEY))
    yield from run_tollgate(root)


TEAM = {"authorization": f"Bearer {DESIGN_KEY}"}
STREAMED = {"model": "gpt-image-2", "quality": "low", "size": "1024x1024", "stream": True}


def assert_no_key(
    answer: httpx.Response, key: str = UPSTREAM_KEY, body: bytes | None = None
) -> None:
    """Neither the body nor any header (name or value) gives `key` away."""
    assert not leaks(answer.content if body is None else body, key)
    for name, value in answer.headers.raw:
        assert not leaks(name + b": " + value, key), name


@pytest.mark.parametrize("payload_bytes", [0, 300_000], ids=["in-memory", "spooled-to-disk"])
def test_a_200_answer_that_echoes_the_key_reaches_the_team_masked_and_metered(
    tollgate: Tollgate, echoing: Simulator, payload_bytes: int
) -> None:
    echoing.configure(payload_bytes=payload_bytes)
    raw = tollgate.client().images.with_raw_response.generate(
        model="gpt-image-2", prompt="a kite [[fault:echo]]", quality="low", size="1024x1024"
    )
    answer = raw.http_response
    assert_no_key(answer)
    assert answer.headers[FORWARDED_ECHO] == MASKED
    assert answer.headers.get("x-echo-authorization") in (None, MASKED)
    body = json.loads(answer.content)
    assert body["echo"]["authorization"] == MASKED
    assert raw.parse().data[0].b64_json  # still an answer the client reads
    assert len(answer.content) > payload_bytes
    row = check_charge(tollgate, echoing, raw)
    assert row["outcome"] == "ok" and row["status"] == 200


def test_a_stream_that_echoes_the_key_in_every_event_reaches_the_team_masked_and_metered(
    tollgate: Tollgate, echoing: Simulator
) -> None:
    # Large events arrive in several chunks; the simulator also splits each inside the key.
    echoing.configure(payload_bytes=200_000)
    request = {**STREAMED, "prompt": "a fox [[fault:echo]]", "partial_images": 2}
    with httpx.stream(
        "POST",
        f"{tollgate.url}/v1/images/generations",
        json=request,
        headers=TEAM,
        timeout=30,
    ) as answer:
        chunks = list(answer.iter_raw())
    assert answer.status_code == 200
    body = b"".join(chunks)
    assert_no_key(answer, body=body)
    events = [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert len(events) == 3 and all(e["echo"]["authorization"] == MASKED for e in events)
    row = wait_settled(tollgate, answer.headers["x-tollgate-request-id"])
    record = echoing.record(answer.headers["x-request-id"])
    assert row["outcome"] == "ok" and row["flagged"] == 0
    assert Decimal(row["cost_nanos"]) / 10**9 == expected_cost(record)
    assert row["image_output_tokens"] == 196 + 2 * 100


def test_the_official_client_reads_a_masked_stream(tollgate: Tollgate, echoing: Simulator) -> None:
    with tollgate.client().images.with_streaming_response.generate(
        model="gpt-image-2",
        prompt="an owl [[fault:echo]]",
        quality="low",
        size="1024x1024",
        stream=True,
        partial_images=1,
    ) as response:
        assert response.headers[FORWARDED_ECHO] == MASKED
        events = list(response.parse())
    assert [e.type for e in events][-1] == "image_generation.completed"
    assert all(UPSTREAM_KEY not in e.model_dump_json() for e in events)


def test_an_upstream_401_that_echoes_the_refused_key_reaches_the_team_as_tollgates_own_and_free(
    refused: Tollgate, echoing: Simulator
) -> None:
    echoing.configure(fault="echo", response_headers={FORWARDED_ECHO: f"Bearer {REFUSED_KEY}"})
    with pytest.raises(openai.AuthenticationError) as caught:
        refused.client().images.generate(model="gpt-image-2", prompt="x", quality="low")
    assert caught.value.code == "invalid_api_key"
    answer = caught.value.response
    assert_no_key(answer, REFUSED_KEY)
    assert answer.headers[FORWARDED_ECHO].startswith("Bearer [redacted]")
    # Not the upstream's body (its message and its echo quote the key): Tollgate's own.
    error = json.loads(answer.content)["error"]
    assert "echo" not in error and "upstream.api_key" in error["message"]
    # The upstream did get the key it was configured with: its echo was masked.
    assert echoing.billing()[-1]["authorization"] == f"Bearer {REFUSED_KEY}"
    row = wait_settled(refused, answer.headers["x-tollgate-request-id"])
    assert row["outcome"] == "upstream_error" and row["status"] == 401
    assert row["cost_nanos"] == 0 and row["error_code"] == "invalid_api_key"
    assert answer.headers["x-tollgate-cost-usd"] == "0"


def test_a_passthrough_answer_that_echoes_the_key_reaches_the_team_masked(
    tollgate: Tollgate, echoing: Simulator
) -> None:
    echoing.configure(fault="echo")
    models = tollgate.client().models.with_raw_response.list()
    answer = models.http_response
    assert answer.status_code == 200 and answer.headers["x-tollgate-team"] == "design"
    assert_no_key(answer)
    assert answer.headers[FORWARDED_ECHO] == MASKED
    assert "gpt-image-2" in {m.id for m in models.parse().data}


def test_a_stream_whose_answer_is_an_echoing_error_is_masked(
    refused: Tollgate, echoing: Simulator
) -> None:
    echoing.configure(fault="echo", response_headers={FORWARDED_ECHO: f"Bearer {REFUSED_KEY}"})
    answer = httpx.post(
        f"{refused.url}/v1/images/generations",
        json={"model": "gpt-image-2", "prompt": "x", "stream": True},
        headers=TEAM,
        timeout=30,
    )
    assert answer.status_code == 401
    assert_no_key(answer, REFUSED_KEY)


def test_the_key_still_reaches_the_upstream(tollgate: Tollgate, echoing: Simulator) -> None:
    tollgate.client().images.generate(model="gpt-image-2", prompt="y", quality="low")
    assert echoing.billing()[-1]["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_a_stream_sent_before_a_reload_changed_the_key_is_scrubbed_of_the_old_key(
    echoing: Simulator, tmp_path: Path
) -> None:
    admin = {"authorization": "Bearer admin-token-for-scrubbing"}
    write_config(
        tmp_path,
        f"{echoing.url}/v1",
        settings="admin_token: admin-token-for-scrubbing\npassthrough: [/v1/models]\n",
    )
    proxy = start_tollgate(tmp_path)
    try:
        # A second between events: the stream is still coming when the key changes.
        echoing.configure(fault="echo", latency_ms=3000)
        request = {**STREAMED, "prompt": "a heron", "partial_images": 2}
        with httpx.stream(
            "POST", f"{proxy.url}/v1/images/generations", json=request, headers=TEAM, timeout=30
        ) as answer:
            chunks = answer.iter_raw()
            body = b""
            while b"\n\n" not in body:
                body += next(chunks)
            config = tmp_path / "tollgate.yaml"
            config.write_text(config.read_text().replace(UPSTREAM_KEY, REFUSED_KEY))
            assert httpx.post(f"{proxy.url}/admin/reload", headers=admin).status_code == 200
            # Requests sent from now on carry the new key (refused, echoed, masked).
            models = httpx.get(f"{proxy.url}/v1/models", headers=TEAM)
            assert models.status_code == 401
            assert_no_key(models, REFUSED_KEY)
            body += b"".join(chunks)
        assert_no_key(answer, body=body)
        events = [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
        assert len(events) == 3 and all(e["echo"]["authorization"] == MASKED for e in events)
        row = wait_settled(proxy, answer.headers["x-tollgate-request-id"])
        record = echoing.record(answer.headers["x-request-id"])
        assert record["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert Decimal(row["cost_nanos"]) / 10**9 == expected_cost(record)
    finally:
        proxy.stop()


def test_a_files_content_answers_no_guess_of_the_key(tollgate: Tollgate) -> None:
    """A team's file comes back as it was uploaded, with the key's masked echoes masked:
    were `sk-upstream-X***` masked only when `X` is the key's next character, the team
    would upload its guesses, read which came back masked, and so the key, a character
    at a time. A right and a wrong guess come back alike."""
    known = 12
    other = "A" if UPSTREAM_KEY[known] != "A" else "B"
    right, wrong = (f"{UPSTREAM_KEY[:known]}{c}***" for c in (UPSTREAM_KEY[known], other))
    client = tollgate.client()
    uploaded = client.files.create(
        file=("notes.txt", f"{right}\n{wrong}\n".encode(), "text/plain"), purpose="user_data"
    )
    content = client.files.content(uploaded.id).content
    assert content == f"{mask(len(right))}\n{mask(len(wrong))}\n".encode()
