"""The OpenAI-compatible family: one adapter, six kinds that differ in host, capabilities and key.

For each kind: its default base URL, what it can do, the credential header, the
request-target, configured extra headers (OpenRouter's attribution headers reach
the upstream), and the provider key appearing nowhere but in `authorization`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest

from gateway import build_app, parse
from gateway.providers import KINDS, Capability, Operation, ProviderConfig, Target, build_adapter
from gateway.providers.openai import (
    BlackboxConfig,
    GrokConfig,
    OpenAIAdapter,
    OpenAICompatibleConfig,
    OpenAIConfig,
    OpenRouterConfig,
    PerplexityConfig,
)
from gateway.upstream import UpstreamPool
from tests.mock_openai import MockOpenAI

C = Capability
ALL = frozenset(Capability)
KEY = "sk-provider-key-4c1d9e2f7a"
CLIENT_KEY = "sk-family-client-key-0123456789"

FAMILY: dict[str, tuple[type[ProviderConfig], str, frozenset[Capability]]] = {
    "openai": (OpenAIConfig, "https://api.openai.com/v1", ALL),
    "perplexity": (PerplexityConfig, "https://api.perplexity.ai", frozenset({C.chat, C.streaming})),
    "grok": (GrokConfig, "https://api.x.ai/v1", ALL),
    "blackbox": (BlackboxConfig, "https://api.blackbox.ai", frozenset({C.chat, C.streaming})),
    "openrouter": (
        OpenRouterConfig,
        "https://openrouter.ai/api/v1",
        frozenset({C.chat, C.completions, C.streaming, C.tools}),
    ),
    "openai_compatible": (
        OpenAICompatibleConfig,
        "",
        frozenset({C.chat, C.completions, C.embeddings, C.streaming, C.tools}),
    ),
}
OPENROUTER_HEADERS = {"HTTP-Referer": "https://app.example.com", "X-Title": "Example App"}


def provider(kind: str, **fields: str) -> ProviderConfig:
    lines = "".join(f"    {k}: '{v}'\n" for k, v in fields.items())
    return parse(f"providers:\n  p:\n    type: {kind}\n{lines}", {}).providers["p"]


# -- each kind --------------------------------------------------------------------------------


def test_the_family_is_every_kind_above() -> None:
    assert set(FAMILY) <= set(KINDS)


@pytest.mark.parametrize("kind", FAMILY)
def test_default_base_url_and_capabilities(kind: str) -> None:
    cls, default_url, capabilities = FAMILY[kind]
    config = provider(kind, api_key=KEY)

    assert type(config) is cls
    assert config.url == default_url
    assert {c for c in Capability if config.supports(c)} == capabilities
    assert isinstance(build_adapter("p", config, "/v1"), OpenAIAdapter)


@pytest.mark.parametrize("kind", FAMILY)
def test_key_is_a_bearer_authorization_header(kind: str) -> None:
    config = provider(kind, base_url="https://llm.example.com/v1", api_key=KEY)

    adapter = build_adapter("p", config, "/v1")

    assert adapter.keys.keys[0].headers == [
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {KEY}".encode()),
    ]


@pytest.mark.parametrize("kind", [k for k in FAMILY if k != "openai_compatible"])
def test_hosted_kinds_need_a_key(kind: str) -> None:
    assert not provider(kind).enabled
    assert provider(kind, api_key=KEY).enabled


def test_self_hosted_needs_a_url_and_no_key() -> None:
    assert not provider("openai_compatible").enabled
    config = provider("openai_compatible", base_url="http://127.0.0.1:11434/v1")

    assert config.enabled
    assert build_adapter("local", config, "/v1").keys.keys[0].headers == [(b"content-type", b"application/json")]


@pytest.mark.parametrize(
    ("kind", "base_url", "base_path"),
    [
        ("openai", "", "/v1"),
        ("perplexity", "", ""),
        ("grok", "", "/v1"),
        ("blackbox", "", ""),
        ("openrouter", "", "/api/v1"),
        ("openai_compatible", "http://127.0.0.1:11434/v1/", "/v1"),
    ],
)
def test_target_is_the_base_urls_path_plus_openais_path(kind: str, base_url: str, base_path: str) -> None:
    config = provider(kind, base_url=base_url, api_key=KEY)
    path = UpstreamPool(config.url).base_path  # as the app hands it to the adapter

    adapter = build_adapter("p", config, path)

    assert path == base_path
    for op in Operation:
        assert adapter.target(op, Target("m")) == f"{base_path}/{op.value}".encode()


def test_configured_headers_follow_the_credential() -> None:
    config = OpenRouterConfig(api_key=KEY, headers=OPENROUTER_HEADERS)

    headers = build_adapter("openrouter", config, "/api/v1").keys.keys[0].headers

    assert headers == [
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {KEY}".encode()),
        (b"http-referer", b"https://app.example.com"),
        (b"x-title", b"Example App"),
    ]


@pytest.mark.parametrize("kind", FAMILY)
def test_key_appears_only_in_the_authorization_header(kind: str) -> None:
    config = FAMILY[kind][0](base_url="https://h.example/v1", api_key=KEY, headers={"X-Team": "search"})
    adapter = build_adapter("p", config, "/v1")
    body = {"model": "alias", "messages": [{"role": "user", "content": "hi"}]}

    sent = [adapter.target(op, Target(f"model-{op.name}")) for op in Operation]
    sent += [adapter.encode_body(op, dict(body), Target("m")) for op in Operation]
    sent += [name for name, _ in adapter.keys.keys[0].headers]
    sent += [value for name, value in adapter.keys.keys[0].headers if name != b"authorization"]

    assert all(KEY.encode() not in part for part in sent)
    assert dict(adapter.keys.keys[0].headers)[b"authorization"] == f"Bearer {KEY}".encode()
    assert orjson.loads(adapter.encode_body(Operation.chat, dict(body), Target("m"))) == {
        **body,
        "model": "m",
    }


# -- through the app, to a real upstream ---------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockOpenAI]:
    with MockOpenAI(api_key=KEY) as mock:
        yield mock


@pytest.fixture
async def client(upstream: MockOpenAI) -> AsyncIterator[httpx.AsyncClient]:
    upstream.reset()
    headers = "".join(f"      {k}: '{v}'\n" for k, v in OPENROUTER_HEADERS.items())
    config = parse(
        f"""
