"""Router, retries, failover and the breaker through the whole app, against two mock upstreams."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from gateway import build_app, parse
from tests.integration.conftest import KEY_A, Client
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def second() -> Iterator[MockOpenAI]:
    with MockOpenAI() as server:
        yield server


def config(mock: MockOpenAI, second: MockOpenAI, *, strategy: str = "priority", retries: int = 0,
           failures: int = 3, failover: bool = True, total_s: float = 5) -> str:
    mock.reset()
    second.reset()
    return f"""
auth:
  keys: [{{name: a, key: {KEY_A}}}]
providers:
  one: {{type: openai, base_url: "{mock.base_url}", api_key: sk-upstream-secret}}
  two: {{type: openai, base_url: "{second.base_url}", api_key: sk-upstream-secret}}
  dead: {{type: openai, base_url: "http://127.0.0.1:9/v1", api_key: sk-dead}}
models:
  - name: main
    strategy: {strategy}
    deployments: [{{provider: one, model: mock-gpt-upstream}}, {{provider: two, model: mock-gpt-upstream}}]
  - name: solo
    deployments: [{{provider: one, model: mock-gpt-upstream}}]
  - name: chain
    fallbacks: [main]
    deployments: [{{provider: dead, model: x}}]
  - name: refused
    deployments: [{{provider: dead, model: x}}, {{provider: two, model: mock-gpt-upstream}}]
  - name: pinned
    failover: false
    deployments: [{{provider: one, model: mock-gpt-upstream}}, {{provider: two, model: mock-gpt-upstream}}]
  - name: patient
    retries: 2
    deployments: [{{provider: one, model: mock-gpt-upstream}}, {{provider: two, model: mock-gpt-upstream}}]
breaker: {{failures: {failures}, window_s: 5, cooldown_s: 0.3, max_cooldown_s: 1}}
router:
  retries: {retries}
  failover: {str(failover).lower()}
  backoff_s: 0.01
  backoff_max_s: 0.02
  timeouts: {{connect_s: 1, first_byte_s: 0.5, total_s: {total_s}}}
