"""Rate limits through real processes and the official SDK: a team's share of the
organization's images per minute holds while another team floods with `n=4` from many
clients; the SDK's own retry honours `Retry-After` and succeeds once the minute turns;
limits hold over two workers and over two replicas sharing PostgreSQL; every answer says
the room left."""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from proxy.core.auth import key_hash
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    Simulator,
    Tollgate,
    start_tollgate,
    wait_for,
    write_config,
)

SHARED = """
organization:
  rate_limits:
    - {per: minute, images: 12, model: gpt-image-2}
"""
FLOOD = {
    "design": f"""
name: design
keys:
  - {{id: web, sha256: {key_hash(DESIGN_KEY)}}}
rate_limits:
  - {{per: minute, share: 0.5}}
""",
    "research": f"""
name: research
keys:
  - {{id: lab, sha256: {key_hash(RESEARCH_KEY)}}}
rate_limits:
  - {{per: minute, share: 0.25}}
""",
}
INFLIGHT = "tollgate_inflight_requests"
LOW = {"model": "gpt-image-2", "prompt": "a lighthouse", "quality": "low", "size": "1024x1024"}


def early_in_a_minute(latest: float = 30.0) -> None:
    """Wait, if need be, for a minute to start: what follows then fits in one minute."""
    second = time.time() % 60
    if second > latest:
        time.sleep(60 - second + 0.2)


def late_in_a_minute(earliest: float = 50.0) -> None:
    """Wait for the last seconds of a minute: a refusal then asks for a short wait."""
    second = time.time() % 60
    if second < earliest:
        time.sleep(earliest - second)


