"""Configuration: the one reader of YAML, JSON Schema and the environment.

    config = load_config("policies")          # or a single YAML file
    team, key = config.team_by_key_hash()[sha256_hex]

It produces the frozen values of `proxy.core.settings`; `schema` holds the file format
(JSON Schema) and its messages, `source` the YAML reading with line numbers, `prices`
the price-book files, `loader` the checks.
"""

from proxy.config.loader import default_config_path, load_config
from proxy.config.schema import config_schema
from proxy.config.source import flow_scalar

__all__ = ["config_schema", "default_config_path", "flow_scalar", "load_config"]
