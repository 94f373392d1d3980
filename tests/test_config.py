"""Configuration: YAML files → frozen values, or every problem as `file:line: key.path: message`."""

from __future__ import annotations

import dataclasses
import hashlib
import textwrap
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from proxy.config import config_schema, default_config_path, load_config, loader
from proxy.core.errors import ConfigError
from proxy.core.models import Usage
from proxy.core.settings import Budget, Config, Passthrough

EXAMPLES = Path(__file__).resolve().parent.parent / "policies"
KEY_A = hashlib.sha256(b"tg_a").hexdigest()
KEY_B = hashlib.sha256(b"tg_b").hexdigest()


@dataclass(frozen=True)
class FakeModel:
    name: str
    qualities: tuple[str, ...] = ("low", "medium", "high")
    sizes: tuple[str, ...] = ("1024x1024", "1536x1024", "1024x1536")

    def accepts_size(self, size: str) -> bool:
        return size in self.sizes


@dataclass
class FakeBook:
    models: dict[str, FakeModel] = field(
        default_factory=lambda: (
            {
                name: FakeModel(name)
                for name in ("gpt-image-2", "gpt-image-1.5", "gpt-image-1", "gpt-image-1-mini")
            }
            | {"dall-e-3": FakeModel("dall-e-3", ("standard", "hd"), ("1024x1024", "1792x1024"))}
        )
    )
    mainline: dict[str, str] = field(
        default_factory=lambda: {name: name for name in ("gpt-5", "gpt-5.5", "gpt-4.1-mini")}
    )
    path: Path | None = None

    def find(self, model: str) -> FakeModel | None:
        return self.models.get(model)

    def find_mainline(self, model: str) -> str | None:
        return self.mainline.get(model)

    def at_data_residency(self) -> FakeBook:
        return self


def fake_loader(path: Path | None) -> Any:
    return FakeBook(path=path)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def team_yaml(name: str = "t", sha: str = KEY_A, extra: str = "") -> str:
    return f"name: {name}\nkeys:\n  - {{id: k, sha256: {sha}}}\n" + textwrap.dedent(extra)


@pytest.fixture
def policies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A minimal directory configuration at ./policies (messages show relative paths)."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "policies" / "tollgate.yaml", "timezone: UTC\n")
    return Path("policies")


def load(path: Path | str, **env: str) -> Config:
    return load_config(path, env=env, price_book_loader=fake_loader)


