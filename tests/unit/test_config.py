from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path

import pytest

from gateway.config import Config, ConfigError, load, parse
from gateway.providers.openai import OpenAICompatibleConfig, OpenAIConfig

BASE = textwrap.dedent(
    """
    server: {host: 127.0.0.1, port: 8080, max_body_bytes: 1048576}
    store: {url: "memory://"}
    auth:
      admin_key: ${ADMIN:-adm-0123456789abcdef}
      keys:
        - {name: team-a, key: "${TEAM_A_KEY}", models: [gpt-mini], limits: {rpm: 60, tpm: 100000}}
    providers:
      oai: {type: openai, base_url: https://api.openai.com/v1, api_key: "${OPENAI_API_KEY:-}"}
    models:
      - name: gpt-mini
        deployments:
          - {provider: oai, model: gpt-4o-mini, limits: {rpm: 500, tpm: 200000}}
    cache: {enabled: true, ttl_s: 300}
    breaker: {failures: 5, window_s: 30, cooldown_s: 10}
    router: {retries: 2, timeouts: {connect_s: 5, first_byte_s: 60, total_s: 600}}
    """
)
ENV = {"TEAM_A_KEY": "sk-team-a-0123456789", "OPENAI_API_KEY": "sk-openai-secret-value"}


def problems(text: str, env: dict[str, str] = ENV) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    return info.value.problems


def test_issue_shape_parses_with_substitution() -> None:
    config = parse(BASE, ENV)
    assert config.auth.keys[0].key == "sk-team-a-0123456789"
    assert config.auth.admin_key == "adm-0123456789abcdef"
    provider = config.providers["oai"]
    assert isinstance(provider, OpenAIConfig)
    assert provider.enabled and provider.url == "https://api.openai.com/v1"
    assert config.models[0].deployments[0].limits.rpm == 500
    assert config.router.timeouts.first_byte_s == 60
    assert set(config.secrets()) == {"adm-0123456789abcdef", "sk-team-a-0123456789", "sk-openai-secret-value"}


def test_defaults_when_sections_absent() -> None:
    config = parse("{}", {})
    assert config == Config()
    assert config.server.port == 8080 and config.store.url == "memory://"
    assert (config.router.retries, config.router.failover, config.router.heartbeat_s) == (1, True, 5.0)
    assert config.store.outage.budgets == "closed"  # unchecked spend is money: 503 unless chosen


def test_retries_and_failover_per_model_override_the_router() -> None:
    text = BASE.replace("  - name: gpt-mini\n", "  - name: gpt-mini\n    retries: 0\n    failover: false\n")
    model = parse(text, ENV).models[0]
    assert (model.retries, model.failover) == (0, False)
    assert (parse(BASE, ENV).models[0].retries, parse(BASE, ENV).models[0].failover) == (None, None)


def test_missing_variable_names_path_and_variable() -> None:
    assert problems(BASE, {}) == ["auth.keys[0].key: environment variable TEAM_A_KEY is not set"]


def test_unknown_provider_reference_names_path() -> None:
    text = BASE.replace("{provider: oai,", "{provider: oai2,")
    assert problems(text) == ["models[0].deployments[0].provider: unknown provider 'oai2'"]


def test_unknown_provider_type_lists_kinds() -> None:
    (problem,) = problems(BASE.replace("type: openai", "type: openai2"))
    assert problem.startswith("providers.oai.type: unknown provider type 'openai2'")
    assert "perplexity" in problem


def test_unknown_field_names_path() -> None:
    assert problems(BASE.replace("ttl_s: 300", "ttl_s: 300, bogus: 1")) == [
        "cache: Object contains unknown field `bogus`"
    ]


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ("rpm: 500", "rpm: many", "models[0].deployments[0].limits.rpm"),
        ("rpm: 500", "rpm: 0", "models[0].deployments[0].limits.rpm"),
        ("port: 8080", "port: 70000", "server.port"),
        ("first_byte_s: 60", "first_byte_s: -1", "router.timeouts.first_byte_s"),
        ("retries: 2", "retries: -1", "router.retries"),
        ("retries: 2", "retries: 2, failover: maybe", "router.failover"),
        ("retries: 2", "retries: 2, heartbeat_s: -1", "router.heartbeat_s"),
        ("  - name: gpt-mini\n", "  - name: gpt-mini\n    retries: -1\n", "models[0].retries"),
        ("  - name: gpt-mini\n", "  - name: gpt-mini\n    failover: maybe\n", "models[0].failover"),
        ('url: "memory://"}', 'url: "memory://", outage: {budgets: maybe}}', "store.outage.budgets"),
    ],
)
def test_bad_values_name_the_path(old: str, new: str, path: str) -> None:
    (problem,) = problems(BASE.replace(old, new))
    assert problem.startswith(path + ": ")


