from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from gateway.providers import Target, build_adapter
from gateway.providers.anthropic import AnthropicConfig
from gateway.providers.azure import AzureOpenAIConfig
from gateway.providers.cohere import CohereConfig
from gateway.providers.openai import OpenAIConfig
from gateway.routing.breaker import Breakers, BreakerSettings, Outcome
from gateway.routing.probes import Prober
from gateway.routing.router import Route
from gateway.store import MemoryStore
from gateway.upstream import UpstreamPool


@pytest.mark.parametrize(
    ("config", "url"),
    [
        (OpenAIConfig(api_key="k"), "https://api.openai.com/v1/models"),
        (AnthropicConfig(api_key="k"), "https://api.anthropic.com/v1/models"),
        (CohereConfig(api_key="k"), "https://api.cohere.com/v1/models"),
        (AzureOpenAIConfig(api_key="k", base_url="https://r.openai.azure.com"),
         "https://r.openai.azure.com/openai/models?api-version=2024-10-21"),
    ],
)
def test_probe_urls(config: object, url: str) -> None:
    assert build_adapter("p", config, "").probe_url() == url  # type: ignore[arg-type]


def test_probe_outcomes(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        breakers = Breakers(MemoryStore(), BreakerSettings(failures=1, cooldown_s=60, max_cooldown_s=60))
        routes = []
        for name in ("ok", "down", "error"):
            adapter = build_adapter(name, OpenAIConfig(api_key="sk-probe", base_url=f"http://{name}.test/v1"), "/v1")
            routes.append(Route(adapter, UpstreamPool("http://127.0.0.1:9/v1"), Target("m")))
        await breakers.start(r.id for r in routes)
        for route in routes:
            breakers.record(route.id, Outcome.FAILURE)
        await breakers.flush()
        seen = []

        def answer(request: httpx.Request) -> httpx.Response:
            seen.append(request.headers["authorization"])
            if request.url.host == "error.test":
                raise httpx.ConnectError("refused")
            return httpx.Response(200 if request.url.host == "ok.test" else 503)

        prober = Prober(routes, breakers, 60, 1)
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            await prober.probe_all(client)
        assert [breakers.state(r.id) for r in routes] == ["closed", "open", "open"]
        assert seen == ["Bearer sk-probe"] * 3
        prober.start()
        await prober.aclose()
        await breakers.aclose()

    with caplog.at_level(logging.INFO, "gateway.probes"):
        asyncio.run(main())
    assert "answered 503" in caplog.text and "ConnectError" in caplog.text


def test_probes_use_the_current_key_and_skip_a_provider_with_none() -> None:
    async def main() -> None:
        breakers = Breakers(MemoryStore(), BreakerSettings(failures=1, cooldown_s=60, max_cooldown_s=60))
        routes = []
        for name in ("moved", "keyless"):
            config = OpenAIConfig(api_keys=["sk-probe-one", "sk-probe-two"], base_url=f"http://{name}.test/v1")
            pool = UpstreamPool("http://127.0.0.1:9/v1")
            routes.append(Route(build_adapter(name, config, "/v1"), pool, Target("m")))
        moved, keyless = (route.adapter.keys for route in routes)
        moved.retire(moved.keys[0])
        for key in keyless.keys:
            keyless.retire(key)
        await breakers.start(r.id for r in routes)
        for route in routes:
            breakers.record(route.id, Outcome.FAILURE)
        await breakers.flush()
        seen = []

        def answer(request: httpx.Request) -> httpx.Response:
            seen.append((request.url.host, request.headers["authorization"]))
            return httpx.Response(200)

        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            await Prober(routes, breakers, 60, 1).probe_all(client)
        assert seen == [("moved.test", "Bearer sk-probe-two")]
        await breakers.aclose()

    asyncio.run(main())