def problems_of(path: Path | str, **env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(path, **env)
    return caught.value.problems


# -- the example policies --------------------------------------------------------


def test_example_policies_load_with_the_builtin_price_book() -> None:
    try:
        config = load_config(EXAMPLES, env={"OPENAI_API_KEY": "sk-test"})
    except NotImplementedError:
        pytest.skip("the price book is not implemented yet")
    assert [team.name for team in config.teams] == ["design", "research"]


def test_example_policies_hold_the_documented_settings() -> None:
    config = load(EXAMPLES, OPENAI_API_KEY="sk-test")
    assert config.root == EXAMPLES
    assert config.upstream.api_key == "sk-test"
    assert config.upstream.base_url == "https://api.openai.com/v1"
    assert config.upstream.timeout_s == 300.0
    assert config.admin_token is None
    assert config.ledger_url == f"sqlite:///{EXAMPLES}/tollgate.db"
    assert config.organization_budgets == (
        Budget("month", "usd", 20_000 * 10**9, where=f"{EXAMPLES}/tollgate.yaml:28"),
    )
    design, research = config.teams
    assert design.cost_center == "CC-1042"
    assert [(b.period, b.metric, b.limit) for b in design.budgets] == [
        ("month", "usd", 800 * 10**9),
        ("day", "usd", 60 * 10**9),
        ("month", "image_output_tokens", 20_000_000),
    ]
    assert design.budgets[0].alert_at == (Decimal("0.5"), Decimal("0.8"), Decimal("0.95"))
    assert design.per_user[0].limit == 5 * 10**9
    assert design.allow.models == frozenset({"gpt-image-2", "gpt-image-1.5", "gpt-image-1-mini"})
    assert design.allow.endpoints == frozenset({"generations", "edits"})
    assert design.allow.params == {"moderation": frozenset({"auto"})}
    assert [(t.above, t.max_quality) for t in design.throttle] == [
        (Decimal("0.8"), "medium"),
        (Decimal("0.95"), "low"),
    ]
    assert design.downgrade.fallback_model == "gpt-image-1-mini"
    assert research.on_exhausted == "reject"
    assert research.allow.models is None and research.allow.endpoints is None


@pytest.mark.parametrize(
    ("secret", "team"),
    [
        ("tg_demo_design_0123456789abcdef", "design"),
        ("tg_demo_research_0123456789abcdef", "research"),
    ],
)
def test_example_demo_keys_identify_their_team(secret: str, team: str) -> None:
    config = load(EXAMPLES)
    found, _key = config.team_by_key_hash()[hashlib.sha256(secret.encode()).hexdigest()]
    assert found.name == team


@pytest.mark.parametrize("name", ["tollgate.yaml", "teams/design.yaml", "teams/research.yaml"])
def test_schema_accepts_the_example_files(name: str) -> None:
    data = yaml.safe_load((EXAMPLES / name).read_text())
    assert list(Draft202012Validator(config_schema()).iter_errors(data)) == []


def test_schema_is_valid_draft_2020_12_and_rejects_unknown_keys() -> None:
    schema = config_schema()
    Draft202012Validator.check_schema(schema)
    assert not Draft202012Validator(schema).is_valid({"name": "x", "keys": [], "budget": []})


# -- shapes that load --------------------------------------------------------------


def test_single_file_config_with_inline_teams(tmp_path: Path) -> None:
    path = write(
        tmp_path / "all.yaml",
        f"""
        default_model: gpt-image-1
        teams:
          - name: a
            keys: [{{id: k, sha256: {KEY_A.upper()}}}]
            budgets:
              - {{period: week, limit_usd: 0.25}}
          - name: b
            keys: [{{id: k, sha256: {KEY_B}}}]
        """,
    )
    config = load(path)
    assert config.root == tmp_path
    assert [t.name for t in config.teams] == ["a", "b"]
    assert config.teams[0].source == str(path)
    assert config.teams[0].budgets == (Budget("week", "usd", 250_000_000, where=f"{path}:6"),)
    assert config.team_by_key_hash()[KEY_A][0].name == "a"  # hashes are lowercased
    assert config.ledger_url == f"sqlite:///{tmp_path}/tollgate.db"


def test_team_files_load_in_file_name_order(policies: Path) -> None:
    write(policies / "teams" / "b.yaml", team_yaml("zeta", KEY_A))
    write(policies / "teams" / "a.yaml", team_yaml("omega", KEY_B))
    assert [t.name for t in load(policies).teams] == ["omega", "zeta"]


def test_defaults_fill_an_empty_settings_file(policies: Path) -> None:
    write(policies / "tollgate.yaml", "# nothing\n")
    config = load(policies)
    assert config.default_model == "gpt-image-2"
    assert config.timezone == "UTC"
    assert config.limits.generations_bytes == 1024 * 1024
    assert config.limits.edits_bytes == 128 * 1024 * 1024
    assert config.upstream.max_connections == 4096
    assert config.alerts.webhooks == () and config.passthrough == ()
    assert config.teams == ()


def test_config_values_are_frozen(policies: Path) -> None:
    config = load(policies)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.timezone = "Europe/Paris"  # type: ignore[misc]


def test_env_variables_are_expanded_in_every_string(policies: Path) -> None:
    write(
        policies / "tollgate.yaml",
        """
        upstream:
          api_key: ${KEY}
          organization: ${ORG}
          base_url: https://${HOST}/v1/
        admin_token: ${ADMIN}
        """,
    )
    write(policies / "teams" / "t.yaml", team_yaml(extra="cost_center: CC-${CC}\n"))
    config = load(policies, KEY="sk-1", HOST="proxy.example", ADMIN="s3cret-admin-token", CC="7")
    assert config.upstream.api_key == "sk-1"
    assert config.upstream.organization is None  # unset -> empty -> off
    assert config.upstream.base_url == "https://proxy.example/v1"
    assert config.admin_token == "s3cret-admin-token"
    assert config.teams[0].cost_center == "CC-7"
    assert load(policies, HOST="proxy.example").admin_token is None
    assert load(policies, HOST="proxy.example").upstream.api_key is None


@pytest.mark.parametrize("setting", ["api_key", "organization", "project"])
@pytest.mark.parametrize("value", ["sk-s3cret\n", "sk-s3cret\r", " sk-s3cret", "sk-s3cr\u00e9t"])
def test_an_upstream_key_with_a_newline_or_a_space_is_refused_without_showing_it(
    policies: Path, setting: str, value: str
) -> None:
    write(policies / "tollgate.yaml", f"upstream:\n  {setting}: ${{VALUE}}\n")
    [problem] = problems_of(policies, VALUE=value)
    assert problem.startswith(f"policies/tollgate.yaml:2: upstream.{setting}: must be printable")
    assert "s3cr" not in problem


@pytest.mark.parametrize(
    "url", ["https://user:s3cret@proxy.example/v1", "https://s3cret@proxy.example/v1"]
)
def test_an_upstream_url_holding_credentials_is_refused_without_showing_them(
    policies: Path, url: str
) -> None:
    write(policies / "tollgate.yaml", "upstream:\n  base_url: ${URL}\n")
    [problem] = problems_of(policies, URL=url)
    assert problem.startswith("policies/tollgate.yaml:2: upstream.base_url: must not hold")
    assert "s3cret" not in problem


@pytest.mark.parametrize(
    ("ledger", "expected"),
    [
        ("sqlite:///tollgate.db", "sqlite:///{root}/tollgate.db"),
        ("sqlite:///data/ledger.db", "sqlite:///{root}/data/ledger.db"),
        ("sqlite:////var/lib/tollgate.db", "sqlite:////var/lib/tollgate.db"),
        ("postgresql://u@db/tollgate", "postgresql://u@db/tollgate"),
        ("postgres://u@db/tollgate", "postgresql://u@db/tollgate"),
    ],
)
def test_ledger_url_relative_sqlite_paths_resolve_against_the_config_root(
    policies: Path, ledger: str, expected: str
) -> None:
    write(policies / "tollgate.yaml", f"ledger: {ledger}\n")
    root = policies.absolute()
    assert load(policies).ledger_url == expected.format(root=root)


def test_prices_path_is_resolved_against_the_root(policies: Path) -> None:
    write(policies / "tollgate.yaml", "prices: extra/prices.yaml\n")
    book = load(policies).prices
    assert isinstance(book, FakeBook)
    assert book.path == policies.absolute() / "extra" / "prices.yaml"


def test_price_book_problems_are_reported_with_the_others(policies: Path) -> None:
    write(policies / "tollgate.yaml", "prices: bad.yaml\ntimezone: Nowhere/Land\n")

    def broken(path: Path | None) -> Any:
        raise ConfigError([f"{path}:3: models.x.rates: must be a mapping"])

    with pytest.raises(ConfigError) as caught:
        load_config(policies, env={}, price_book_loader=broken)
    assert caught.value.problems == [
        f"{policies.absolute()}/bad.yaml:3: models.x.rates: must be a mapping"
    ]


def test_a_price_book_that_cannot_be_read_is_a_problem_at_its_prices_line(
    policies: Path,
) -> None:
    write(policies / "tollgate.yaml", "timezone: UTC\nprices: missing.yaml\n")
    with pytest.raises(ConfigError) as caught:
        load_config(policies, env={})
    # `file:line: message`, as `tollgate check` prints every problem.
    assert caught.value.problems == [
        f"{policies / 'tollgate.yaml'}:2: prices: cannot read "
        f"{policies.absolute() / 'missing.yaml'}: No such file or directory"
    ]


@pytest.mark.parametrize("device", ["/dev/null"])
def test_a_price_book_that_is_a_device_is_refused_unread(policies: Path, device: str) -> None:
    """`/dev/zero` (or a pipe with no writer) was read for ever: a reload never ended, and
    held the lock every later reload waits for."""
    write(policies / "tollgate.yaml", f"timezone: UTC\nprices: {device}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(policies, env={})
    assert caught.value.problems == [
        f"{policies / 'tollgate.yaml'}:2: prices: cannot read {device}: not a regular file"
    ]


def test_allow_params_values_are_text(policies: Path) -> None:
    write(
        policies / "teams" / "t.yaml",
        team_yaml(
            extra="allow:\n  params:\n"
            "    {moderation: [auto, low], stream: [false], partial_images: [0, 1]}\n"
        ),
    )
    params = load(policies).teams[0].allow.params
    assert params == {
        "moderation": {"auto", "low"},
        "stream": {"false"},
        "partial_images": {"0", "1"},
    }


def test_allow_models_may_name_mainline_models(policies: Path) -> None:
    extra = "allow:\n  models: [gpt-image-2, gpt-5.5, gpt-4.1-mini]\n  max_quality: medium\n"
    write(policies / "teams" / "t.yaml", team_yaml(extra=extra))
    allow = load(policies).teams[0].allow
    assert allow.models == {"gpt-image-2", "gpt-5.5", "gpt-4.1-mini"}


def test_allow_models_may_name_mainline_models_of_the_built_in_book(policies: Path) -> None:
    extra = "allow:\n  models: [gpt-image-2, gpt-5.5, gpt-5-2025-08-07, o3]\n"
    write(policies / "teams" / "t.yaml", team_yaml(extra=extra))
    config = load_config(policies, env={})
    assert config.teams[0].allow.models == {"gpt-image-2", "gpt-5.5", "gpt-5-2025-08-07", "o3"}


def test_throttle_tiers_are_sorted_by_threshold(policies: Path) -> None:
    extra = """
    budgets: [{period: month, limit_usd: 10}]
    throttle:
      - {above: 0.9, max_quality: low}
      - {above: 0.5, max_quality: medium}
    """
    write(policies / "teams" / "t.yaml", team_yaml(extra=extra))
    assert [t.above for t in load(policies).teams[0].throttle] == [Decimal("0.5"), Decimal("0.9")]


def test_default_config_path() -> None:
    assert default_config_path({"TOLLGATE_CONFIG": "/etc/tollgate"}) == Path("/etc/tollgate")
    assert default_config_path({}) == Path("policies")


# -- a project per team -------------------------------------------------------------


def test_a_team_names_the_openai_project_its_requests_are_billed_to(policies: Path) -> None:
    write(policies / "tollgate.yaml", "upstream: {project: proj_company}\n")
    write(policies / "teams" / "a.yaml", team_yaml("a", KEY_A, "openai_project: proj_a1\n"))
    write(policies / "teams" / "b.yaml", team_yaml("b", KEY_B))
    config = load(policies)
    assert [t.openai_project for t in config.teams] == ["proj_a1", None]
    assert config.project_of("a") == "proj_a1"
    assert config.project_of("b") == "proj_company"
    assert config.project_of("gone") == "proj_company"
    assert config.team_named("a") is config.teams[0]


def test_without_any_project_a_team_has_none(policies: Path) -> None:
    write(policies / "teams" / "a.yaml", team_yaml("a"))
    assert load(policies).project_of("a") is None


def test_openai_project_may_come_from_the_environment(policies: Path) -> None:
    write(policies / "teams" / "t.yaml", team_yaml(extra="openai_project: ${A_PROJECT}\n"))
    assert load(policies, A_PROJECT="proj_x").teams[0].openai_project == "proj_x"
    assert problems_of(policies) == [
        "policies/teams/t.yaml:4: openai_project: must be an OpenAI project id, "
        "e.g. 'proj_abc123', got ''"
    ]


@pytest.mark.parametrize("value", ["''", "proj_", "abc123", "proj abc", "12", "null", "[proj_a]"])
def test_openai_project_must_be_a_project_id(policies: Path, value: str) -> None:
    write(policies / "teams" / "t.yaml", team_yaml(extra=f"openai_project: {value}\n"))
    [problem] = problems_of(policies)
    assert problem.startswith("policies/teams/t.yaml:4: openai_project: must be an OpenAI")


def test_a_misspelt_openai_project_is_an_unknown_key(policies: Path) -> None:
    write(policies / "teams" / "t.yaml", team_yaml(extra="openai_projet: proj_a\n"))
    assert problems_of(policies) == [
        "policies/teams/t.yaml:4: openai_projet: unknown key (did you mean 'openai_project'?)"
    ]


# -- problems in a team file -------------------------------------------------------

TEAM_PROBLEMS = [
    (
        "budgets:\n  - {period: month, limit_usd: 800}\n  - {period: day, limit_usd: abc}\n",
        "6: budgets[1].limit_usd: must be a number > 0 and <= 1000000000, got 'abc'",
    ),
    (
        "budget:\n  - {period: day, limit_usd: 1}\n",
        "4: budget: unknown key (did you mean 'budgets'?)",
    ),
    (
        "budgets:\n  - {period: day, limit_usd: 1, image_output_tokens: 5}\n",
        "5: budgets[0]: needs exactly one limit: limit_usd or one of text_input_tokens, "
        "image_input_tokens, image_output_tokens, total_tokens",
    ),
    (
        "budgets:\n  - {period: day}\n",
        "5: budgets[0]: needs exactly one limit: limit_usd or one of text_input_tokens, "
        "image_input_tokens, image_output_tokens, total_tokens",
    ),
    (
        "budgets:\n  - {period: year, limit_usd: 1}\n",
        "5: budgets[0].period: must be one of 'day', 'week', 'month', 'total', got 'year'",
    ),
    (
        "per_user:\n  - {period: day, total_tokens: 1.5}\n",
        "5: per_user[0].total_tokens: must be an integer >= 1 and <= 9007199254740991, got 1.5",
    ),
    (
        "budgets:\n  - {period: day, limit_usd: 0.0000000001}\n",
        "5: budgets[0].limit_usd: must be exact to the nano-dollar (9 decimals), got 0.0000000001",
    ),
    (
        # A float reads it as 0.3.
        "budgets:\n  - {period: day, limit_usd: 0.30000000000000001}\n",
        "5: budgets[0].limit_usd: must be exact to the nano-dollar (9 decimals), got "
        "0.30000000000000001",
    ),
    (
        "budgets:\n  - {period: day, limit_usd: .inf}\n",
        "5: budgets[0].limit_usd: must be a number > 0 and <= 1000000000, got '.inf'",
    ),
    (
        "budgets:\n  - period: day\n    limit_usd: 5\n    alert_at: [0.5, 0]\n",
        "7: budgets[0].alert_at[1]: must be a number > 0 and <= 1, got 0",
    ),
    (
        "allow:\n  models: [gpt-image-2, gpt-image-9]\n",
        "5: allow.models[1]: model 'gpt-image-9' is not in the price book"
        " (did you mean 'gpt-image-2'?)",
    ),
    (
        "allow:\n  models: [gpt-image-2]\n  max_quality: ultra\n",
        "6: allow.max_quality: 'ultra' is not a quality of the allowed models"
        " (known: low, medium, high)",
    ),
    (
        "allow:\n  models: [dall-e-3]\n  max_quality: high\n",
        "6: allow.max_quality: 'high' is not a quality of the allowed models (known: standard, hd)",
    ),
    (
        "allow:\n  sizes: [1024x1024, 999x999]\n",
        "5: allow.sizes[1]: '999x999' is not a size any allowed model accepts",
    ),
    (
        "allow:\n  sizes: [big]\n",
        "5: allow.sizes[0]: must be 'auto' or WIDTHxHEIGHT, e.g. '1024x1024', got 'big'",
    ),
    (
        "allow:\n  endpoints: [generations, images]\n",
        "5: allow.endpoints[1]: must be one of 'generations', 'edits', 'variations', "
        "'responses', 'batches', got 'images'",
    ),
    ("allow:\n  max_n: 0\n", "5: allow.max_n: must be an integer >= 1 and <= 10, got 0"),
    (
        "allow:\n  params:\n    model: [gpt-image-2]\n",
        "6: allow.params.model: use allow.models instead",
    ),
    (
        "allow:\n  params:\n    moderatoin: [auto]\n",
        "6: allow.params.moderatoin: not a request parameter Tollgate reads (did you mean "
        "'moderation'?)",
    ),
    (
        "allow:\n  params:\n    seed: [1]\n",
        "6: allow.params.seed: not a request parameter Tollgate reads (known: action, "
        "background, input_fidelity, moderation, output_compression, output_format, "
        "partial_images, response_format, safety_identifier, stream, style, user)",
    ),
    (
        "budgets: [{period: month, limit_usd: 5}]\nthrottle:\n  - {above: 0.5, max_quality: low}\n"
        "  - {above: 1.5, max_quality: low}\n",
        "7: throttle[1].above: must be a number > 0 and <= 1, got 1.5",
    ),
    (
        "budgets: [{period: month, limit_usd: 5}]\n"
        "throttle:\n  - {above: 0.5, max_quality: lowest}\n",
        "6: throttle[0].max_quality: 'lowest' is not a quality of the allowed models "
        "(known: low, medium, high, standard, hd)",
    ),
    (
        "budgets: [{period: month, total_tokens: 5}]\n"
        "throttle:\n  - {above: 0.5, max_quality: low}\n",
        "5: throttle: needs a USD budget in `budgets` (tiers are fractions of the tightest one)",
    ),
    ("on_exhausted: block\n", "4: on_exhausted: must be one of 'downgrade', 'reject', got 'block'"),
    (
        "downgrade:\n  order: [quality, size, quality]\n",
        "5: downgrade.order[2]: duplicate entry 'quality'",
    ),
    (
        "downgrade:\n  fallback_model: gpt-imag-1-mini\n",
        "5: downgrade.fallback_model: model 'gpt-imag-1-mini' is not in the price book "
        "(did you mean 'gpt-image-1-mini'?)",
    ),
    (
        "allow:\n  models: [gpt-image-2, gpt-5.6]\n",
        "5: allow.models[1]: model 'gpt-5.6' is not in the price book (did you mean 'gpt-5.5'?)",
    ),
    (
        "downgrade:\n  fallback_model: gpt-5\n",
        "5: downgrade.fallback_model: model 'gpt-5' is a mainline text model; "
        "an image model is needed",
    ),
    (
        "allow:\n  models: [gpt-image-2]\ndowngrade:\n  fallback_model: gpt-image-1-mini\n",
        "7: downgrade.fallback_model: model 'gpt-image-1-mini' is not in allow.models "
        "(gpt-image-2): a downgrade would send a model the team may not use; add it to "
        "allow.models or choose one of them",
    ),
    ("cost_center: [a]\n", "4: cost_center: must be a string, got a list"),
    (
        "budgets:\n  - {period: day, limit_usd: 1\n",
        "6: YAML syntax error: expected ',' or '}', but got '<stream end>'",
    ),
    ("allow: {}\nallow: {}\n", "5: allow: duplicate key"),
]


@pytest.mark.parametrize(("extra", "expected"), TEAM_PROBLEMS)
def test_team_file_problem_names_file_line_and_key_path(
    policies: Path, extra: str, expected: str
) -> None:
    write(policies / "teams" / "t.yaml", team_yaml(extra=extra))
    assert problems_of(policies) == [f"policies/teams/t.yaml:{expected}"]


def test_a_document_validated_before_is_reported_again_and_an_edit_is_seen(
    policies: Path,
) -> None:
    # What the schema says of a document is remembered (reloads of 1,000 team files).
    write(policies / "teams" / "t.yaml", team_yaml(extra="on_exhausted: block\n"))
    first = problems_of(policies)
    assert problems_of(policies) == first != []
    write(policies / "teams" / "t.yaml", team_yaml(extra="on_exhausted: reject\n"))
    assert [t.on_exhausted for t in load(policies).teams if t.name == "t"] == ["reject"]
    write(policies / "teams" / "t.yaml", team_yaml(extra="on_exhausted: 2026-01-01\n"))
    assert problems_of(policies) == [
        "policies/teams/t.yaml:4: on_exhausted: must be one of 'downgrade', 'reject', "
        "got 2026-01-01"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: t\n", ["1: missing required key 'keys'"]),
        ("name: t\nkeys: []\n", ["2: keys: must not be empty"]),
        (
            "name: t\nkeys:\n  - {id: k, sha256: abc123}\n",
            [
                "3: keys[0].sha256: must be the key's SHA-256 as 64 hexadecimal characters,"
                " got 'abc123'"
            ],
        ),
        (
            f"name: t\nkeys:\n  - {{id: k, sha256: {KEY_A}}}\n  - {{id: k, sha256: {KEY_B}}}\n",
            ["4: keys[1].id: duplicate key id 'k' (also keys[0])"],
        ),
        (
            f"name: my team\nkeys: [{{id: k, sha256: {KEY_A}}}]\n",
            [
                "1: name: must be a name of at most 64 letters, digits, '-', '_' or '.',"
                " got 'my team'"
            ],
        ),
        ("- a list\n", ["1: must be a mapping, got a list"]),
    ],
)
def test_team_key_problems(policies: Path, text: str, expected: list[str]) -> None:
    write(policies / "teams" / "t.yaml", text)
    assert problems_of(policies) == [f"policies/teams/t.yaml:{e}" for e in expected]


# -- problems in tollgate.yaml -----------------------------------------------------

IMAGES = "would forward image requests unmetered"


def shared(store: str) -> str:
    return (
        f"would show every team the objects OpenAI keeps under {store} for the company key, "
        "which Tollgate cannot keep to the team that made each one"
    )


KEPT_OBJECTS = (
    "would forward the responses, batches and files Tollgate keeps to each team (and, "
    "written to, image spend it did not price): Tollgate serves those paths itself"
)
NOT_PLAIN = (
    "is not a plain path: no '.' or '..' segments, empty segments, '%' escapes, backslashes "
    "or spaces"
)
SETTINGS_PROBLEMS = [
    (
        "upstream:\n  base_url: https://eu.api.openai.com/v1\n  data_residency: false\n",
        "3: upstream.data_residency: eu.api.openai.com is a data-residency endpoint, where "
        "OpenAI bills 10 % above the price book's rates for models released on or after "
        "2026-03-05: it cannot be priced at the global rates (remove `data_residency: "
        "false`, or use https://api.openai.com/v1)",
    ),
    (
        "upstream:\n  base_url: https://MTLS-US.api.openai.com./v1\n  data_residency: false\n",
        "3: upstream.data_residency: mtls-us.api.openai.com is a data-residency endpoint, where "
        "OpenAI bills 10 % above the price book's rates for models released on or after "
        "2026-03-05: it cannot be priced at the global rates (remove `data_residency: "
        "false`, or use https://api.openai.com/v1)",
    ),
    (
        "upstream:\n  data_residency: yes please\n",
        "2: upstream.data_residency: must be true or false, got 'yes please'",
    ),
    ("upstream:\n  timout_s: 3\n", "2: upstream.timout_s: unknown key (did you mean 'timeout_s'?)"),
    (
        "upstream:\n  timeout_s: 0\n",
        "2: upstream.timeout_s: must be a number > 0 and <= 1000000000, got 0",
    ),
    ("timezone: Mars/Olympus\n", "1: timezone: unknown time zone 'Mars/Olympus'"),
    (
        "ledger: mysql://db\n",
        "1: ledger: must be a URL sqlite:///PATH or postgresql://…, got 'mysql://db'",
    ),
    ("ledger: ${DB}\n", "1: ledger: must be a URL sqlite:///PATH or postgresql://…, got ''"),
    (
        "default_model: gpt-image-7\n",
        "1: default_model: model 'gpt-image-7' is not in the price book"
        " (did you mean 'gpt-image-2'?)",
    ),
    (
        "default_model: gpt-5.5\n",
        "1: default_model: model 'gpt-5.5' is a mainline text model; an image model is needed",
    ),
    (
        "organization:\n  budgets:\n    - {period: month, limit_usd: -5}\n",
        "3: organization.budgets[0].limit_usd: must be a number > 0 and <= 1000000000, got -5",
    ),
    (
        "limits:\n  edits_bytes: 0\n",
        "2: limits.edits_bytes: must be an integer >= 1 and <= 9007199254740991, got 0",
    ),
    (
        "limits:\n  edit_bytes: 10\n",
        "2: limits.edit_bytes: unknown key (did you mean 'edits_bytes'?)",
    ),
    (
        "passthrough: [/v2/models]\n",
        "1: passthrough[0]: must be a path prefix starting with '/v1/', got '/v2/models'",
    ),
    (
        "passthrough:\n  - /v1/models\n  - /v1/images/generations\n",
        "3: passthrough[1]: '/v1/images/generations' would forward image requests unmetered",
    ),
    ("passthrough: [/v1/images]\n", "1: passthrough[0]: '/v1/images' " + IMAGES),
    ("passthrough: [/v1/i]\n", "1: passthrough[0]: '/v1/i' " + IMAGES),
    ("passthrough: [/v1/IMAGES/edits]\n", "1: passthrough[0]: '/v1/IMAGES/edits' " + IMAGES),
    (
        "passthrough: [/v1/tollgate]\n",
        "1: passthrough[0]: '/v1/tollgate' would forward /v1/tollgate, Tollgate's own paths",
    ),
    (
        "passthrough: [/v1/Tollgate/budget]\n",
        "1: passthrough[0]: '/v1/Tollgate/budget' would forward /v1/tollgate, Tollgate's own paths",
    ),
    (
        "passthrough:\n  - {path: /v1/images/variations, methods: [POST]}\n",
        "2: passthrough[0].path: '/v1/images/variations' " + IMAGES,
    ),
    (
        "passthrough:\n  - {path: /v1/responses, methods: [GET, POST]}\n",
        "2: passthrough[0].path: '/v1/responses' " + KEPT_OBJECTS,
    ),
    (
        "passthrough:\n  - {path: /v1/Batches/x, methods: [DELETE]}\n",
        "2: passthrough[0].path: '/v1/Batches/x' " + KEPT_OBJECTS,
    ),
    ("passthrough: [/v1/files]\n", "1: passthrough[0]: '/v1/files' " + KEPT_OBJECTS),
    (
        "passthrough: [/v1/vector_stores]\n",
        "1: passthrough[0]: '/v1/vector_stores' " + shared("/v1/vector_stores"),
    ),
    (
        "passthrough: [/v1/Uploads/x]\n",
        "1: passthrough[0]: '/v1/Uploads/x' " + shared("/v1/uploads"),
    ),
    (
        "passthrough:\n  - {path: /v1/containers, methods: [DELETE]}\n",
        "2: passthrough[0].path: '/v1/containers' " + shared("/v1/containers"),
    ),
    (
        "passthrough: [/v1/chatkit/threads]\n",
        "1: passthrough[0]: '/v1/chatkit/threads' " + shared("/v1/chatkit"),
    ),
    (
        "passthrough: [/v1/skills]\n",
        "1: passthrough[0]: '/v1/skills' " + shared("/v1/skills"),
    ),
    (
        "passthrough:\n  - {path: /v1/Skills/x/content, methods: [GET]}\n",
        "2: passthrough[0].path: '/v1/Skills/x/content' " + shared("/v1/skills"),
    ),
    (
        "passthrough: [/v1/agents/sessions]\n",
        "1: passthrough[0]: '/v1/agents/sessions' " + shared("/v1/agents"),
    ),
    ("passthrough: [/v1/vaults]\n", "1: passthrough[0]: '/v1/vaults' " + shared("/v1/vaults")),
    (
        "passthrough: [/v1/live/sessions]\n",
        "1: passthrough[0]: '/v1/live/sessions' " + shared("/v1/live"),
    ),
    (
        "passthrough:\n  - {path: /v1/Live, methods: [POST]}\n",
        "2: passthrough[0].path: '/v1/Live' with POST would let a team mint client secrets or "
        "sessions with the upstream key (Realtime, Live and ChatKit): only GET and HEAD may "
        "be passed through there",
    ),
    (
        "passthrough:\n  - {path: /v1/audio, methods: [GET, POST, DELETE]}\n",
        "2: passthrough[0].path: '/v1/audio' " + shared("/v1/audio/voices"),
    ),
    (
        "passthrough: [/v1/Audio/voice_consents/x]\n",
        "1: passthrough[0]: '/v1/Audio/voice_consents/x' " + shared("/v1/audio/voice_consents"),
    ),
    (
        "passthrough:\n  - {path: /v1/webhook_endpoints, methods: [GET, POST]}\n",
        "2: passthrough[0].path: '/v1/webhook_endpoints' with POST would let a team change "
        "the whole account (the organization's API keys, users and projects, its webhook "
        "endpoints, or delete its fine-tuned models): only GET and HEAD may be passed "
        "through there",
    ),
    ("passthrough: [/v1/Responses/x]\n", "1: passthrough[0]: '/v1/Responses/x' " + KEPT_OBJECTS),
    (
        "passthrough:\n  - {path: /v1/projects, methods: [GET, POST]}\n",
        "2: passthrough[0].path: '/v1/projects' with POST would let a team change the "
        "whole account (the organization's API keys, users and projects, its webhook "
        "endpoints, or delete its fine-tuned models): only GET and HEAD may be passed "
        "through there",
    ),
    (
        "passthrough:\n  - {path: /v1/organization, methods: [GET, POST]}\n",
        "2: passthrough[0].path: '/v1/organization' with POST would let a team change the "
        "whole account (the organization's API keys, users and projects, its webhook "
        "endpoints, or delete its fine-tuned models): only GET and HEAD may be passed "
        "through there",
    ),
    (
        "passthrough:\n  - {path: /v1/Models, methods: [GET, DELETE]}\n",
        "2: passthrough[0].path: '/v1/Models' with DELETE would let a team change the whole "
        "account (the organization's API keys, users and projects, its webhook endpoints, or "
        "delete its fine-tuned models): only GET and HEAD may be passed through there",
    ),
    (
        "passthrough:\n  - {path: /v1/realtime, methods: [GET, POST]}\n",
        "2: passthrough[0].path: '/v1/realtime' with POST would let a team mint client "
        "secrets or sessions with the upstream key (Realtime, Live and ChatKit): only GET and HEAD "
        "may be passed through there",
    ),
    (
        "passthrough:\n  - {path: /v1/ChatKit/sessions/x, methods: [POST]}\n",
        "2: passthrough[0].path: '/v1/ChatKit/sessions/x' with POST would let a team mint "
        "client secrets or sessions with the upstream key (Realtime, Live and ChatKit): only GET "
        "and HEAD may be passed through there",
    ),
    (
        "passthrough: [/v1/models/../images]\n",
        "1: passthrough[0]: '/v1/models/../images' " + NOT_PLAIN,
    ),
    ("passthrough: ['/v1/models/%2e%2e']\n", "1: passthrough[0]: '/v1/models/%2e%2e' " + NOT_PLAIN),
    ("passthrough: [/v1//models]\n", "1: passthrough[0]: '/v1//models' " + NOT_PLAIN),
    ("passthrough: [/v1/models, /v1/models/]\n", "1: passthrough[1]: '/v1/models' is listed twice"),
    (
        "passthrough:\n  - {path: /v1/files, methods: [GET, TRACE]}\n",
        "2: passthrough[0].methods[1]: must be one of 'GET', 'HEAD', 'POST', 'PUT', 'PATCH', "
        "'DELETE', got 'TRACE'",
    ),
    (
        "passthrough:\n  - {path: /v1/files, method: [GET]}\n",
        "2: passthrough[0].method: unknown key (did you mean 'methods'?)",
    ),
    (
        "alerts:\n  webhooks: [hooks.example]\n",
        "2: alerts.webhooks[0]: must be an http:// or https:// URL, got 'hooks.example'",
    ),
    ("prices: ''\n", "1: prices: must be a non-empty string, got ''"),
    (
        "timezone: UTC\n\nadmin_tokn: x\n",
        "3: admin_tokn: unknown key (did you mean 'admin_token'?)",
    ),
]


@pytest.mark.parametrize(("text", "expected"), SETTINGS_PROBLEMS)
def test_settings_problem_names_file_line_and_key_path(
    policies: Path, text: str, expected: str
) -> None:
    write(policies / "tollgate.yaml", text)
    assert problems_of(policies) == [f"policies/tollgate.yaml:{expected}"]


@pytest.mark.parametrize(
    "url", ["https://api.openai.com/v1", "https://mtls.api.openai.com/v1", "http://127.0.0.1:9"]
)
def test_an_upstream_billed_at_the_price_books_rates_is_accepted(policies: Path, url: str) -> None:
    write(policies / "tollgate.yaml", f"upstream:\n  base_url: {url}\n")
    assert load(policies).upstream.base_url == url
    assert not load(policies).upstream.data_residency


def ceil_nanos(nanos: Decimal) -> int:
    return int(nanos.to_integral_value(ROUND_CEILING))


@pytest.mark.parametrize(
    ("settings", "regional"),
    [
        ("base_url: https://eu.api.openai.com/v1", True),
        ("base_url: https://MTLS-EU.api.openai.com./v1", True),
        ("base_url: https://eu.api.openai.com/v1\n  data_residency: true", True),
        ("base_url: http://127.0.0.1:9/v1\n  data_residency: true", True),
        ("base_url: http://127.0.0.1:9/v1\n  data_residency: false", False),
        ("base_url: https://api.openai.com/v1", False),
    ],
)
def test_a_data_residency_endpoint_is_priced_at_its_uplift_for_models_released_since_march(
    policies: Path, settings: str, regional: bool
) -> None:
    """OpenAI bills regional endpoints 10 % above the book's rates for models released on
    or after 2026-03-05: gpt-image-2, 2.5, gpt-5.4 and 5.5, not gpt-image-1.5 or gpt-4.1."""
    write(policies / "tollgate.yaml", f"upstream:\n  {settings}\n")
    config = load_config(policies, env={})
    book = config.prices
    assert config.upstream.data_residency is regional
    usage = Usage(text_input=13, image_input=7, image_output=7024)
    mainline = Usage(mainline_input=1820, mainline_cached_input=3, mainline_output=210)
    uplift = Decimal("1.1") if regional else Decimal(1)
    for name in ("gpt-image-2", "gpt-image-2-2026-04-21", "gpt-image-2.5-flare"):
        model = book.find(name)
        assert model is not None
        # 13 x 5 + 7 x 8 + 7024 x 30 = 210,841 micro-dollars
        assert model.cost(usage) == ceil_nanos(Decimal(210_841_000) * uplift)
        assert model.for_batch().cost(usage) == ceil_nanos(Decimal(105_420_500) * uplift)
    model = book.find("gpt-image-1.5")
    assert model is not None and model.cost(usage) == 224_889_000
    line = book.find_mainline("gpt-5.5")
    assert line is not None
    # 1820 x 5 + 3 x 0.5 + 210 x 30 = 15,401.5 micro-dollars
    assert line.cost(mainline) == ceil_nanos(Decimal(15_401_500) * uplift)
    assert line.for_batch().cost(mainline) == ceil_nanos(Decimal(7_700_750) * uplift)
    line = book.find_mainline("gpt-4.1")
    assert line is not None and line.cost(mainline) == 5_321_500


def test_passthrough_is_get_and_head_unless_the_methods_are_listed(policies: Path) -> None:
    write(
        policies / "tollgate.yaml",
        "passthrough:\n  - /v1/models/\n  - {path: /v1/moderations, methods: [GET, POST]}\n",
    )
    assert load(policies).passthrough == (
        Passthrough("/v1/models", frozenset({"GET", "HEAD"})),
        Passthrough("/v1/moderations", frozenset({"GET", "POST"})),
    )


def test_the_other_image_doors_are_never_passed_through_not_even_for_reading(
    policies: Path,
) -> None:
    # Their objects are kept to each team by Tollgate's own routes; a path under them that
    # no route takes would reach another team's object with the company key.
    write(policies / "tollgate.yaml", "passthrough:\n  - /v1/responses\n  - /v1/batches\n")
    assert problems_of(policies) == [
        f"policies/tollgate.yaml:2: passthrough[0]: '/v1/responses' {KEPT_OBJECTS}",
        f"policies/tollgate.yaml:3: passthrough[1]: '/v1/batches' {KEPT_OBJECTS}",
    ]


def test_missing_settings_file_is_a_problem(policies: Path) -> None:
    (policies / "tollgate.yaml").unlink()
    assert problems_of(policies) == ["policies/tollgate.yaml: not found (the global settings file)"]


def test_missing_config_path_is_a_problem(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "nope") == [f"{tmp_path}/nope: no such file or directory"]


# -- across files, and all at once -------------------------------------------------


def test_every_problem_of_every_file_is_reported_at_once(policies: Path) -> None:
    write(policies / "tollgate.yaml", "timezone: UTC\nupstream:\n  timout_s: 3\n")
    write(policies / "teams" / "a.yaml", team_yaml("a", KEY_A, "on_exhausted: never\n"))
    write(policies / "teams" / "b.yaml", team_yaml("b", KEY_B, "allow: {models: [nope]}\n"))
    assert problems_of(policies) == [
        "policies/tollgate.yaml:3: upstream.timout_s: unknown key (did you mean 'timeout_s'?)",
        "policies/teams/a.yaml:4: on_exhausted: must be one of 'downgrade', 'reject', got 'never'",
        "policies/teams/b.yaml:4: allow.models[0]: model 'nope' is not in the price book",
    ]


def test_duplicate_team_names_across_files(policies: Path) -> None:
    write(policies / "teams" / "a.yaml", team_yaml("design", KEY_A))
    write(policies / "teams" / "b.yaml", "# the same team again\n" + team_yaml("design", KEY_B))
    assert problems_of(policies) == [
        "policies/teams/b.yaml:2: name: team 'design' is already defined at policies/teams/a.yaml:1"
    ]


def test_one_key_hash_in_two_teams(policies: Path) -> None:
    write(policies / "teams" / "a.yaml", team_yaml("a", KEY_A))
    write(policies / "teams" / "b.yaml", team_yaml("b", KEY_A.upper()))
    assert problems_of(policies) == [
        "policies/teams/b.yaml:3: keys[0].sha256: same key hash as policies/teams/a.yaml:3"
    ]


def test_single_file_problems_name_the_inline_team_path(tmp_path: Path) -> None:
    path = write(
        tmp_path / "all.yaml",
        f"""
        teams:
          - name: a
            keys: [{{id: k, sha256: {KEY_A}}}]
            allow: {{models: [gpt-image-2, nope]}}
          - name: b
            keys: [{{id: k, sha256: {KEY_B}}}]
            budgets: [{{period: day, limit_usd: x}}]
        """,
    )
    assert problems_of(path) == [
        f"{path}:4: teams[0].allow.models[1]: model 'nope' is not in the price book",
        f"{path}:7: teams[1].budgets[0].limit_usd: must be a number > 0 and <= 1000000000, got 'x'",
    ]


@pytest.mark.parametrize(
    ("written", "nanos"),
    [
        ("0.1", 100_000_000),
        ("800", 800 * 10**9),
        ("0.000000001", 1),
        ("19.99", 19_990_000_000),
        # More digits than a float holds: read as written, not as the float nearest it.
        ("99999999.999999999", 99_999_999_999_999_999),
        ("123456789.123456789", 123_456_789_123_456_789),
        ("1_000.000_000_001", 1_000_000_000_001),
    ],
)
def test_limit_usd_is_exact_in_nano_dollars(policies: Path, written: str, nanos: int) -> None:
    write(
        policies / "teams" / "t.yaml",
        team_yaml(extra=f"per_user: [{{period: total, limit_usd: {written}}}]\n"),
    )
    assert load(policies).teams[0].per_user[0].limit == nanos


def test_yaml_merge_keys_may_be_overridden_but_keys_not_repeated(policies: Path) -> None:
    extra = """
    budgets:
      - &daily {period: day, limit_usd: 1, alert_at: [0.9, 0.5]}
      - {<<: *daily, period: week}
    """
    write(policies / "teams" / "t.yaml", team_yaml(extra=extra))
    budgets = load(policies).teams[0].budgets
    assert [(b.period, b.limit) for b in budgets] == [("day", 10**9), ("week", 10**9)]
    assert budgets[0].alert_at == (Decimal("0.5"), Decimal("0.9"))


def test_aliases_that_stand_for_too_many_values_are_a_problem_not_a_hang(policies: Path) -> None:
    """Nine levels of ten aliases each stand for a billion values ("billion laughs"): read
    out, they would take minutes and gigabytes; the file is refused at once instead."""
    levels = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in range(1, 9):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        levels.append(f"a{level}: &a{level} [{refs}]")
    write(policies / "teams" / "t.yaml", team_yaml() + "\n".join(levels) + "\n")
    (problem,) = problems_of(policies)
    assert problem.startswith("policies/teams/t.yaml:")
    assert "aliases stand for more than 10,000 values" in problem
    # A few aliases, as written by hand, are read as ever (see the merge keys above).
    budgets = "budgets:\n  - &day {period: day, limit_usd: 1}\n" + "".join(
        f"  - {{<<: *day, period: {p}}}\n" for p in ("week", "month", "total")
    )
    write(policies / "teams" / "t.yaml", team_yaml() + budgets)
    assert len(load(policies).teams[0].budgets) == 4


def test_empty_team_file_is_a_problem(policies: Path) -> None:
    write(policies / "teams" / "t.yaml", "# TODO\n")
    assert problems_of(policies) == [
        "policies/teams/t.yaml:1: empty file (a team needs `name` and `keys`)"
    ]


# -- limits ------------------------------------------------------------------------


def test_limits_default_to_bounds_on_time_and_memory(policies: Path) -> None:
    limits = load(policies).limits
    assert limits.inflight_bytes == 1024**3
    assert (limits.header_timeout_s, limits.body_idle_timeout_s, limits.body_timeout_s) == (
        10.0,
        30.0,
        300.0,
    )
    assert limits.max_connections is None  # sized from the descriptor limit at start


def test_limits_read_timeouts_as_seconds_and_sizes_as_bytes(policies: Path) -> None:
    write(
        policies / "tollgate.yaml",
        """
        limits:
          generations_bytes: 1000
          edits_bytes: 1000
          variations_bytes: 1000
          inflight_bytes: 3000
          header_timeout_s: 2
          body_idle_timeout_s: 0.5
          body_timeout_s: 60
          max_connections: 500
        """,
    )
    limits = load(policies).limits
    assert (limits.edits_bytes, limits.inflight_bytes, limits.max_connections) == (
        1000,
        3000,
        500,
    )
    assert (limits.header_timeout_s, limits.body_idle_timeout_s) == (2.0, 0.5)
    assert isinstance(limits.header_timeout_s, float)


def test_inflight_bytes_below_three_largest_bodies_is_refused(policies: Path) -> None:
    write(policies / "tollgate.yaml", "limits:\n  inflight_bytes: 402653183\n")
    (problem,) = problems_of(policies)
    assert problem.startswith("policies/tollgate.yaml:2: limits.inflight_bytes: ")
    assert "at least 3 times the largest body limit (134,217,728 bytes)" in problem


@pytest.mark.parametrize(
    "setting", ["header_timeout_s: 0", "body_idle_timeout_s: -1", "max_connections: 0"]
)
def test_limits_must_be_positive(policies: Path, setting: str) -> None:
    write(policies / "tollgate.yaml", f"limits:\n  {setting}\n")
    (problem,) = problems_of(policies)
    assert f"limits.{setting.partition(':')[0]}: must be" in problem


@pytest.mark.parametrize("value", ["s3cret-admin\n", " s3cret-admin", "s3cret admin", "s3crét"])
def test_an_admin_token_no_header_can_carry_is_refused_without_showing_it(
    policies: Path, value: str
) -> None:
    """Clients strip a header's spaces and send ASCII: the admin API would refuse every
    request, its token read from a secret file with a newline at its end."""
    write(policies / "tollgate.yaml", "admin_token: ${ADMIN}\n")
    [problem] = problems_of(policies, ADMIN=value)
    assert problem.startswith("policies/tollgate.yaml:1: admin_token: must be printable")
    assert "s3cr" not in problem


def test_an_admin_token_that_is_a_teams_key_is_refused_without_showing_it(
    policies: Path,
) -> None:
    """The team holding it would read every team's spend and reload the configuration."""
    write(policies / "tollgate.yaml", "admin_token: ${ADMIN}\n")
    write(policies / "teams" / "a.yaml", team_yaml("a", KEY_A))
    write(policies / "teams" / "b.yaml", team_yaml("b", KEY_B))
    problems = problems_of(policies, ADMIN="tg_b")  # short too: each is said
    assert (
        "policies/tollgate.yaml:1: admin_token: is a key of team 'b': use a token of its own"
    ) in problems
    assert load(policies, ADMIN="tg_admin_of_its_own").admin_token == "tg_admin_of_its_own"


@pytest.mark.parametrize("value", ["x", "s3cret", "fifteen-chars-x"])
def test_a_short_admin_token_is_refused_without_showing_it(policies: Path, value: str) -> None:
    """Whoever guesses it reads every team's spend and reloads the configuration."""
    write(policies / "tollgate.yaml", "admin_token: ${ADMIN}\n")
    [problem] = problems_of(policies, ADMIN=value)
    assert problem == (
        f"policies/tollgate.yaml:1: admin_token: is {len(value)} characters long: use at "
        "least 16, random (e.g. `openssl rand -hex 32`)"
    )
    assert load(policies, ADMIN="sixteen-chars-xx").admin_token == "sixteen-chars-xx"


def test_strings_that_only_look_like_no_text_are_kept(policies: Path) -> None:
    """Text written `\\u0000`, and a character past the BMP (two surrogates in JSON's
    ASCII escapes), are text."""
    write(
        policies / "teams" / "t.yaml",
        'name: t\ncost_center: "CC-\\\\u0000 \\U0001F600 \\ud7ff"\n'
        f"keys:\n  - {{id: k, sha256: {KEY_A}}}\n",
    )
    team = load(policies).team_named("t")
    assert team is not None and team.cost_center == "CC-\\u0000 \U0001f600 \ud7ff"


@pytest.mark.parametrize(
    ("team", "where"),
    [
        ('name: t\ncost_center: "CC-\\ud800"\nkeys:\n  - {id: k, sha256: %s}\n', "2: cost_center"),
        ('name: t\nkeys:\n  - {id: "k\\0", sha256: %s}\n', "3: keys[0].id"),
        (
            'name: t\nkeys:\n  - {id: k, sha256: %s}\nallow: {models: ["\\udfff"]}\n',
            "4: allow.models[0]",
        ),
    ],
)
def test_a_string_no_ledger_row_can_hold_is_refused_at_its_line(
    policies: Path, team: str, where: str
) -> None:
    """A lone surrogate (YAML's `"\\ud800"`) in a cost center made every request of the
    team a 500: its ledger row could not be written."""
    write(policies / "teams" / "t.yaml", team % KEY_A)
    [problem] = problems_of(policies)
    assert problem == (
        f"policies/teams/t.yaml:{where}: NUL characters and lone surrogates are not text "
        "(no ledger row or report can hold one)"
    )


# -- numbers and text that would not mean what they say --------------------------------

HUGE = "1" + "0" * 400  # past a float: a crash in `check` when read as seconds
TOO_MANY_DIGITS = "1" + "0" * 5000  # past what Python reads from text at all


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            f"limits:\n  header_timeout_s: {HUGE}\n",
            "2: limits.header_timeout_s: must be a number > 0 and <= 1000000000, got "
            f"{HUGE[:57]}...",
        ),
        (
            f"upstream:\n  timeout_s: {TOO_MANY_DIGITS}\n",
            "2: upstream.timeout_s: must be a number > 0 and <= 1000000000, got "
            f"'{TOO_MANY_DIGITS[:57]}...'",
        ),
        (
            # Each kept answer made room in the ledger with it: a 64-bit column.
            "retries:\n  store_bytes: 100000000000000000000\n",
            "2: retries.store_bytes: must be an integer >= 1 and <= 9007199254740991, got "
            "100000000000000000000",
        ),
        (
            "organization:\n  budgets:\n    - {period: day, limit_usd: 10000000000}\n",
            "3: organization.budgets[0].limit_usd: must be a number > 0 and <= 1000000000, got "
            "10000000000",
        ),
    ],
)
def test_a_setting_past_what_tollgate_can_hold_is_refused_at_its_line(
    policies: Path, settings: str, expected: str
) -> None:
    write(policies / "tollgate.yaml", settings)
    assert problems_of(policies) == [f"policies/tollgate.yaml:{expected}"]