def test_admin_writes_wait_for_every_connected_replica_by_default() -> None:
    writes = parse("{}", {}).store.admin_writes
    assert (writes.replicas, writes.aof, writes.timeout_ms) == ("all", False, 1000)
    text = BASE.replace('url: "memory://"}', 'url: "memory://", admin_writes: {replicas: "${N}", aof: true}}')
    writes = parse(text, {**ENV, "N": "2"}).store.admin_writes
    assert (writes.replicas, writes.aof) == (2, True)
    assert parse(text, {**ENV, "N": "0"}).store.admin_writes.replicas == 0  # no wait


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("replicas: some", "replicas"),
        ("replicas: -1", "replicas"),
        ("timeout_ms: 0", "timeout_ms"),
        ("aof: 2", "aof"),
    ],
)
def test_bad_admin_writes_name_the_path(setting: str, field: str) -> None:
    text = BASE.replace('url: "memory://"}', f'url: "memory://", admin_writes: {{{setting}}}}}')
    (problem,) = problems(text)
    assert problem.startswith(f"store.admin_writes.{field}: ")


def test_env_values_are_converted_to_field_types() -> None:
    config = parse(BASE.replace("port: 8080", "port: '${PORT}'"), {**ENV, "PORT": "9001"})
    assert config.server.port == 9001


def test_cross_checks_are_all_reported() -> None:
    text = BASE.replace(
        "models:\n",
        "models:\n  - name: gpt-mini\n    deployments: [{provider: nope, model: m}]\n",
    ).replace('key: "${TEAM_A_KEY}"', "key: short")
    found = problems(text)
    assert "models[1].name: duplicate model 'gpt-mini'" in found
    assert "models[0].deployments[0].provider: unknown provider 'nope'" in found
    assert "auth.keys[0].key: shorter than 16 characters" in found


def test_duplicate_keys_and_names() -> None:
    text = BASE.replace(
        "  keys:\n",
        '  keys:\n    - {name: team-a, key: "${TEAM_A_KEY}"}\n',
    )
    found = problems(text)
    assert "auth.keys[1].name: duplicate key name 'team-a'" in found
    assert "auth.keys[1].key: same key as another entry" in found


def test_no_secret_value_in_any_problem() -> None:
    text = BASE.replace("rpm: 60", "rpm: sk-team-a-0123456789x").replace("admin_key: ${ADMIN:-", "admin_key: ${ADMIN:-x")
    for problem in problems(text):
        assert "sk-team-a-0123456789" not in problem
        assert "sk-openai-secret-value" not in problem


def test_invalid_yaml_and_top_level() -> None:
    (problem,) = problems("server: {host: [")
    assert problem.startswith("line ") and "not valid YAML" in problem
    assert problems("- a\n- b\n") == ["(top level): expected a mapping of sections"]


def test_empty_key_disables_provider_and_compatible_needs_only_url() -> None:
    config = parse(BASE, {"TEAM_A_KEY": "sk-team-a-0123456789"})
    assert not config.providers["oai"].enabled
    assert config.enabled_providers() == {}
    text = BASE.replace(
        "providers:\n", "providers:\n  local: {type: openai_compatible, base_url: 'http://127.0.0.1:1/v1'}\n"
    )
    local = parse(text, ENV).providers["local"]
    assert isinstance(local, OpenAICompatibleConfig) and local.enabled


def test_bad_base_url_scheme() -> None:
    assert problems(BASE.replace("https://api.openai.com/v1", "ftp://x")) == [
        "providers.oai.base_url: must start with http:// or https://"
    ]


def warns_readable(tmp_path, caplog, text: str, mode: int = 0o644) -> bool:  # type: ignore[no-untyped-def]
    """Whether loading `text` from a file of `mode` draws the readable-secrets warning."""
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    os.chmod(path, mode)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "gateway.config"):
        load_with_env(path)
    return "readable by group or others" in caplog.text


