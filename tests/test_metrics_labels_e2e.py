"""Label values on /metrics come from configuration and the price book, never from what a
client writes: one series per client-chosen string would grow without bound."""

from __future__ import annotations

import httpx

from tests.conftest import DESIGN_KEY, Tollgate


def test_unpriced_model_names_share_one_series(tollgate: Tollgate) -> None:
    names = [f"made-up-model-{i}" for i in range(20)] + ['evil"} 1\nfake_metric{a="b']
    before = tollgate.metric(
        "tollgate_requests_total",
        team="design",
        model="(unpriced)",
        endpoint="generations",
        outcome="client_error",
    )
    for name in names:
        answer = httpx.post(
            f"{tollgate.url}/v1/images/generations",
            headers={"authorization": f"Bearer {DESIGN_KEY}"},
            json={"model": name, "prompt": "a cat"},
            timeout=30,
        )
        assert answer.json()["error"]["code"] == "unpriced_model"
    text = httpx.get(f"{tollgate.url}/metrics", timeout=30).text
    assert "made-up-model" not in text and "fake_metric" not in text
    after = tollgate.metric(
        "tollgate_requests_total",
        team="design",
        model="(unpriced)",
        endpoint="generations",
        outcome="client_error",
    )
    assert after - before == len(names)


def test_a_priced_model_keeps_its_name_even_when_refused(tollgate: Tollgate) -> None:
    answer = httpx.post(
        f"{tollgate.url}/v1/images/generations",
        headers={"authorization": f"Bearer {DESIGN_KEY}"},
        json={"model": "gpt-image-1", "prompt": "a cat", "size": "999x999"},
        timeout=30,
    )
    assert answer.status_code == 400
    assert tollgate.metric(
        "tollgate_requests_total",
        team="design",
        model="gpt-image-1",
        endpoint="generations",
        outcome="client_error",
    )