def test_a_responses_cap_past_what_a_request_may_ask_is_refused(policies: Path) -> None:
    """Written into every Responses request that set none, it was bounded at more
    nano-dollars than a ledger row holds: each such request of the team was a 500."""
    write(
        policies / "teams" / "t.yaml",
        team_yaml(extra="responses:\n  max_output_tokens: 2147483648\n"),
    )
    assert problems_of(policies) == [
        "policies/teams/t.yaml:5: responses.max_output_tokens: must be an integer >= 16 and "
        "<= 2147483647, got 2147483648"
    ]


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        (
            "limit_usd: 0100",
            "limit_usd: 0100 is the octal number 64 in YAML 1.1, the decimal 100 in YAML 1.2: "
            "write it without the leading zero, or quote it if it is text",
        ),
        (
            "image_output_tokens: 2:30",
            "image_output_tokens: 2:30 is a base-60 number (150) in YAML 1.1: write the number "
            "it stands for, or quote it if it is text",
        ),
        (
            "limit_usd: 1:30.5",
            "limit_usd: 1:30.5 is a base-60 number in YAML 1.1: write the number it stands "
            "for, or quote it if it is text",
        ),
    ],
)
def test_a_number_yaml_1_2_reads_otherwise_is_refused(
    policies: Path, written: str, expected: str
) -> None:
    """`limit_usd: 0100` was a budget of $64: YAML 1.1 reads a leading zero as octal, where
    YAML 1.2 (an editor checking the file against `tollgate schema`) and people read 100."""
    write(
        policies / "teams" / "t.yaml",
        team_yaml(extra=f"budgets:\n  - {{period: day, {written}}}\n"),
    )
    assert problems_of(policies) == [f"policies/teams/t.yaml:5: budgets[0].{expected}"]