def test_load_warns_on_readable_file_with_literal_secret(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    literal = BASE.replace('"${TEAM_A_KEY}"', "sk-literal-0123456789")
    assert warns_readable(tmp_path, caplog, literal)
    assert not warns_readable(tmp_path, caplog, literal, 0o600)


def test_load_does_not_warn_for_secrets_only_in_var_defaults(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    # config.example.yaml's shape: secrets come from the environment, with placeholder defaults.
    text = BASE.replace('"${TEAM_A_KEY}"', '"${TEAM_A_KEY:-sk-gw-local-dev-change-me}"')
    assert not warns_readable(tmp_path, caplog, text)
    # As `make run` reads the example from a fresh clone: mode 644.
    example = (Path(__file__).resolve().parents[2] / "config.example.yaml").read_text()
    assert not warns_readable(tmp_path, caplog, example)


def load_with_env(path) -> Config:  # type: ignore[no-untyped-def]
    old = dict(os.environ)
    os.environ.update(OPENAI_API_KEY="sk-openai-secret-value")
    try:
        return load(path)
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_load_unreadable_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "missing.yaml")
    assert "cannot read" in info.value.problems[0]


def test_non_string_keys_are_named() -> None:
    (problem,) = problems(BASE.replace("  oai: {type", "  off: {type: openai}\n  oai: {type"))
    assert problem.startswith("providers: key False is not a string")


def test_cors_wildcard_with_credentials_refused() -> None:
    text = BASE + "cors: {allow_origins: ['*'], allow_credentials: true}\n"
    assert problems(text) == ["cors.allow_origins: '*' cannot be used with allow_credentials; list the origins"]


def test_shared_store_with_admin_api_needs_hash_secret() -> None:
    text = BASE.replace('url: "memory://"', 'url: "redis://127.0.0.1:6379/0"')
    assert problems(text) == [
        "auth.hash_secret: required with a shared store and the admin API "
        "(every replica must derive the same key digests)"
    ]
    text = text.replace("auth:\n", "auth:\n  hash_secret: short\n")
    assert problems(text) == ["auth.hash_secret: shorter than 32 characters"]
    config = parse(text.replace("hash_secret: short", "hash_secret: " + "h" * 32), ENV)
    assert "h" * 32 in config.secrets()


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ("{Authorization: x}", "'Authorization' is not a header the config may set"),
        ("{'bad header': x}", "'bad header' is not a header the config may set"),
        ('{X-Title: "a\\r\\nHost: evil"}', "providers.oai.headers.X-Title: line breaks are not allowed"),
    ],
)
def test_provider_headers_are_checked(headers: str, fragment: str) -> None:
    text = BASE.replace("api_key: \"${OPENAI_API_KEY:-}\"}", "api_key: \"${OPENAI_API_KEY:-}\", headers: " + headers + "}")
    (problem,) = problems(text)
    assert fragment in problem


def test_openrouter_headers_accepted() -> None:
    text = BASE.replace("type: openai,", "type: openrouter, headers: {HTTP-Referer: 'https://app.example', X-Title: App},")
    assert parse(text, ENV).providers["oai"].headers == {"HTTP-Referer": "https://app.example", "X-Title": "App"}


def test_head_bounds_default_to_nginx_and_are_checked_together() -> None:
    server = parse(BASE, ENV).server
    assert (server.max_header_line_bytes, server.max_head_bytes) == (8192, 32768)
    text = BASE.replace("max_body_bytes: 1048576", "max_body_bytes: 1048576, max_header_line_bytes: 40000")
    assert problems(text) == [
        "server.max_header_line_bytes: larger than server.max_head_bytes, which bounds every line too"
    ]
    assert problems(BASE.replace("max_body_bytes: 1048576", "max_body_bytes: 1048576, max_head_bytes: 0")) == [
        "server.max_head_bytes: Expected `int` >= 1"
    ]


def test_metrics_settings_and_the_admin_guard_needs_an_admin_key() -> None:
    config = parse("telemetry: {metrics: {port: 9464, key_names: [ops], max_key_names: 5}}\n", {})
    assert config.telemetry.metrics.enabled and config.telemetry.metrics.port == 9464 and config.telemetry.metrics.key_names == ["ops"]
    with pytest.raises(ConfigError) as err:
        parse("telemetry: {metrics: {auth: admin}}\n", {})
    assert "telemetry.metrics.auth: 'admin' needs auth.admin_key" in err.value.problems
    with pytest.raises(ConfigError) as err:
        parse("telemetry: {metrics: {share_interval_s: 0, typo: 1}}\n", {})
    assert any(p.startswith("telemetry.metrics") for p in err.value.problems)
