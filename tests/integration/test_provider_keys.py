"""A provider with several API keys, through the whole app: 429 moves on, 401/403 retires, reload restores."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import build_app, load
from gateway.routing import forward
from tests.integration.conftest import KEY_A, Client
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio

ADMIN = "adm-provkeys-0123456789ab"
K1, K2, K3 = "sk-upstream-key-one-1111", "sk-upstream-key-two-2222", "sk-upstream-key-three-3333"


@pytest.fixture(scope="module")
def second() -> Iterator[MockOpenAI]:
    with MockOpenAI() as server:
        yield server


def write(path: Path, mock: MockOpenAI, second: MockOpenAI, retries: int = 0) -> None:
    path.write_text(f"""
auth:
  admin_key: {ADMIN}
  keys: [{{name: a, key: {KEY_A}}}]
providers:
  multi: {{type: openai, base_url: "{mock.base_url}", api_keys: [{K1}, {K2}, {K3}]}}
  backup: {{type: openai, base_url: "{second.base_url}", api_key: sk-upstream-secret}}
models:
  - {{name: main, deployments: [{{provider: multi, model: mock-gpt-upstream}}]}}
  - name: safe
    deployments: [{{provider: multi, model: mock-gpt-upstream}}, {{provider: backup, model: mock-gpt-upstream}}]
router: {{retries: {retries}, backoff_s: 5, backoff_max_s: 5, timeouts: {{connect_s: 1, first_byte_s: 2, total_s: 20}}}}
""")
    path.chmod(0o600)


@pytest.fixture
async def gw(
    tmp_path: Path, mock: MockOpenAI, second: MockOpenAI, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Any, Path]]:
    mock.reset()
    second.reset()
    mock.api_keys = {mock.api_key, K1, K2, K3}
    path = tmp_path / "gw.yaml"
    write(path, mock, second, getattr(request, "param", 0))
    app = build_app(load(path), str(path))
    async with app.lifespan():
        yield app, path
    mock.api_keys = {mock.api_key}


def keys_used(mock: MockOpenAI) -> list[str]:
    return [r.header("authorization").removeprefix("Bearer ") for r in mock.requests_to("/v1/chat/completions")]


async def chat(app: Any, model: str = "main") -> Any:
    async with Client(app) as c:
        return await c.chat(model=model)


async def test_requests_stay_on_the_current_key(gw: tuple[Any, Path], mock: MockOpenAI) -> None:
    app, _ = gw
    for _ in range(3):
        assert (await chat(app)).status_code == 200
    assert keys_used(mock) == [K1, K1, K1]


async def test_a_429_moves_the_next_request_to_the_next_key(gw: tuple[Any, Path], mock: MockOpenAI) -> None:
    app, _ = gw
    mock.behave(key=K1, status=429)
    limited = await chat(app)  # retries: 0, one deployment: the 429 is the answer
    assert limited.status_code == 429
    assert (await chat(app)).status_code == 200
    mock.behave(key=K2, status=429)
    assert (await chat(app)).status_code == 429
    assert (await chat(app)).status_code == 200
    assert keys_used(mock) == [K1, K2, K2, K3]


@pytest.mark.parametrize("gw", [1], indirect=True)
async def test_the_retry_of_a_429_goes_at_once_on_the_next_key(
    gw: tuple[Any, Path], mock: MockOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _ = gw
    backoffs: list[float] = []

    class Jitter:
        def uniform(self, low: float, high: float) -> float:
            backoffs.append(high)
            return 0.0

    monkeypatch.setattr(forward, "random", Jitter())
    mock.behave(key=K1, status=429)
    r = await chat(app)
    assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "2"
    assert keys_used(mock) == [K1, K2] and backoffs == []
    mock.behave(status=500, times=1)  # the same key again: that retry backs off
    assert (await chat(app)).status_code == 200
    assert keys_used(mock) == [K1, K2, K2, K2] and backoffs == [5]


async def test_a_401_retires_the_key_and_the_request_goes_on_with_the_next(
    gw: tuple[Any, Path], mock: MockOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = gw
    mock.api_keys.discard(K1)  # revoked upstream
    with caplog.at_level(logging.ERROR, "gateway.providers"):
        r = await chat(app)  # retries: 0, yet a refused key is not the request's fault
        assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "2"
        mock.behave(key=K2, status=429)
        assert (await chat(app)).status_code == 429  # K2 -> K3; K1 is out of the round
        for _ in range(3):
            assert (await chat(app)).status_code == 200
    assert keys_used(mock) == [K1, K2, K2, K3, K3, K3]
    async with Client(app) as c:
        metrics = (await c.get("/metrics")).text
    assert 'gateway_provider_keys{provider="multi",state="retired"} 1.0' in metrics
    assert 'gateway_provider_keys{provider="multi",state="usable"} 2.0' in metrics
    (record,) = [r for r in caplog.records if "refused API key" in r.getMessage()]
    assert "providers.multi.api_keys[0] (…1111)" in record.getMessage() and K1 not in record.getMessage()


async def test_a_403_retires_the_key_too(gw: tuple[Any, Path], mock: MockOpenAI) -> None:
    app, _ = gw
    mock.behave(key=K1, status=403)
    assert (await chat(app)).status_code == 200
    assert (await chat(app)).status_code == 200
    assert keys_used(mock) == [K1, K2, K2]


async def test_every_key_retired_fails_fast_and_fails_over(
    gw: tuple[Any, Path], mock: MockOpenAI, second: MockOpenAI
) -> None:
    app, _ = gw
    mock.api_keys = {mock.api_key}  # all three revoked
    r = await chat(app)
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == "provider_keys_exhausted" and error["type"] == "server_error"
    assert "provider 'multi' has no usable API key" in error["message"]
    assert not any(k in r.text for k in (K1, K2, K3)) and "1111" not in r.text
    assert keys_used(mock) == [K1, K2, K3]

    again = await chat(app)  # fails fast: no upstream call
    assert again.status_code == 503 and again.json()["error"] == error
    assert len(keys_used(mock)) == 3

    moved = await chat(app, "safe")  # the other provider's deployment serves the alias
    assert moved.status_code == 200 and moved.headers["x-gateway-deployment"] == "backup/mock-gpt-upstream"
    assert moved.headers["x-gateway-attempts"] == "1"
    assert len(keys_used(mock)) == 3 and len(second.requests) == 1


async def test_the_last_key_refused_mid_request_fails_over(
    gw: tuple[Any, Path], mock: MockOpenAI, second: MockOpenAI
) -> None:
    app, _ = gw
    mock.api_keys = {mock.api_key}
    r = await chat(app, "safe")
    assert r.status_code == 200 and r.headers["x-gateway-deployment"] == "backup/mock-gpt-upstream"
    assert r.headers["x-gateway-attempts"] == "4" and keys_used(mock) == [K1, K2, K3]


async def test_a_reload_restores_every_key(gw: tuple[Any, Path], mock: MockOpenAI) -> None:
    app, _ = gw
    mock.api_keys = {mock.api_key}
    assert (await chat(app)).status_code == 503
    mock.api_keys = {K1, K2, K3}  # the operator fixed the keys upstream
    assert (await chat(app)).status_code == 503  # still retired here
    async with Client(app, ADMIN) as admin:
        assert (await admin.post("/admin/reload")).status_code == 200
    assert (await chat(app)).status_code == 200
    assert keys_used(mock) == [K1, K2, K3, K1]
