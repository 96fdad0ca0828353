"""The response cache through the whole app: hits, bypasses, streams, errors, purge."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import openai
import orjson
import pytest

from gateway import build_app, parse
from gateway.store import StoreError
from tests.integration.conftest import KEY_A, KEY_B, Client
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio

ADMIN = "adm-cache-0123456789abcdef"


@pytest.fixture
async def gw(config_text: str) -> Any:
    text = (
        config_text.replace("auth:\n", f"auth:\n  admin_key: {ADMIN}\n")
        + "cache: {enabled: true, ttl_s: 60}\n"
    )
    app = build_app(parse(text, {}))
    async with app.lifespan(None):  # type: ignore[arg-type]
        yield app


async def ask(app: Any, key: str = KEY_A, headers: dict[str, str] | None = None, **body: Any) -> Any:
    body.setdefault("model", "gpt-mini")
    body.setdefault("messages", [{"role": "user", "content": "cache me"}])
    async with Client(app, key) as c:
        r = await c.post("/v1/chat/completions", json=body, headers=headers or {})
    await app.cache.flush()  # let the fill land
    return r


async def test_deterministic_requests_hit(gw: Any, mock: MockOpenAI) -> None:
    first = await ask(gw, temperature=0)
    second = await ask(gw, temperature=0, user="someone-else")  # `user` is not part of the key
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert second.json() == first.json() and len(mock.requests) == 1
    assert (await ask(gw, temperature=0.7)).headers["x-cache"] == "bypass"
    assert (await ask(gw, temperature=0, max_tokens=5)).headers["x-cache"] == "miss"


async def test_scoped_per_key(gw: Any, mock: MockOpenAI) -> None:
    await ask(gw, temperature=0)
    assert (await ask(gw, KEY_B, temperature=0)).headers["x-cache"] == "miss"


async def test_client_directives(gw: Any, mock: MockOpenAI) -> None:
    assert (await ask(gw, headers={"x-gateway-cache": "on"})).headers["x-cache"] == "miss"
    assert (await ask(gw, headers={"x-gateway-cache": "on"})).headers["x-cache"] == "hit"
    assert (await ask(gw, headers={"cache-control": "no-cache"}, temperature=0)).headers["x-cache"] == "miss"
    assert (await ask(gw, headers={"cache-control": "no-store"}, temperature=0)).headers[
        "x-cache"
    ] == "bypass"
    assert (await ask(gw, headers={"x-gateway-cache": "off"}, temperature=0)).headers["x-cache"] == "bypass"


async def test_errors_and_broken_streams_are_not_cached(gw: Any, mock: MockOpenAI) -> None:
    mock.behave(status=500)
    await ask(gw, temperature=0)
    mock.reset()
    assert (await ask(gw, temperature=0)).headers["x-cache"] == "miss"
    mock.behave(chunks=6, reset_after=2)
    body = {"stream": True, "temperature": 0, "messages": [{"role": "user", "content": "a b c d e f"}]}
    await ask(gw, **body)
    mock.reset()
    assert (await ask(gw, **body)).headers["x-cache"] == "miss"


async def test_streams_replay_as_sse(gw: Any, mock: MockOpenAI) -> None:
    body = {"stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
    first = await ask(gw, **body)
    second = await ask(gw, **body)
    assert second.headers["x-cache"] == "hit" and second.headers["content-type"].startswith(
        "text/event-stream"
    )
    assert second.content == first.content and second.text.endswith("data: [DONE]\n\n")
    events = [orjson.loads(line[6:]) for line in second.text.splitlines() if line.startswith("data: {")]
    assert events and all(e["object"] == "chat.completion.chunk" for e in events)


def sdk(app: Any) -> openai.AsyncOpenAI:
    transport = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    return openai.AsyncOpenAI(base_url="http://gw/v1", api_key=KEY_A, http_client=transport, max_retries=0)


async def test_a_stream_serves_a_json_request_and_back(gw: Any, mock: MockOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "one two three"}]
    client = sdk(gw)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-mini",
        messages=messages,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-cache"] == "miss"
    streamed = [chunk async for chunk in raw.parse()]
    await gw.cache.flush()
    raw_json = await client.chat.completions.with_raw_response.create(
        model="gpt-mini", messages=messages, temperature=0
    )
    assert raw_json.headers["x-cache"] == "hit" and len(mock.requests) == 1
    answer = raw_json.parse()
    assert answer.object == "chat.completion" and answer.id == streamed[0].id
    assert answer.choices[0].message.content == "".join(
        c.choices[0].delta.content or "" for c in streamed if c.choices
    )
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage == streamed[-1].usage

    # And a JSON answer to a streaming request: chunks that add up to it, usage only when asked for.
    others: Any = [{"role": "user", "content": "four five"}]
    stored = await client.chat.completions.create(model="gpt-mini", messages=others, temperature=0)
    await gw.cache.flush()
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-mini", messages=others, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["x-cache"] == "hit" and len(mock.requests) == 2
    chunks = [chunk async for chunk in raw.parse()]
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == stored.choices[0].message.content
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == stored.usage
    plain = [
        chunk
        async for chunk in await client.chat.completions.create(
            model="gpt-mini", messages=others, temperature=0, stream=True
        )
    ]
    assert plain[-1].choices[0].finish_reason == "stop" and all(c.usage is None for c in plain)
    assert len(mock.requests) == 2


async def test_legacy_completions_cross_modes(gw: Any, mock: MockOpenAI) -> None:
    client = sdk(gw)
    stream = await client.completions.create(
        model="instruct", prompt="say this", temperature=0, stream=True, stream_options={"include_usage": True}
    )
    text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    await gw.cache.flush()
    raw = await client.completions.with_raw_response.create(
        model="instruct", prompt="say this", temperature=0
    )
    assert raw.headers["x-cache"] == "hit" and (raw.parse()).choices[0].text == text == "echo: say this"
    assert raw.parse().usage is not None
    assert len(mock.requests) == 1


async def test_stream_options_share_an_entry_only_where_it_serves_exactly(gw: Any, mock: MockOpenAI) -> None:
    """One entry serves every request it can answer as the upstream would have, usage event included."""
    body: dict[str, Any] = {"stream": True, "temperature": 0}
    usage = {"include_usage": True}
    plain = await ask(gw, **body)
    assert plain.headers["x-cache"] == "miss" and '"usage":{' not in plain.text
    # Stored without a usage event: it cannot serve requests that need usage; they go upstream and refill.
    counted = await ask(gw, **body, stream_options=usage)
    assert counted.headers["x-cache"] == "miss" and '"choices":[],"usage":{' in counted.text.replace(" ", "")
    assert len(mock.requests) == 2
    # Stored with it: it serves a JSON request (with usage), and a stream without `include_usage`
    # (the usage event stripped), and one with it (as stored).
    answer = await ask(gw, temperature=0)
    again = await ask(gw, **body)
    counted_again = await ask(gw, **body, stream_options=usage)
    assert [r.headers["x-cache"] for r in (answer, again, counted_again)] == ["hit"] * 3
    assert answer.json()["usage"]["total_tokens"] > 0 and len(mock.requests) == 2
    assert '"usage":{' not in again.text and again.text.endswith("data: [DONE]\n\n")
    assert content_of(again.text) == content_of(plain.text) and counted_again.content == counted.content


def content_of(stream: str) -> str:
    events = [orjson.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


async def test_purge_all_per_key_per_model(gw: Any, mock: MockOpenAI) -> None:
    async with Client(gw, ADMIN) as admin:
        for spec in ({}, {"key": "cfg-team-a"}, {"model": "gpt-mini"}):
            await ask(gw, temperature=0)
            assert (await ask(gw, temperature=0)).headers["x-cache"] == "hit"
            r = await admin.post("/admin/cache/purge", json=spec)
            assert r.status_code == 200
            assert (await ask(gw, temperature=0)).headers["x-cache"] == "miss"
        r = await admin.post("/admin/cache/purge", json={"key": "a", "model": "b"})
        assert r.status_code == 400


async def test_purge_refused_when_cache_is_off(config_text: str) -> None:
    app = build_app(parse(config_text.replace("auth:\n", f"auth:\n  admin_key: {ADMIN}\n"), {}))
    async with app.lifespan(None), Client(app, ADMIN) as admin:  # type: ignore[arg-type]
        r = await admin.post("/admin/cache/purge", json={})
    assert r.status_code == 400 and r.json()["error"]["code"] == "cache_disabled"


async def test_a_request_sets_its_entrys_ttl_within_the_bound(gw: Any, mock: MockOpenAI) -> None:
    short = {"x-gateway-cache-ttl": "0.3"}
    assert (await ask(gw, headers=short, temperature=0)).headers["x-cache"] == "miss"
    assert (await ask(gw, temperature=0)).headers["x-cache"] == "hit"
    await anyio.sleep(0.4)
    assert (await ask(gw, temperature=0)).headers["x-cache"] == "miss"  # stored for 60 s this time
    for bad in ("0", "-1", "abc", "nan", "inf", "86401"):
        r = await ask(gw, headers={"x-gateway-cache-ttl": bad}, temperature=0)
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-gateway-cache-ttl"
    assert len(mock.requests) == 2  # refused requests never went upstream


async def test_store_outage_closed_answers_503_and_open_serves_uncached(gw: Any, mock: MockOpenAI) -> None:
    async def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("redis script failed: ConnectionError")

    gw.store.run = down
    served = await ask(gw, temperature=0)
    assert served.status_code == 200 and served.headers["x-cache"] == "miss"
    gw.cache.outage = "closed"
    refused = await ask(gw, temperature=0)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "cache_unavailable"
    assert (await ask(gw, temperature=0.5)).status_code == 200  # not cacheable: no lookup to fail
    async with Client(gw) as c:
        assert (await c.get("/health/store")).json()["decided_without_store"] == {"limits": 0, "cache": 2}