def test_numbers_written_alike_in_both_yaml_versions_are_read(policies: Path) -> None:
    write(
        policies / "teams" / "t.yaml",
        team_yaml(
            extra="budgets:\n  - {period: day, limit_usd: 07}\n"
            "  - {period: day, image_output_tokens: 1_000_000}\n"
            "  - {period: day, limit_usd: 010.5}\n"
        ),
    )
    assert [b.limit for b in load(policies).team_named("t").budgets] == [  # type: ignore[union-attr]
        7 * 10**9,
        1_000_000,
        10_500_000_000,
    ]


@pytest.mark.parametrize(
    "settings",
    [
        "admin_token: ${TOLLGATE_ADMIN_TOKEN:-s3cret}\n",
        "upstream:\n  api_key: sk-${KEY:-s3cret}\n",
        "upstream:\n  base_url: ${BASE_URL:-https://s3cret.example/v1}\n",
        "ledger: ${LEDGER-sqlite:///s3cret.db}\n",
        "admin_token: ab${CD\n",
    ],
)
def test_a_dollar_brace_that_begins_no_variable_is_refused_without_showing_it(
    policies: Path, settings: str
) -> None:
    """Kept as written, `${TOKEN:-s3cret}` was the admin token itself, and a URL or key with
    a shell default went out as is, every request failing."""
    write(policies / "tollgate.yaml", settings)
    problems = problems_of(policies, KEY="k", BASE_URL="http://x", LEDGER="sqlite:///x.db")
    problem = problems[0]  # a URL kept as written also names no host
    where = settings.partition(":")[0] if settings.count("\n") == 1 else None
    assert problem.startswith(
        f"policies/tollgate.yaml:{1 if where else 2}: "
        f"{where or 'upstream.' + settings.split()[1].rstrip(':')}: holds a `${{` that begins no "
        "variable reference: write ${NAME}"
    ), problem
    assert not any("s3cret" in p for p in problems)