auth:
  keys: [{{name: team, key: {CLIENT_KEY}}}]
providers:
  openrouter:
    type: openrouter
    base_url: '{upstream.base_url}'
    api_key: {KEY}
    headers:
{headers}
models:
  - {{name: router-mini, deployments: [{{provider: openrouter, model: openai/gpt-4o-mini}}]}}
""",
        {},
    )
    app = build_app(config)
    async with app.lifespan(None):  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=app)
        auth = {"authorization": f"Bearer {CLIENT_KEY}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://gw", headers=auth) as c:
            yield c
    upstream.reset()


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "router-mini", "messages": [{"role": "user", "content": "hello router"}], **extra}


@pytest.mark.anyio
async def test_openrouter_headers_and_key_reach_the_upstream(
    client: httpx.AsyncClient, upstream: MockOpenAI
) -> None:
    response = await client.post("/v1/chat/completions", json=chat())

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: hello router"
    (seen,) = upstream.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.header_values("http-referer") == ["https://app.example.com"]
    assert seen.header_values("x-title") == ["Example App"]
    assert seen.header_values("authorization") == [f"Bearer {KEY}"]
    assert seen.json()["model"] == "openai/gpt-4o-mini"
    assert KEY not in seen.target and KEY.encode() not in seen.body
    assert [name for name, value in seen.headers if KEY in value] == ["authorization"]
    assert all(CLIENT_KEY not in value for _, value in seen.headers)
    assert KEY not in response.text and KEY not in str(response.headers)


@pytest.mark.anyio
async def test_streams_carry_the_headers_and_an_echoed_key_is_masked(
    client: httpx.AsyncClient, upstream: MockOpenAI
) -> None:
    streamed = await client.post("/v1/chat/completions", json=chat(stream=True))
    # A 400 (a 401 would retire the key: tests/integration/test_provider_keys.py).
    upstream.behave(model="openai/gpt-4o-mini", status=400, error={"message": f"Bad key {KEY} for this org."})
    refused = await client.post("/v1/chat/completions", json=chat())

    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert upstream.requests[0].header("x-title") == "Example App"
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "Bad key *** for this org."
    assert KEY not in refused.text
