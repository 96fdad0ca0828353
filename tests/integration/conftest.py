"""The whole app in-process (httpx.ASGITransport) against a loopback mock OpenAI upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from gateway import build_app, parse
from tests.mock_openai import MockOpenAI

KEY_A = "sk-int-team-a-0123456789"
KEY_B = "sk-int-team-b-0123456789"


@pytest.fixture(scope="module")
def mock() -> Iterator[MockOpenAI]:
    with MockOpenAI() as server:
        yield server


@pytest.fixture
def config_text(mock: MockOpenAI) -> str:
    mock.reset()
    return f"""
server: {{max_body_bytes: 4096}}
auth:
  keys:
    - {{name: team-a, key: {KEY_A}, models: [gpt-mini, emb, img, instruct, search, dead]}}
    - {{name: team-b, key: {KEY_B}, models: ["gpt-*"]}}
providers:
  mock: {{type: openai, base_url: "{mock.base_url}", api_key: sk-upstream-secret}}
  pplx: {{type: perplexity, base_url: "{mock.base_url}", api_key: sk-upstream-secret}}
  dead: {{type: openai, base_url: "http://127.0.0.1:9/v1", api_key: sk-dead-secret}}
  disabled: {{type: openai, api_key: ""}}
models:
  - {{name: gpt-mini, deployments: [{{provider: disabled, model: nope}}, {{provider: mock, model: mock-gpt-upstream}}]}}
  - {{name: gpt-other, deployments: [{{provider: mock, model: mock-gpt-upstream}}]}}
  - {{name: emb, deployments: [{{provider: mock, model: mock-embed}}]}}
  - {{name: img, deployments: [{{provider: mock, model: mock-image}}]}}
  - {{name: instruct, deployments: [{{provider: mock, model: mock-instruct}}]}}
  - {{name: search, deployments: [{{provider: pplx, model: mock-gpt-upstream}}]}}
  - {{name: dead, deployments: [{{provider: dead, model: mock-gpt-upstream}}]}}
  - {{name: unserved, deployments: [{{provider: disabled, model: x}}]}}
router: {{timeouts: {{connect_s: 1, first_byte_s: 1, idle_s: 1, total_s: 5}}}}
"""


class Client(httpx.AsyncClient):
    def __init__(self, app: Any, key: str | None = KEY_A) -> None:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        super().__init__(transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=headers)

    async def chat(self, **body: Any) -> httpx.Response:
        body.setdefault("model", "gpt-mini")
        body.setdefault("messages", [{"role": "user", "content": "hello there"}])
        return await self.post("/v1/chat/completions", json=body)


@pytest.fixture
async def gw(config_text: str) -> AsyncIterator[Any]:
    app = build_app(parse(config_text, {}))
    async with app.lifespan(None):  # type: ignore[arg-type]
        yield app


@pytest.fixture
async def client(gw: Any) -> AsyncIterator[Client]:
    async with Client(gw) as c:
        yield c