def test_variables_next_to_dollars_are_still_expanded(policies: Path) -> None:
    write(policies / "tollgate.yaml", "admin_token: a$$${TOKEN}$\n")
    assert load(policies, TOKEN="x" * 16).admin_token == "a$$" + "x" * 16 + "$"


@pytest.mark.parametrize(
    ("team", "where"),
    [
        ('name: "t\\n"\nkeys:\n  - {id: k, sha256: %s}\n', "1: name: must be a name of"),
        (
            'name: t\nopenai_project: "proj_abc\\n"\nkeys:\n  - {id: k, sha256: %s}\n',
            "2: openai_project: must be an OpenAI project id",
        ),
        (
            "name: t\nkeys:\n  - id: k\n    sha256: |\n      %s\n",
            "4: keys[0].sha256: must be the key's SHA-256",
        ),
    ],
)
def test_a_value_ending_in_a_line_feed_is_refused(policies: Path, team: str, where: str) -> None:
    """A pattern's `$` let a final line feed through (Python's `re`, not JSON Schema's): a
    team name ending in one broke every answer's headers after its request was sent
    upstream, a project every upstream request, and a key hash never matched its key."""
    write(policies / "teams" / "t.yaml", team % KEY_A)
    [problem] = problems_of(policies)
    assert problem.startswith(f"policies/teams/t.yaml:{where}"), problem


