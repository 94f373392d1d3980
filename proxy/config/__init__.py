"""Configuration (SPEC §3): YAML → frozen settings, teams and budgets; the one reader of env.

    config = load_config("policies")          # or a single YAML file
    team, key = config.team_by_key_hash()[sha256_hex]

`settings` holds the values, `schema` the file format (JSON Schema) and its
messages, `source` the YAML reading with line numbers, `loader` the checks.
"""

from proxy.config.loader import default_config_path, load_config
from proxy.config.schema import config_schema
from proxy.config.settings import (
    Alerts,
    Allow,
    Budget,
    Config,
    Downgrade,
    Knob,
    Limits,
    Metric,
    OnExhausted,
    Passthrough,
    Period,
    Team,
    TeamKey,
    ThrottleTier,
    UpstreamSettings,
)

__all__ = [
    "Alerts",
    "Allow",
    "Budget",
    "Config",
    "Downgrade",
    "Knob",
    "Limits",
    "Metric",
    "OnExhausted",
    "Passthrough",
    "Period",
    "Team",
    "TeamKey",
    "ThrottleTier",
    "UpstreamSettings",
    "config_schema",
    "default_config_path",
    "load_config",
]