"""


@pytest.fixture
async def app(mock: MockOpenAI, second: MockOpenAI, request: pytest.FixtureRequest) -> Any:
    options = getattr(request, "param", {})
    gw = build_app(parse(config(mock, second, **options), {}))
    async with gw.lifespan(None):  # type: ignore[arg-type]
        yield gw


async def chat(app: Any, model: str = "main", **extra: Any) -> Any:
    async with Client(app) as c:
        return await c.chat(model=model, **extra)


async def test_5xx_fails_over_to_the_next_deployment(app: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    mock.behave(status=503)
    r = await chat(app)  # retries: 0; failover needs none
    assert r.status_code == 200
    assert r.headers["x-gateway-deployment"] == "two/mock-gpt-upstream" and r.headers["x-gateway-attempts"] == "2"
    assert len(mock.requests) == 1 and len(second.requests) == 1


async def test_refused_connection_fails_over_without_retries(app: Any, second: MockOpenAI) -> None:
    r = await chat(app, model="refused")  # its first deployment is a closed port
    assert r.status_code == 200
    assert r.headers["x-gateway-deployment"] == "two/mock-gpt-upstream" and r.headers["x-gateway-attempts"] == "2"


@pytest.mark.parametrize("app", [{"failover": False}], indirect=True)
async def test_failover_off_ends_at_the_first_deployment(app: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    mock.behave(status=500)
    r = await chat(app)
    assert r.status_code == 500 and r.headers["x-gateway-attempts"] == "1"
    assert second.requests == []
    r = await chat(app, model="refused")
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
    assert second.requests == []


async def test_failover_is_set_per_model(app: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    mock.behave(status=500)
    r = await chat(app, model="pinned")  # failover: false overrides the router's true
    assert r.status_code == 500 and r.headers["x-gateway-deployment"] == "one/mock-gpt-upstream"
    assert second.requests == []


@pytest.mark.parametrize("app", [{"retries": 2, "failures": 10}], indirect=True)
async def test_retries_stay_on_the_deployment_then_fail_over(app: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    mock.behave(status=500)
    r = await chat(app)
    assert r.status_code == 200 and r.headers["x-gateway-deployment"] == "two/mock-gpt-upstream"
    assert r.headers["x-gateway-attempts"] == "4"  # 1 + 2 retries on the first, then the second
    assert len(mock.requests) == 3 and len(second.requests) == 1


@pytest.mark.parametrize("app", [{"failures": 10}], indirect=True)
async def test_retries_are_set_per_model(app: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    mock.behave(status=500)
    r = await chat(app, model="patient")  # retries: 2 overrides the router's 0
    assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "4"
    assert len(mock.requests) == 3


@pytest.mark.parametrize("app", [{"retries": 2, "failures": 10}], indirect=True)
async def test_timed_out_deployment_is_not_tried_twice(app: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    hung = mock.behave(hang=True)
    r = await chat(app)
    assert r.status_code == 200 and r.headers["x-gateway-deployment"] == "two/mock-gpt-upstream"
    assert len(hung.requests) == 1 and r.headers["x-gateway-attempts"] == "2"


@pytest.mark.parametrize("app", [{"retries": 1000, "failures": 10000, "total_s": 0.3}], indirect=True)
async def test_retries_end_at_the_total_deadline(app: Any, mock: MockOpenAI) -> None:
    mock.behave(status=500)
    r = await chat(app, model="solo")
    assert r.status_code == 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # Backoffs of at most 20 ms cannot fit 1000 retries in 0.3 s: the deadline ended them.
    assert len(mock.requests) > 1 and len(mock.requests) < 1001


async def test_hung_deployment_fails_over_after_first_byte_timeout(app: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    mock.behave(hang=True)
    r = await chat(app)
    assert r.status_code == 200 and r.headers["x-gateway-deployment"] == "two/mock-gpt-upstream"


@pytest.mark.parametrize("app", [{"retries": 2}], indirect=True)
async def test_client_errors_are_not_retried(app: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    mock.behave(status=400)
    r = await chat(app)
    assert r.status_code == 400 and r.headers["x-gateway-attempts"] == "1" and second.requests == []


@pytest.mark.parametrize("app", [{"retries": 2}], indirect=True)
async def test_retries_are_bounded_and_return_the_last_error(app: Any, mock: MockOpenAI) -> None:
    mock.behave(status=500)
    r = await chat(app, model="solo")
    assert r.status_code == 500 and r.headers["x-gateway-attempts"] == "3"  # 1 + retries
    assert len(mock.requests) == 3
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_fallback_chain_across_aliases(app: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    mock.behave(status=502)
    r = await chat(app, model="chain")  # dead (refused) -> main's one (502) -> main's two
    assert r.status_code == 200 and r.headers["x-gateway-deployment"] == "two/mock-gpt-upstream"
    assert r.headers["x-gateway-attempts"] == "3" and len(mock.requests) == 1


async def test_breaker_opens_then_probe_closes_it(app: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    mock.behave(status=500)
    for _ in range(3):
        assert (await chat(app)).status_code == 200  # failed over each time
    await app.breakers.flush()
    assert app.breakers.state("one/mock-gpt-upstream") == "open"
    seen = len(mock.requests)
    for _ in range(5):
        r = await chat(app)
        assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "1"
    assert len(mock.requests) == seen  # the open deployment sees no traffic
    async with Client(app, None) as c:
        health = (await c.get("/health/providers")).json()["deployments"]
    assert health["one/mock-gpt-upstream"]["state"] == "open"
    assert health["one/mock-gpt-upstream"]["last_error"] == "HTTP 500"
    mock.reset()  # recovered
    await asyncio.sleep(0.35)  # cooldown over: the next request probes, succeeds, and closes it
    r = await chat(app)
    assert r.headers["x-gateway-deployment"] == "one/mock-gpt-upstream"
    await app.breakers.flush()
    assert app.breakers.state("one/mock-gpt-upstream") == "closed"


async def test_every_deployment_open_is_503(app: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    mock.behave(status=500)
    second.behave(status=500)
    for _ in range(3):
        await chat(app)
    await app.breakers.flush()
    r = await chat(app)
    assert r.status_code == 503 and r.json()["error"]["code"] == "deployments_unavailable"


@pytest.mark.parametrize("app", [{"strategy": "weighted"}, {"strategy": "least_inflight"}, {"strategy": "lowest_latency"}], indirect=True)
async def test_strategies_serve(app: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    for _ in range(6):
        assert (await chat(app)).status_code == 200
    assert len(mock.requests) + len(second.requests) == 6


async def test_admin_resets_a_breaker(mock: MockOpenAI, second: MockOpenAI) -> None:
    text = config(mock, second).replace("auth:\n", "auth:\n  admin_key: adm-failover-0123456789\n")
    gw = build_app(parse(text, {}))
    async with gw.lifespan(None):  # type: ignore[arg-type]
        mock.behave(status=500)
        for _ in range(3):
            await chat(gw)
        await gw.breakers.flush()
        assert gw.breakers.state("one/mock-gpt-upstream") == "open"
        async with Client(gw, "adm-failover-0123456789") as c:
            r = await c.post("/admin/breakers/one/mock-gpt-upstream/reset")
            assert r.status_code == 200 and r.json()["state"] == "closed"
            assert (await c.post("/admin/breakers/nope/x/reset")).status_code == 404


async def test_active_probe_closes_an_open_breaker_early(mock: MockOpenAI, second: MockOpenAI) -> None:
    text = config(mock, second).replace("cooldown_s: 0.3, max_cooldown_s: 1", "cooldown_s: 30, max_cooldown_s: 60").replace(
        "router:\n", "router:\n  probe_interval_s: 0.1\n")
    gw = build_app(parse(text, {}))
    async with gw.lifespan(None):  # type: ignore[arg-type]
        mock.behave(status=500, path="/v1/chat/completions")
        for _ in range(3):
            await chat(gw)
        await gw.breakers.flush()
        assert gw.breakers.state("one/mock-gpt-upstream") == "open"
        mock.reset()  # recovered; the probe (GET /v1/models) finds out long before the 30 s cooldown
        for _ in range(50):
            if gw.breakers.state("one/mock-gpt-upstream") == "closed":
                break
            await asyncio.sleep(0.05)
        assert gw.breakers.state("one/mock-gpt-upstream") == "closed"
        assert any(r.path == "/v1/models" for r in mock.requests)
        assert (await chat(gw)).headers["x-gateway-deployment"] == "one/mock-gpt-upstream"
