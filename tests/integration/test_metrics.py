"""GET /metrics through the whole app: a miss, a hit, a 429, an upstream 500 with failover, a stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import build_app, parse
from gateway.store import StoreError
from tests.integration.conftest import KEY_A, KEY_B, Client
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio

ADMIN = "adm-metrics-0123456789abcdef"


@pytest.fixture(scope="module")
def second() -> Iterator[MockOpenAI]:
    with MockOpenAI() as server:
        yield server


def config(mock: MockOpenAI, second: MockOpenAI, metrics: str = "{}") -> str:
    mock.reset()
    second.reset()
    return f"""
auth:
  admin_key: {ADMIN}
  keys:
    - {{name: team-a, key: {KEY_A}, limits: {{rpm: 1000, concurrency: 10}}}}
    - {{name: team-b, key: {KEY_B}, limits: {{rpm: 1}}}}
providers:
  one: {{type: openai, base_url: "{mock.base_url}", api_key: sk-upstream-secret}}
  two: {{type: grok, base_url: "{second.base_url}", api_key: sk-upstream-secret}}
models:
  - name: main
    price: {{input_per_mtok: 1000000, output_per_mtok: 2000000}}
    deployments: [{{provider: one, model: up-one}}, {{provider: two, model: up-two}}]
cache: {{enabled: true}}
breaker: {{failures: 50}}
router: {{retries: 0, backoff_s: 0.01, timeouts: {{connect_s: 1, first_byte_s: 1, total_s: 5}}}}
telemetry: {{metrics: {metrics}}}
"""


@pytest.fixture
async def app(mock: MockOpenAI, second: MockOpenAI, request: pytest.FixtureRequest) -> Any:
    gw = build_app(parse(config(mock, second, getattr(request, "param", "{}")), {}))
    async with gw.lifespan(None):  # type: ignore[arg-type]
        yield gw


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == name and wanted <= ls)


async def scrape(app: Any) -> str:
    async with Client(app, None) as c:
        r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text


async def test_requests_hit_miss_429_failover_and_stream(app: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    async with Client(app) as c:
        assert (await c.chat(model="main", temperature=0)).headers["x-cache"] == "miss"
        await app.cache.flush()
        assert (await c.chat(model="main", temperature=0)).headers["x-cache"] == "hit"
        mock.behave(status=500)
        r = await c.chat(model="main", messages=[{"role": "user", "content": "fail over"}])
        assert r.status_code == 200 and r.headers["x-gateway-deployment"] == "two/up-two"
        mock.reset()
        async with c.stream("POST", "/v1/chat/completions",
                            json={"model": "main", "stream": True, "messages": [{"role": "user", "content": "s"}]}) as s:
            assert s.status_code == 200
            body = b"".join([chunk async for chunk in s.aiter_bytes()])
        assert body.endswith(b"data: [DONE]\n\n")
    async with Client(app, KEY_B) as b:
        assert (await b.chat(model="main")).status_code == 200
        assert (await b.chat(model="main")).status_code == 429
    text = await scrape(app)

    ok = {"operation": "chat", "alias": "main", "status_class": "2xx"}
    assert value(text, "gateway_requests_total", key="team-a", **ok) == 4
    assert value(text, "gateway_requests_total", key="team-a", deployment="two/up-two", **ok) == 1
    assert value(text, "gateway_requests_total", key="team-b", status_class="4xx", deployment="") == 1
    assert value(text, "gateway_cache_lookups_total", alias="main", result="hit") == 1
    assert value(text, "gateway_cache_lookups_total", alias="main", result="miss") == 1
    assert value(text, "gateway_cache_lookups_total", alias="main", result="bypass") == 4
    assert value(text, "gateway_limit_decisions_total", kind="rpm", result="refused") == 1
    assert value(text, "gateway_limit_decisions_total", kind="rpm", result="admitted") == 5
    assert value(text, "gateway_limit_decisions_total", kind="concurrency", result="admitted") == 4
    assert value(text, "gateway_upstream_attempts_total", deployment="one/up-one", outcome="500") == 1
    assert value(text, "gateway_upstream_attempts_total", deployment="two/up-two", outcome="ok") == 1
    assert value(text, "gateway_upstream_retries_total", alias="main", kind="failover", reason="500") == 1
    # Four answers came from upstream (miss, failover, stream, team-b's): the hit and the 429 did not.
    assert value(text, "gen_ai_client_operation_duration_seconds_count", gen_ai_operation_name="chat") == 4
    assert value(text, "gen_ai_client_operation_duration_seconds_count", gen_ai_provider_name="x_ai",
                 gen_ai_request_model="up-two", error_type="") == 1
    inputs = value(text, "gateway_tokens_total", key="team-a", type="input")
    outputs = value(text, "gateway_tokens_total", key="team-a", type="output")
    assert inputs > 0 and outputs > 0
    assert value(text, "gen_ai_client_token_usage_count", gen_ai_token_type="input") == 4
    assert value(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == outputs + value(
        text, "gateway_tokens_total", key="team-b", type="output")
    assert value(text, "gateway_cost_usd_total", key="team-a") == pytest.approx(inputs + 2 * outputs)
    # The stream: first byte, first token, per-token time; streams are the only ones with stream="true".
    assert value(text, "gateway_time_to_first_byte_seconds_count", alias="main") == 1
    assert value(text, "gen_ai_server_time_to_first_token_seconds_count", gen_ai_provider_name="openai") == 1
    assert value(text, "gateway_request_duration_seconds_count", stream="true") == 1
    assert value(text, "gateway_request_duration_seconds_count", stream="false") == 5
    assert value(text, "gateway_overhead_seconds_count") == 4  # not the hit nor the 429
    assert value(text, "gateway_breaker_state", deployment="one/up-one", state="closed") == 1
    assert value(text, "gateway_breaker_state", deployment="one/up-one", state="open") == 0
    assert value(text, "gateway_store_up") == 1
    assert value(text, "gateway_requests_in_flight") == 0
    assert value(text, "gateway_upstream_connections", provider="one", state="idle") >= 1
    assert "secret" not in text and KEY_A not in text


async def test_counts_survive_a_reload(app: Any, tmp_path: Any, mock: MockOpenAI, second: MockOpenAI) -> None:
    async with Client(app) as c:
        assert (await c.chat(model="main")).status_code == 200
    path = tmp_path / "gateway.yaml"
    path.write_text(config(mock, second))
    app.path = str(path)
    assert await app.reload() == []
    assert value(await scrape(app), "gateway_requests_total", key="team-a") == 1


async def test_a_scrape_during_a_store_outage_answers_store_down(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("connection refused")

    monkeypatch.setattr(app.store, "ping", down)
    monkeypatch.setattr(app.store, "run_many", down)
    monkeypatch.setattr(app.store, "run", down)
    async with Client(app) as c:
        assert (await c.chat(model="main", temperature=0)).status_code == 200  # limits and cache fail open
    text = await scrape(app)
    assert value(text, "gateway_store_up") == 0
    assert value(text, "gateway_store_outage_decisions_total", concern="limits") == 1
    assert value(text, "gateway_store_outage_decisions_total", concern="cache") == 1


async def test_openmetrics_when_asked(app: Any) -> None:
    async with Client(app, None) as c:
        r = await c.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n") and "# TYPE gateway_requests counter" in r.text


@pytest.mark.parametrize("app", ["{auth: admin}"], indirect=True)
async def test_the_admin_key_guard(app: Any) -> None:
    async with Client(app, None) as c:
        refused = await c.get("/metrics")
    async with Client(app, KEY_A) as c:
        wrong = await c.get("/metrics")
    async with Client(app, ADMIN) as c:
        allowed = await c.get("/metrics")
    assert refused.status_code == wrong.status_code == 401
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert allowed.status_code == 200 and "gateway_requests_total" in allowed.text


@pytest.mark.parametrize("app", ["{enabled: false}"], indirect=True)
async def test_off(app: Any) -> None:
    async with Client(app, None) as c:
        assert (await c.get("/metrics")).status_code == 404


async def test_breaker_transitions_and_state(mock: MockOpenAI, second: MockOpenAI) -> None:
    text = config(mock, second).replace("breaker: {failures: 50}", "breaker: {failures: 2, cooldown_s: 30}")
    gw = build_app(parse(text, {}))
    async with gw.lifespan(None):  # type: ignore[arg-type]
        mock.behave(status=500)
        async with Client(gw) as c:
            for _ in range(2):
                assert (await c.chat(model="main")).status_code == 200  # failed over to two
        await gw.breakers.flush()
        exposition = await scrape(gw)
    assert value(exposition, "gateway_breaker_transitions_total", deployment="one/up-one", state="open") == 1
    assert value(exposition, "gateway_breaker_state", deployment="one/up-one", state="open") == 1
    assert value(exposition, "gateway_breaker_state", deployment="two/up-two", state="closed") == 1


async def test_in_flight_and_open_streams_while_a_stream_is_relayed(app: Any, mock: MockOpenAI) -> None:
    # httpx's ASGI transport returns once the app is done, so the stream is driven by hand here.
    mock.behave(chunks=3, chunk_delay=0.05)
    body = orjson.dumps({"model": "main", "stream": True, "messages": [{"role": "user", "content": "slow"}]})
    scope = {
        "type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"", "scheme": "http",
        "headers": [(b"authorization", f"Bearer {KEY_A}".encode()), (b"content-type", b"application/json")],
    }
    during: list[tuple[Any, ...]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("more_body") and not during:
            during.append(await app.metrics.collect())

    await app(scope, receive, send)
    ((_, gauges, _),) = during
    assert gauges["gateway_requests_in_flight"] == {(): 1} and gauges["gateway_streams_open"] == {(): 1}
    assert gauges["gateway_upstream_connections"][("one", "in_use")] == 1
    after = await scrape(app)
    assert value(after, "gateway_requests_in_flight") == 0 and value(after, "gateway_streams_open") == 0
    assert value(after, "gateway_upstream_connections", provider="one", state="in_use") == 0
    assert value(after, "gen_ai_server_time_per_output_token_seconds_count", gen_ai_request_model="up-one") == 1
