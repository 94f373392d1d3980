"""Rate limits across a reload inside one window: a share taken away (or made smaller)
mid-minute no longer counts as kept for the others, so the organization's count never
passes its limit (in process, with the clock held inside one minute)."""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from proxy.core.auth import key_hash
from tests.conftest import in_process, write_config

ADMIN = "tg_admin_rates_reload"
KEYS = {name: f"tg_test_rates_reload_{name}" for name in ("design", "research", "ops")}
LOW = {"model": "gpt-image-2", "prompt": "abcd", "quality": "low", "size": "1024x1024"}
SETTINGS = f"""timezone: UTC
admin_token: {ADMIN}
organization:
  rate_limits:
    - {{per: minute, images: 12, model: gpt-image-2}}
"""
NOW = 1_780_000_020.0  # 20 s into a minute: every request of the test is in it


def team(name: str, share: str | None) -> str:
    text = f"name: {name}\nkeys:\n  - {{id: k, sha256: {key_hash(KEYS[name])}}}\n"
    if share is not None:
        text += f"rate_limits:\n  - {{per: minute, share: {share}}}\n"
    return text


def teams(research_share: str | None) -> dict[str, str]:
    return {
        "design": team("design", "0.5"),
        "research": team("research", research_share),
        "ops": team("ops", None),
    }


def admitted(client: TestClient, name: str, tries: int) -> int:
    """How many of `tries` image requests of team `name` are admitted."""
    found = 0
    for _ in range(tries):
        answer = client.post(
            "/v1/images/generations",
            json=LOW,
            headers={"authorization": f"Bearer {KEYS[name]}", "x-stainless-retry-count": "0"},
        )
        assert answer.status_code in (200, 429), answer.status_code
        found += answer.status_code == 200
    return found


def test_a_share_taken_away_mid_minute_keeps_the_organization_within_its_limit(
    tmp_path: Path,
) -> None:
    write_config(tmp_path, "http://simulated/v1", SETTINGS, teams=teams("0.25"))
    app = in_process(tmp_path, clock=lambda: NOW)
    with TestClient(app) as client:
        assert admitted(client, "research", 3) == 3  # its share, whole
        write_config(tmp_path, "http://simulated/v1", SETTINGS, teams=teams(None))
        reload = client.post("/admin/reload", headers={"authorization": f"Bearer {ADMIN}"})
        assert reload.status_code == 200, reload.text
        # design's 6 are still promised: ops may borrow what is left of the 12 beside them.
        ops = admitted(client, "ops", 12)
        design = admitted(client, "design", 6)
        assert design == 6
        assert 3 + ops + design <= 12