@pytest.mark.parametrize("nested", ["[" * 1000 + "]" * 1000, "{a: " * 1000 + "1" + "}" * 1000])
def test_a_file_nested_past_the_stack_is_a_problem_not_a_crash(policies: Path, nested: str) -> None:
    """PyYAML composes nested collections by recursion: a thousand `[` ended `check`, and a
    reload, in a RecursionError."""
    write(policies / "teams" / "t.yaml", team_yaml(extra=f"allow: {nested}\n"))
    assert problems_of(policies) == [
        "policies/teams/t.yaml:1: YAML error: nesting too deep (more than 100 levels)"
    ]


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            "upstream:\n  base_url: https://${OPENAI_HOST}/v1\n",
            "2: upstream.base_url: names no host (is a variable it holds unset?)",
        ),
        (
            "upstream:\n  base_url: https://[api.openai.com/v1\n",
            "2: upstream.base_url: is not a URL (Invalid IPv6 URL)",
        ),
        (
            "upstream:\n  base_url: https://api.openai.com:4430000/v1\n",
            "2: upstream.base_url: is not a URL (Port out of range 0-65535)",
        ),
        (
            "alerts:\n  webhooks: ['https://${HOOKS_HOST}/services/s3cret']\n",
            "2: alerts.webhooks[0]: names no host (is a variable it holds unset?)",
        ),
    ],
)
def test_a_url_no_request_could_be_sent_to_is_refused_without_showing_it(
    policies: Path, settings: str, expected: str
) -> None:
    """An unset variable for the host left `https:///v1`, which `check` accepted and every
    request then failed on; a bracket without its end made `check` end in a traceback."""
    write(policies / "tollgate.yaml", settings)
    assert problems_of(policies) == [f"policies/tollgate.yaml:{expected}"]