async def flood(url: str, key: str, count: int, n: int = 4) -> list[int]:
    """`count` clients at once, each asking for `n` images; their statuses."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as http:

        async def one() -> int:
            answer = await http.post(
                f"{url}/v1/images/generations",
                headers={"authorization": f"Bearer {key}"},
                json={**LOW, "n": n},
            )
            return answer.status_code

        return list(await asyncio.gather(*(one() for _ in range(count))))


def images(proxy: Tollgate, team: str) -> int:
    rows = proxy.query(
        f"SELECT COALESCE(SUM(n), 0) AS v FROM requests WHERE team = '{team}' AND status = 200"
    )
    return int(rows[0]["v"])


def test_a_share_holds_while_another_team_floods(simulator: Simulator, tmp_path: Path) -> None:
    write_config(tmp_path, f"{simulator.url}/v1", SHARED, FLOOD)
    proxy = start_tollgate(tmp_path)
    try:
        early_in_a_minute()
        statuses = asyncio.run(flood(proxy.url, RESEARCH_KEY, 12))
        # research: its 3 promised, then the 3 nobody is promised: one request of 4 fits.
        assert collections.Counter(statuses) == {200: 1, 429: 11}
        design = proxy.client(DESIGN_KEY)
        answer = design.images.with_raw_response.generate(**LOW, n=4)  # type: ignore[call-overload]
        # Left: 2 of its promise and the 2 nobody is promised that research did not take.
        assert answer.headers["x-tollgate-ratelimit-remaining-images"] == "4"
        answer = design.images.with_raw_response.generate(**LOW, n=4)  # type: ignore[call-overload]
        assert answer.headers["x-tollgate-ratelimit-remaining-images"] == "0"
        with pytest.raises(openai.RateLimitError) as caught:
            design.images.generate(**LOW)  # type: ignore[call-overload]
        error = caught.value
        assert error.code == "rate_limit_exceeded" and error.type == "requests"
        assert "the organization's limit of 12 images of gpt-image-2 per minute" in error.message
        assert 1 <= int(error.response.headers["retry-after"]) <= 60
        assert (images(proxy, "design"), images(proxy, "research")) == (8, 4)
        refused = proxy.query("SELECT outcome, COUNT(*) AS c FROM requests GROUP BY outcome")
        assert {r["outcome"]: r["c"] for r in refused} == {"ok": 3, "rejected_rate": 12}
    finally:
        proxy.stop()


def test_the_sdk_waits_out_retry_after_and_succeeds_once_the_minute_turns(
    simulator: Simulator, tmp_path: Path
) -> None:
    teams = {"design": FLOOD["design"].replace("share: 0.5", "requests: 1")}
    write_config(tmp_path, f"{simulator.url}/v1", "", teams)
    proxy = start_tollgate(tmp_path)
    try:
        late_in_a_minute()
        client = proxy.client(DESIGN_KEY, max_retries=2)
        first = client.images.with_raw_response.generate(**LOW)  # type: ignore[call-overload]
        minute = float(first.headers["x-tollgate-ratelimit-reset-requests"].rstrip("s"))
        second = client.images.with_raw_response.generate(**LOW)  # type: ignore[call-overload]
        assert second.status_code == 200
        rows = proxy.rows()
        assert [r["outcome"] for r in rows] == ["ok", "rejected_rate", "ok"]
        assert rows[2]["started_at"] - rows[1]["started_at"] >= minute - 1
        assert int(rows[2]["started_at"] // 60) == int(rows[0]["started_at"] // 60) + 1
    finally:
        proxy.stop()


@pytest.mark.parametrize("layout", ["two workers", "two replicas"])
def test_limits_hold_across_workers_and_replicas(
    simulator: Simulator, tmp_path: Path, shared: str, layout: str
) -> None:
    teams = {
        "design": FLOOD["design"].replace("share: 0.5", "images: 40"),
        "research": FLOOD["research"],
    }
    settings = SHARED.replace("images: 12", "images: 20")
    write_config(tmp_path, f"{simulator.url}/v1", settings, teams)
    if layout == "two workers":
        proxies = [start_tollgate(tmp_path, "--workers", "2", ledger_url=shared)]
    else:
        proxies = [start_tollgate(tmp_path, ledger_url=shared) for _ in range(2)]
    try:
        early_in_a_minute(25.0)

        async def both() -> list[int]:
            asks = [flood(p.url, DESIGN_KEY, 12, n=2) for p in proxies]
            asks += [flood(p.url, RESEARCH_KEY, 6, n=1) for p in proxies]
            return [s for part in await asyncio.gather(*asks) for s in part]

        statuses = asyncio.run(both())
        assert set(statuses) <= {200, 429}
        design, research = images(proxies[0], "design"), images(proxies[0], "research")
        assert research >= 5  # its share, a quarter of 20, whatever design did
        assert 19 <= design + research <= 20  # design asks in pairs: one may stay unused
    finally:
        for proxy in proxies:
            proxy.stop()


def test_the_responses_image_tool_counts_its_calls_and_a_refusal_keeps_its_room(
    simulator: Simulator, tmp_path: Path
) -> None:
    limits = "rate_limits:\n  - {per: minute, images: 3}\n  - {per: minute, requests: 10}\n"
    teams = {
        "design": FLOOD["design"].replace("rate_limits:\n  - {per: minute, share: 0.5}\n", limits)
    }
    write_config(tmp_path, f"{simulator.url}/v1", "", teams)
    proxy = start_tollgate(tmp_path)
    try:
        early_in_a_minute()
        client = proxy.client(DESIGN_KEY)
        tool = {"type": "image_generation", "model": "gpt-image-2", "quality": "low"}
        answer = client.responses.with_raw_response.create(
            model="gpt-4.1-mini", input="A red bicycle", tools=[tool],  # type: ignore[list-item]
            max_output_tokens=300, max_tool_calls=2,
        )  # fmt: skip
        assert answer.headers["x-tollgate-ratelimit-remaining-images"] == "1"
        assert answer.headers["x-tollgate-ratelimit-remaining-requests"] == "9"
        with pytest.raises(openai.RateLimitError) as caught:
            client.responses.create(
                model="gpt-4.1-mini", input="A blue bicycle", tools=[tool],  # type: ignore[list-item]
                max_output_tokens=300, max_tool_calls=2,
            )  # fmt: skip
        headers = caught.value.response.headers
        assert headers["x-tollgate-ratelimit-remaining-images"] == "1"
        assert headers["x-tollgate-ratelimit-remaining-requests"] == "9"  # nothing counted
        # A refusal of another kind still tells the room left.
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.generate(model="gpt-image-2", prompt="x", size="7x7")  # type: ignore[call-overload]
        assert refused.value.response.headers["x-tollgate-ratelimit-remaining-images"] == "1"
    finally:
        proxy.stop()


def test_a_responses_request_without_the_image_tool_counts_against_no_image_models_limit(
    simulator: Simulator, tmp_path: Path
) -> None:
    """It names the default image model (gpt-image-2), which it never calls: only the
    limits of its mainline model, and those on every model, count it."""
    limits = (
        "rate_limits:\n  - {per: minute, requests: 1, model: gpt-image-2}\n"
        "  - {per: minute, requests: 30, model: gpt-4.1-mini}\n"
    )
    teams = {
        "design": FLOOD["design"].replace("rate_limits:\n  - {per: minute, share: 0.5}\n", limits)
    }
    write_config(tmp_path, f"{simulator.url}/v1", "", teams)
    proxy = start_tollgate(tmp_path)
    try:
        early_in_a_minute()
        client = proxy.client(DESIGN_KEY)
        for _ in range(3):
            answer = client.responses.with_raw_response.create(
                model="gpt-4.1-mini", input="A haiku about a bicycle", max_output_tokens=300
            )
            assert answer.headers["x-tollgate-ratelimit-limit-requests"] == "30"
        assert answer.headers["x-tollgate-ratelimit-remaining-requests"] == "27"
        # The image model's own limit is still whole.
        image = client.images.with_raw_response.generate(**LOW)  # type: ignore[call-overload]
        assert image.headers["x-tollgate-ratelimit-remaining-requests"] == "0"
    finally:
        proxy.stop()


def test_a_replay_counts_against_no_limit_and_tells_the_room_left(
    simulator: Simulator, tmp_path: Path
) -> None:
    teams = {"design": FLOOD["design"].replace("share: 0.5", "requests: 5")}
    write_config(tmp_path, f"{simulator.url}/v1", "", teams)
    proxy = start_tollgate(tmp_path)
    try:
        early_in_a_minute()
        client = proxy.client(DESIGN_KEY)
        options = {"extra_headers": {"Idempotency-Key": "one-lighthouse"}}
        first = client.images.with_raw_response.generate(**LOW, **options)  # type: ignore[call-overload]
        again = client.images.with_raw_response.generate(**LOW, **options)  # type: ignore[call-overload]
        assert again.headers["x-tollgate-replay-of"] == first.headers["x-tollgate-request-id"]
        assert first.headers["x-tollgate-ratelimit-remaining-requests"] == "4"
        assert again.headers["x-tollgate-ratelimit-remaining-requests"] == "4"
    finally:
        proxy.stop()


def test_a_replay_tells_only_the_limits_its_request_counts_against(
    simulator: Simulator, tmp_path: Path
) -> None:
    """A limit on another model is none of the request's: its first answer does not name
    it, and neither does its replay (nor a refusal of the same request)."""
    teams = {
        "design": FLOOD["design"].replace(
            "{per: minute, share: 0.5}",
            "{per: minute, requests: 50}\n  - {per: minute, images: 40, model: gpt-image-2}",
        )
    }
    write_config(tmp_path, f"{simulator.url}/v1", "", teams)
    proxy = start_tollgate(tmp_path)
    try:
        client = proxy.client(DESIGN_KEY)
        mini = {**LOW, "model": "gpt-image-1-mini"}
        options = {"extra_headers": {"Idempotency-Key": "one-mini-lighthouse"}}
        first = client.images.with_raw_response.generate(**mini, **options)  # type: ignore[call-overload]
        again = client.images.with_raw_response.generate(**mini, **options)  # type: ignore[call-overload]
        assert again.headers["x-tollgate-replay-of"] == first.headers["x-tollgate-request-id"]

        def named(headers: httpx.Headers) -> set[str]:
            return {h for h in headers if h.startswith("x-tollgate-ratelimit-")}

        assert named(first.headers) == {
            "x-tollgate-ratelimit-limit-requests",
            "x-tollgate-ratelimit-remaining-requests",
            "x-tollgate-ratelimit-reset-requests",
        }
        assert named(again.headers) == named(first.headers)
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.generate(**{**mini, "size": "7x7"})  # type: ignore[call-overload]
        assert named(refused.value.response.headers) == named(first.headers)
    finally:
        proxy.stop()


def test_a_request_past_what_a_window_can_give_its_team_is_not_retried(
    simulator: Simulator, tmp_path: Path
) -> None:
    """Of the organization's 12 images a minute, design is promised 6: research, promised
    3, is never given more than 6 in a minute, so its n=7 is refused once, not waited for
    and retried by the SDK for two minutes."""
    write_config(tmp_path, f"{simulator.url}/v1", SHARED, FLOOD)
    proxy = start_tollgate(tmp_path)
    try:
        client = proxy.client(RESEARCH_KEY, max_retries=2)
        with pytest.raises(openai.RateLimitError) as refused:
            client.images.generate(**LOW, n=7)  # type: ignore[call-overload]
        assert refused.value.code == "rate_limit_exceeded"
        assert refused.value.response.headers["x-should-retry"] == "false"
        assert "6 images: the rest is promised to other teams' shares" in refused.value.message
        assert len([r for r in proxy.rows() if r["team"] == "research"]) == 1  # no retry
        client.images.generate(**LOW, n=6)  # type: ignore[call-overload]
    finally:
        proxy.stop()


def test_a_body_sent_across_a_minute_counts_in_the_minute_it_is_admitted(
    simulator: Simulator, tmp_path: Path
) -> None:
    """A request whose headers came in one minute and whose body ends in the next is sent
    upstream in the next: it counts there. Counted in the minute its headers came, a team
    could open requests minute after minute, each within that minute's room, and finish
    their bodies together (up to `limits.body_timeout_s`, 300 s, later): several minutes'
    images at OpenAI in one, past the team's limit and the other teams' shares."""
    teams = {"design": FLOOD["design"].replace("share: 0.5", "images: 1")}
    write_config(tmp_path, f"{simulator.url}/v1", "", teams)
    settings = tmp_path / "tollgate.yaml"
    # A deadline past the minute's end: the slow body's request is still sent.
    text = settings.read_text().replace("timeout_s: 3", "timeout_s: 3\n  total_timeout_s: 180")
    settings.write_text(text)
    proxy = start_tollgate(tmp_path)
    try:
        early_in_a_minute(40)
        # Blanks before the JSON, sent one at a time: the body is never idle long.
        body = b" " * 30 + json.dumps({**LOW, "prompt": "a slow lighthouse"}).encode()
        host, port = proxy.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as slow:
            head = (
                f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {DESIGN_KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            minute = time.time() // 60
            slow.sendall(head.encode() + body[:1])
            wait_for("the slow request in flight", lambda: proxy.metric(INFLIGHT) == 1 or None)
            sent = 1
            while time.time() // 60 == minute:
                time.sleep(min(5.0, 60 - time.time() % 60 + 0.2))
                slow.sendall(body[sent : sent + 1])
                sent += 1
            quick = proxy.client(DESIGN_KEY).images.with_raw_response.generate(**LOW)  # type: ignore[call-overload]
            assert quick.status_code == 200
            slow.sendall(body[sent:])
            status = int(slow.recv(4096).split(b" ", 2)[1])
        assert status == 429, "a second image in the minute both were sent in"
        assert sorted(r["outcome"] for r in proxy.rows()) == ["ok", "rejected_rate"]
    finally:
        proxy.stop()
