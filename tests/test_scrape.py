"""`GET /metrics` reads the ledger's gauges once for the scrapes that come together: those
arriving while a read runs await it, and a read younger than `FRESH_S` answers the next."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from proxy.core.auth import key_hash
from proxy.web.gateway import Gateway
from proxy.web.scrape import FRESH_S
from tests.conftest import DESIGN_KEY, in_process, write_config

TEAMS = {
    "design": f"""
        name: design
        keys:
          - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}
        budgets:
          - {{period: month, limit_usd: 5}}
        rate_limits:
          - {{per: minute, requests: 50}}
    """
}
BODY = {"model": "gpt-image-2", "prompt": "a lighthouse", "quality": "low", "size": "1024x1024"}
HEADERS = {"authorization": f"Bearer {DESIGN_KEY}"}
SPENT = 'tollgate_budget_spent_usd{period="month",scope="team",team="design"}'


class Reads:
    """The ledger reads the gauges make, each held `hold_s` so that scrapes overlap it."""

    def __init__(self, app: Gateway, hold_s: float = 0.0) -> None:
        self.count = {"totals": 0, "rate_windows": 0}
        ledger = app.current().ledger
        for name in self.count:
            setattr(ledger, name, self._counted(name, getattr(ledger, name), hold_s))

    def _counted(self, name: str, read: Any, hold_s: float) -> Any:
        async def counted(*args: Any) -> Any:
            self.count[name] += 1
            await asyncio.sleep(hold_s)
            return await read(*args)

        return counted


@pytest.fixture
def now() -> list[float]:
    return [time.time()]


@pytest.fixture
def client(tmp_path: Path, now: list[float]) -> Iterator[TestClient]:
    write_config(tmp_path, "http://simulated/v1", teams=TEAMS)
    with TestClient(in_process(tmp_path, clock=lambda: now[0])) as client:
        yield client


def spent(client: TestClient) -> float:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            if f"{sample.name}{{{labels}}}" == SPENT:
                return float(sample.value)
    raise AssertionError(f"{SPENT} is not on /metrics")


def test_concurrent_scrapes_share_one_read_of_the_ledger(client: TestClient) -> None:
    reads = Reads(client.app, hold_s=1.0)  # type: ignore[arg-type]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: spent(client), range(16)))
    assert answers == [0.0] * 16
    assert reads.count == {"totals": 1, "rate_windows": 1}


def test_a_scrape_after_the_interval_reads_the_ledger_again(client: TestClient) -> None:
    reads = Reads(client.app)  # type: ignore[arg-type]
    assert spent(client) == 0.0
    for _ in range(4):
        assert spent(client) == 0.0
    assert reads.count == {"totals": 1, "rate_windows": 1}
    time.sleep(FRESH_S)
    spent(client)
    assert reads.count == {"totals": 2, "rate_windows": 2}


def test_the_gauges_are_never_older_than_the_interval(client: TestClient) -> None:
    assert spent(client) == 0.0
    answer = client.post("/v1/images/generations", json=BODY, headers=HEADERS)
    assert answer.status_code == 200, answer.text
    cost = float(answer.headers["x-tollgate-cost-usd"])
    assert cost > 0
    time.sleep(FRESH_S)
    assert spent(client) == pytest.approx(cost)


def test_a_moved_clock_reads_the_ledger_again(client: TestClient, now: list[float]) -> None:
    reads = Reads(client.app)  # type: ignore[arg-type]
    spent(client)
    now[0] += FRESH_S
    spent(client)
    assert reads.count == {"totals": 2, "rate_windows": 2}


def test_the_process_metrics_are_rendered_at_each_scrape(client: TestClient) -> None:
    """Only the ledger's gauges are shared: counters tell this very moment."""
    assert spent(client) == 0.0
    answer = client.post("/v1/images/generations", json=BODY, headers=HEADERS)
    assert answer.status_code == 200, answer.text
    text = client.get("/metrics").text
    assert 'tollgate_requests_total{endpoint="generations"' in text
