"""Budget periods roll over at midnight in the configured time zone (the clock injected)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import openai
import uvicorn
from starlette.testclient import TestClient
from starlette.types import ASGIApp

from proxy.core.auth import key_hash
from tests.conftest import in_process, wait_for, write_config

KEY = "tg_test_rollover_key"
# One gpt-image-2 low 1024x1024 request with a 4-byte prompt is bounded at $0.0059.
BODY = {"model": "gpt-image-2", "prompt": "abcd", "quality": "low", "size": "1024x1024"}


def teams(budgets: str) -> dict[str, str]:
    """The one team, `night`, that refuses what its `budgets` (YAML list items) exceed."""
    keys = f"keys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n"
    return {"night": f"name: night\n{keys}budgets:\n{budgets}on_exhausted: reject\n"}


def test_a_day_budget_rolls_over_at_midnight_in_the_configured_time_zone(tmp_path: Path) -> None:
    night = "  - {period: day, limit_usd: 0.007}\n"
    write_config(tmp_path, "http://simulated/v1", "timezone: Europe/Paris\n", teams(night))
    paris = ZoneInfo("Europe/Paris")
    now = [datetime(2026, 11, 26, 23, 58, tzinfo=paris).timestamp()]
    app = in_process(tmp_path, clock=lambda: now[0])
    headers = {"authorization": f"Bearer {KEY}"}
    with TestClient(app) as client:
        first = client.post("/v1/images/generations", json=BODY, headers=headers)
        assert first.status_code == 200, first.text
        second = client.post("/v1/images/generations", json=BODY, headers=headers)
        assert second.status_code == 429
        assert "resets at 2026-11-27T00:00+01:00" in second.json()["error"]["message"]
        now[0] += 3 * 60  # 00:01 in Paris (still 23:01 in UTC): a new day
        third = client.post("/v1/images/generations", json=BODY, headers=headers)
        assert third.status_code == 200, third.text
        remaining = Decimal(third.headers["x-tollgate-budget-remaining-usd"])
        assert remaining == Decimal("0.007") - Decimal(third.headers["x-tollgate-cost-usd"])


def test_a_day_budget_holds_through_an_hour_repeated_after_local_midnight(
    tmp_path: Path,
) -> None:
    """Havana turns its clocks back from 01:00 to 00:00: midnight happens twice on that day,
    and the repeated hour is still the same day, counted in the same window."""
    night = "  - {period: day, limit_usd: 0.007}\n  - {period: month, limit_usd: 0.007}\n"
    write_config(tmp_path, "http://simulated/v1", "timezone: America/Havana\n", teams(night))
    havana = ZoneInfo("America/Havana")
    first_pass = datetime(2026, 11, 1, 0, 30, tzinfo=havana)  # 00:30 CDT, 04:30 UTC
    now = [first_pass.timestamp()]
    app = in_process(tmp_path, clock=lambda: now[0])
    headers = {"authorization": f"Bearer {KEY}"}
    with TestClient(app) as client:
        first = client.post("/v1/images/generations", json=BODY, headers=headers)
        assert first.status_code == 200, first.text
        now[0] += 3600  # 00:30 again, CST now (05:30 UTC): the same day and month
        assert datetime.fromtimestamp(now[0], havana).replace(tzinfo=None) == datetime(
            2026, 11, 1, 0, 30
        )
        second = client.post("/v1/images/generations", json=BODY, headers=headers)
        assert second.status_code == 429, second.text[:200]
        assert "resets at 2026-11-02T00:00-05:00" in second.json()["error"]["message"]


@contextmanager
def served(app: ASGIApp) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port in a thread of this process, its
    lifespan run (its ledger opened) there; its URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for("the server", lambda: server.started or None)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_body_that_ends_after_midnight_is_reserved_in_the_new_day(tmp_path: Path) -> None:
    """Its headers came before midnight, its body after: it is decided and sent in the new
    day, and counts there. Counted in the day its headers came, a team could open requests
    late in a day and end their bodies after midnight (up to `limits.body_timeout_s`): the
    old day's room spent in the new one, on top of the new day's whole limit, which OpenAI
    bills that day."""
    night = "  - {period: day, limit_usd: 0.007}\n"
    write_config(tmp_path, "http://simulated/v1", "timezone: UTC\n", teams(night))
    midnight = datetime(2026, 11, 27, tzinfo=ZoneInfo("UTC")).timestamp()
    now = [midnight - 2]  # the deadline (6 s here) counts from the headers
    app = in_process(tmp_path, clock=lambda: now[0])
    body = json.dumps(BODY).encode()
    with served(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as slow:
            head = (
                f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            slow.sendall(head.encode() + body[:10])
            inflight = "tollgate_inflight_requests 1.0"
            metrics = f"{url}/metrics"
            wait_for("the slow request", lambda: inflight in httpx.get(metrics).text or None)
            now[0] = midnight + 2
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
            quick = client.images.with_raw_response.generate(**BODY)  # type: ignore[call-overload]
            assert quick.status_code == 200
            slow.sendall(body[10:])
            status = int(slow.recv(4096).split(b" ", 2)[1])
    assert status == 429, "the new day's limit passed: both were sent in it"