# -- which files are read, and from which snapshot -------------------------------------


def kubernetes_volume(root: Path, stamp: str, teams: dict[str, str], timezone: str) -> None:
    """A snapshot of a ConfigMap volume as the kubelet writes it: a timestamped directory
    (`..2026_…`), `..data` a symlink to it, each entry a symlink through `..data`."""
    snapshot = root / f"..2026_05_28_{stamp}"
    write(snapshot / "tollgate.yaml", f"timezone: {timezone}\n")
    for name, text in teams.items():
        write(snapshot / "teams" / name, text)
    swapped = root / "..data_tmp"
    swapped.symlink_to(snapshot.name)
    swapped.replace(root / "..data")  # the kubelet's atomic swap
    for entry in ("tollgate.yaml", "teams"):
        if not (root / entry).is_symlink():
            (root / entry).symlink_to(f"..data/{entry}")


def test_a_kubernetes_configmap_swapped_during_a_load_is_read_from_one_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ConfigMap updated while a load reads it: every file comes from the snapshot the
    load began with, never some from the old and some from the new."""
    root = tmp_path / "policies"
    root.mkdir()
    old = {"a.yaml": team_yaml("alpha", KEY_A), "b.yaml": team_yaml("beta", KEY_B)}
    kubernetes_volume(root, "10_00", old, "UTC")
    new = {"a.yaml": team_yaml("gamma", KEY_A), "b.yaml": team_yaml("delta", KEY_B)}
    real_read = loader.read_document
    swapped: list[str] = []

    def read_then_swap(path: Path, file: str, env: Any) -> Any:
        found = real_read(path, file, env)
        if not swapped:  # the kubelet swaps the volume right after the first file
            swapped.append(file)
            kubernetes_volume(root, "11_00", new, "Europe/Paris")
        return found

    monkeypatch.setattr(loader, "read_document", read_then_swap)
    config = load(root)
    assert swapped
    assert (config.timezone, [t.name for t in config.teams]) == ("UTC", ["alpha", "beta"])
    # The next load reads the new snapshot whole; messages name the paths as given.
    config = load(root)
    assert (config.timezone, [t.name for t in config.teams]) == ("Europe/Paris", ["gamma", "delta"])
    write(root / "..2026_05_28_11_00" / "teams" / "c.yaml", "name: [\n")
    assert all(p.startswith(f"{root}/teams/c.yaml:") for p in problems_of(root))


def test_a_teams_directory_that_is_a_configmap_of_its_own_is_read_from_one_snapshot(
    policies: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teams = policies / "teams"
    teams.mkdir()
    snapshot = teams / "..2026_05_28_10_00"
    write(snapshot / "a.yaml", team_yaml("alpha", KEY_A))
    write(snapshot / "b.yaml", team_yaml("beta", KEY_B))
    (teams / "..data").symlink_to(snapshot.name)
    for name in ("a.yaml", "b.yaml"):
        (teams / name).symlink_to(f"..data/{name}")
    real_read = loader.read_document

    def read_then_swap(path: Path, file: str, env: Any) -> Any:
        found = real_read(path, file, env)
        if file.endswith("a.yaml"):
            fresh = teams / "..2026_05_28_11_00"
            write(fresh / "a.yaml", team_yaml("gamma", KEY_A))
            write(fresh / "b.yaml", team_yaml("delta", KEY_B))
            (teams / "..data_tmp").symlink_to(fresh.name)
            (teams / "..data_tmp").replace(teams / "..data")
        return found

    monkeypatch.setattr(loader, "read_document", read_then_swap)
    assert [t.name for t in load(policies).teams] == ["alpha", "beta"]


def test_team_files_with_a_yaml_suffix_in_any_case_are_read(policies: Path) -> None:
    write(policies / "teams" / "a.YAML", team_yaml("alpha", KEY_A))
    write(policies / "teams" / "b.Yml", team_yaml("beta", KEY_B))
    write(policies / "teams" / "README.md", "not a team\n")
    (policies / "teams" / "archive").mkdir()
    write(policies / "teams" / "archive" / "old.yaml", team_yaml("old", KEY_A))
    assert [t.name for t in load(policies).teams] == ["alpha", "beta"]


def test_a_team_file_that_cannot_be_read_is_a_problem_not_skipped(policies: Path) -> None:
    """A dangling symlink or a directory named as a team file: its team is not there (its
    key would get 401), so it is said, at `file:1`, rather than passed over."""
    write(policies / "teams" / "a.yaml", team_yaml("alpha", KEY_A))
    (policies / "teams" / "gone.yaml").symlink_to("/nonexistent/gone.yaml")
    (policies / "teams" / "folder.yml").mkdir()
    (policies / "teams" / ".#a.yaml").symlink_to("user@host.1234")  # an editor's lock
    assert problems_of(policies) == [
        "policies/teams/folder.yml:1: not read as a team file: not a regular file",
        "policies/teams/gone.yaml:1: not read as a team file: a symlink to nothing",
    ]
