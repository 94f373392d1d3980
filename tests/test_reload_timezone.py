"""A reload that changes `timezone` mid-period: spend already counted still counts."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from starlette.testclient import TestClient

from proxy.core.auth import key_hash
from tests.conftest import in_process, write_config

KEY = "tg_test_reload_timezone_key"
ADMIN = "tg_admin_reload_timezone"
# One gpt-image-2 low 1024x1024 request with a 4-byte prompt is bounded at $0.0059.
BODY = {"model": "gpt-image-2", "prompt": "abcd", "quality": "low", "size": "1024x1024"}
TEAM = f"""
name: night
keys:
  - {{id: k, sha256: {key_hash(KEY)}}}
budgets:
  - {{period: day, limit_usd: 0.007}}
on_exhausted: reject
"""


def settings(timezone: str) -> str:
    return f"timezone: {timezone}\nadmin_token: {ADMIN}\n"


def test_a_day_budget_keeps_its_spend_when_the_time_zone_changes_on_reload(
    tmp_path: Path,
) -> None:
    write_config(tmp_path, "http://simulated/v1", settings("UTC"), teams={"night": TEAM})
    now = [datetime(2026, 11, 26, 12, 0, tzinfo=ZoneInfo("UTC")).timestamp()]
    app = in_process(tmp_path, clock=lambda: now[0])
    headers = {"authorization": f"Bearer {KEY}"}
    with TestClient(app) as client:
        first = client.post("/v1/images/generations", json=BODY, headers=headers)
        assert first.status_code == 200, first.text
        # Tokyo's day of 26 November runs from 15:00 UTC on the 25th: the first request,
        # at 12:00 UTC, is in it.
        write_config(tmp_path, "http://simulated/v1", settings("Asia/Tokyo"), teams={"night": TEAM})
        reload = client.post("/admin/reload", headers={"authorization": f"Bearer {ADMIN}"})
        assert reload.status_code == 200, reload.text
        second = client.post("/v1/images/generations", json=BODY, headers=headers)
        assert second.status_code == 429, second.status_code
        assert second.json()["error"]["code"] == "budget_exceeded"
        # The team's own view says what the decision saw.
        view = client.get("/v1/tollgate/budget", headers=headers).json()
        [day] = [b for b in view["budgets"] if b["scope"] == "team" and b["period"] == "day"]
        assert Decimal(str(day["spent"])) == Decimal(first.headers["x-tollgate-cost-usd"])
