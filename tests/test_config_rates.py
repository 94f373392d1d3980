"""`rate_limits:` in team files and `organization.rate_limits:` in tollgate.yaml: the
SPEC's example loads, and what cannot be kept (an unknown key, two limits in one entry, a
share of nothing, shares promising more than a limit) is refused with its file and line."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from proxy.config.loader import load_config
from proxy.core.settings import RateLimit, RateShare
from tests.test_config import KEY_B, policies, problems_of, team_yaml, write

__all__ = ["policies"]  # the fixture

SETTINGS = """\
timezone: UTC
organization:
  rate_limits:
    - {per: minute, images: 250, model: gpt-image-2}
"""


def test_the_documented_example_loads(policies: Path) -> None:
    write(policies / "tollgate.yaml", SETTINGS)
    extra = """\
    rate_limits:
      - {per: minute, images: 20}
      - {per: minute, requests: 60}
      - {per: day, tokens: 2000000, model: gpt-image-2}
      - {per: minute, share: 0.25}
    """
    write(policies / "teams" / "design.yaml", team_yaml("design", extra=extra))
    config = load_config(policies, env={})
    (design,) = config.teams
    assert design.rate_limits == (
        RateLimit("minute", "images", 20, None, "policies/teams/design.yaml:5"),
        RateLimit("minute", "requests", 60, None, "policies/teams/design.yaml:6"),
        RateLimit("day", "tokens", 2_000_000, "gpt-image-2", "policies/teams/design.yaml:7"),
    )
    assert design.rate_shares == (
        RateShare("minute", Decimal("0.25"), None, "policies/teams/design.yaml:8"),
    )
    (org,) = config.organization_rate_limits
    assert (org.per, org.metric, org.limit, org.model) == ("minute", "images", 250, "gpt-image-2")
    assert design.rate_shares[0].of(org) == 62


def test_an_entry_names_one_limit(policies: Path) -> None:
    extra = "rate_limits:\n  - {per: minute, images: 2, requests: 3}\n  - {per: hour, images: 1}\n"
    write(policies / "teams" / "t.yaml", team_yaml(extra=extra))
    assert problems_of(policies) == [
        "policies/teams/t.yaml:5: rate_limits[0]: needs exactly one limit: images, requests, "
        "tokens",
        "policies/teams/t.yaml:6: rate_limits[1].per: must be one of 'minute', 'day', got 'hour'",
    ]


def test_a_share_takes_no_limit_of_its_own(policies: Path) -> None:
    write(policies / "tollgate.yaml", SETTINGS)
    extra = (
        "rate_limits:\n  - {per: minute, share: 0.5, images: 3}\n  - {per: minute, share: 1.5}\n"
    )
    write(policies / "teams" / "t.yaml", team_yaml(extra=extra))
    found = problems_of(policies)
    assert found[0].startswith("policies/teams/t.yaml:5: rate_limits[0].images: unknown key")
    assert found[1].startswith("policies/teams/t.yaml:6: rate_limits[1].share: ")


def test_a_share_needs_an_organization_limit(policies: Path) -> None:
    write(policies / "tollgate.yaml", SETTINGS)
    write(
        policies / "teams" / "t.yaml", team_yaml(extra="rate_limits:\n  - {per: day, share: 0.5}\n")
    )
    assert problems_of(policies) == [
        "policies/teams/t.yaml:5: rate_limits: a share of the organization's per-day rate "
        "limits, but `organization.rate_limits` has none"
    ]


def test_shares_may_not_promise_more_than_the_limit(policies: Path) -> None:
    write(policies / "tollgate.yaml", SETTINGS)
    share = "rate_limits:\n  - {per: minute, share: 0.6}\n"
    write(policies / "teams" / "a.yaml", team_yaml("a", extra=share))
    write(policies / "teams" / "b.yaml", team_yaml("b", sha=KEY_B, extra=share))
    assert problems_of(policies) == [
        "policies/tollgate.yaml:4: organization.rate_limits: the teams' shares of this limit "
        "add up to more than all of it (a 0.6, b 0.6)"
    ]


def test_a_limits_model_must_be_priced(policies: Path) -> None:
    extra = "rate_limits:\n  - {per: minute, images: 5, model: gpt-imag-2}\n"
    write(policies / "teams" / "t.yaml", team_yaml(extra=extra))
    assert problems_of(policies) == [
        "policies/teams/t.yaml:5: rate_limits[0].model: model 'gpt-imag-2' is not in the "
        "price book (did you mean 'gpt-image-2'?)"
    ]
