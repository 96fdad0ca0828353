"""A provider's keys: config, selection, rotation on 429, retirement on 401/403, reload."""

from __future__ import annotations

import logging

import pytest

from gateway.config import ConfigError, parse
from gateway.providers import build_adapter
from gateway.providers.anthropic import AnthropicConfig
from gateway.providers.azure import AzureOpenAIConfig
from gateway.providers.cohere import CohereConfig
from gateway.providers.keys import KeyRing
from gateway.providers.openai import OpenAICompatibleConfig, OpenAIConfig

KEYS = ["sk-first-key-0001", "sk-second-key-0002", "sk-third-key-0003"]


def ring(keys: list[str] = KEYS) -> KeyRing:
    return build_adapter("oai", OpenAIConfig(api_keys=keys), "/v1").keys


def provider(body: str, env: dict[str, str] | None = None) -> OpenAIConfig:
    config = parse(f"providers:\n  oai: {{type: openai, {body}}}\n", env or {})
    return config.providers["oai"]  # type: ignore[return-value]


# -- config ---------------------------------------------------------------------------------------


def test_api_keys_take_env_references_and_leave_empty_ones_out() -> None:
    config = provider("api_keys: ['${A}', '${B:-}', '${C}']", {"A": KEYS[0], "C": KEYS[2]})
    assert config.credentials == [(KEYS[0], "api_keys[0]"), (KEYS[2], "api_keys[2]")]
    assert config.enabled


@pytest.mark.parametrize("body", ["api_keys: []", "api_keys: ['${A:-}', '']", "api_key: ''"])
def test_no_key_disables_the_provider(body: str) -> None:
    assert not provider(body).enabled


def test_a_single_api_key_still_works() -> None:
    config = provider(f"api_key: {KEYS[0]}")
    assert config.credentials == [(KEYS[0], "api_key")]
    assert not build_adapter("oai", config, "/v1").keys.several


def test_api_key_and_api_keys_together_is_an_error_naming_the_path() -> None:
    with pytest.raises(ConfigError) as err:
        provider(f"api_key: {KEYS[0]}, api_keys: [{KEYS[1]}]")
    assert err.value.problems == ["providers.oai.api_keys: set beside api_key; give the keys in one of them"]


def test_a_duplicate_or_malformed_key_is_an_error_without_the_secret() -> None:
    with pytest.raises(ConfigError) as err:
        provider("api_keys: ['${A}', '${A}', '${B}']", {"A": KEYS[0], "B": "sk-x\r\nHost: evil"})
    assert err.value.problems == [
        "providers.oai.api_keys[1]: same key as api_keys[0]",
        "providers.oai.api_keys[2]: spaces or line breaks around or in the key",
    ]
    assert KEYS[0] not in str(err.value)


def test_every_key_is_a_secret_to_mask() -> None:
    config = parse(f"providers:\n  oai: {{type: openai, api_keys: [{KEYS[0]}, {KEYS[1]}]}}\n", {})
    assert {KEYS[0], KEYS[1]} <= set(config.secrets())


# -- each adapter's header, one pre-encoded head per key ------------------------------------------


@pytest.mark.parametrize(
    ("config", "header", "prefix"),
    [
        (OpenAIConfig(api_keys=KEYS[:2]), b"authorization", b"Bearer "),
        (OpenAICompatibleConfig(base_url="http://x/v1", api_keys=KEYS[:2]), b"authorization", b"Bearer "),
        (AnthropicConfig(api_keys=KEYS[:2]), b"x-api-key", b""),
        (CohereConfig(api_keys=KEYS[:2]), b"authorization", b"Bearer "),
        (AzureOpenAIConfig(base_url="https://r.openai.azure.com", api_keys=KEYS[:2]), b"api-key", b""),
    ],
)
def test_each_key_has_its_own_head_in_the_providers_header(config: object, header: bytes, prefix: bytes) -> None:
    adapter = build_adapter("p", config, "")  # type: ignore[arg-type]
    heads = [dict(key.headers) for key in adapter.keys.keys]
    assert [h[header] for h in heads] == [prefix + KEYS[0].encode(), prefix + KEYS[1].encode()]
    assert all(h[b"content-type"] == b"application/json" for h in heads)
    assert adapter.keys.current is adapter.keys.keys[0]


def test_a_provider_without_a_key_sends_no_credential() -> None:
    keys = build_adapter("local", OpenAICompatibleConfig(base_url="http://x/v1"), "/v1").keys
    assert keys.current is not None and keys.current.headers == [(b"content-type", b"application/json")]
    assert not keys.several and not keys.retire(keys.current) and keys.current is keys.keys[0]


# -- rotation and retirement ----------------------------------------------------------------------


def test_the_current_key_stays_until_a_429_moves_it_on_round_robin() -> None:
    keys = ring()
    first, second, third = keys.keys
    assert keys.current is first
    keys.rotate(first)
    assert keys.current is second
    keys.rotate(second)
    keys.rotate(third)
    assert keys.current is first


def test_429s_of_requests_in_flight_together_move_the_ring_once() -> None:
    keys = ring()
    first, second, _ = keys.keys
    keys.rotate(first)
    keys.rotate(first)  # a second request that went out on `first` before the move
    assert keys.current is second


def test_a_retired_key_is_never_current_again(caplog: pytest.LogCaptureFixture) -> None:
    keys = ring()
    first, second, third = keys.keys
    with caplog.at_level(logging.ERROR, "gateway.providers"):
        assert keys.retire(second)
        assert not keys.retire(second)  # a second request refused on it: logged once
    assert keys.current is first and keys.usable == [first, third]
    keys.rotate(first)
    assert keys.current is third
    keys.rotate(third)
    assert keys.current is first
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (
        "provider oai refused API key providers.oai.api_keys[1] (…0002): retired until the config is "
        "reloaded; 2 of 3 keys left"
    )
    assert KEYS[1] not in record.getMessage()


def test_retiring_the_current_key_moves_to_the_next() -> None:
    keys = ring()
    first, second, third = keys.keys
    keys.rotate(first)
    keys.rotate(second)
    keys.retire(third)
    assert keys.current is first


def test_every_key_retired_leaves_no_current(caplog: pytest.LogCaptureFixture) -> None:
    keys = ring(KEYS[:2])
    with caplog.at_level(logging.ERROR, "gateway.providers"):
        for key in keys.keys:
            keys.retire(key)
    assert keys.current is None and keys.usable == []
    assert caplog.records[-1].getMessage().endswith("NO KEY LEFT: its deployments are skipped")


def test_a_single_key_is_neither_moved_nor_retired() -> None:
    keys = ring(KEYS[:1])
    (only,) = keys.keys
    keys.rotate(only)
    assert not keys.retire(only) and keys.current is only


def test_a_short_key_shows_no_characters_in_its_hint() -> None:
    keys = ring(["short-1", "short-2"])
    assert [k.hint for k in keys.keys] == ["providers.oai.api_keys[0]", "providers.oai.api_keys[1]"]


def test_masking_hides_every_key_of_the_provider() -> None:
    keys = ring()
    body = f"bad key {KEYS[2]}; also {KEYS[0]}".encode()
    assert keys.mask(body) == b"bad key ***; also ***"


def test_a_new_adapter_has_every_key_back() -> None:
    config = OpenAIConfig(api_keys=KEYS)
    old = build_adapter("oai", config, "/v1")
    for key in old.keys.keys:
        old.keys.retire(key)
    new = build_adapter("oai", config, "/v1")  # what a reload builds
    assert new.keys.current is new.keys.keys[0] and len(new.keys.usable) == 3
