"""Validation through the whole app: an invalid request is refused before limits are charged and never
reaches the upstream; a valid one goes through with its unknown fields untouched."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway import build_app, parse
from tests.integration.conftest import KEY_A, Client
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio

RPM, TPM = 3, 5000
USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def gw(config_text: str) -> Any:
    text = config_text.replace(
        "{name: team-a, key: " + KEY_A + ",", "{name: team-a, key: " + KEY_A + f", limits: {{rpm: {RPM}, tpm: {TPM}}},"
    )
    app = build_app(parse(text + "cache: {enabled: true, mode: always}\n", {}))
    async with app.lifespan(None):  # type: ignore[arg-type]
        yield app


INVALID: list[Any] = [
    pytest.param("/v1/chat/completions", {"model": "gpt-mini", "messages": []}, "messages", id="no-messages"),
    pytest.param("/v1/chat/completions", {"model": "gpt-mini", "messages": [{"role": "root", "content": "x"}]},
                 "messages[0].role", id="role"),
    pytest.param("/v1/chat/completions", {"model": "gpt-mini", "messages": USER, "max_tokens": -1}, "max_tokens",
                 id="negative-max-tokens"),
    # Over TPM too: validation answers (400), not the limiter (429), and reserves nothing.
    pytest.param("/v1/chat/completions", {"model": "gpt-mini", "messages": USER, "max_tokens": 10**9},
                 "max_tokens", id="huge-max-tokens"),
    pytest.param("/v1/chat/completions", {"model": "gpt-mini", "messages": USER, "n": 1000}, "n", id="n"),
    pytest.param("/v1/chat/completions", {"model": "gpt-mini", "messages": USER, "temperature": "hot"},
                 "temperature", id="temperature"),
    pytest.param("/v1/chat/completions",
                 {"model": "gpt-mini", "messages": USER,
                  "tools": [{"type": "function", "function": {"name": "ok"}},
                            {"type": "function", "function": {"name": "not ok"}}]},
                 "tools[1].function.name", id="tool-name"),
    pytest.param("/v1/chat/completions", {"model": "gpt-mini", "messages": USER, "stream_options": {}},
                 "stream_options", id="stream-options-without-stream"),
    pytest.param("/v1/completions", {"model": "instruct", "prompt": "x", "best_of": 50}, "best_of", id="best-of"),
    pytest.param("/v1/embeddings", {"model": "emb", "input": ""}, "input", id="empty-input"),
    pytest.param("/v1/images/generations", {"model": "img", "prompt": "cat", "n": 11}, "n", id="images-n"),
]


@pytest.mark.parametrize(("path", "body", "param"), INVALID)
async def test_invalid_is_refused_before_limits_and_upstream(
    gw: Any, mock: MockOpenAI, path: str, body: dict[str, Any], param: str
) -> None:
    async with Client(gw) as c:
        for _ in range(RPM + 1):  # more than the key's rpm: none of them is counted
            r = await c.post(path, json=body)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert (error["param"], error["type"]) == (param, "invalid_request_error")
            assert not any(h.startswith("x-ratelimit") for h in r.headers)  # the limiter never ran
        ok = await c.chat(max_tokens=10)
    assert [sent.path for sent in mock.requests] == ["/v1/chat/completions"]  # only the valid one went upstream
    assert ok.status_code == 200
    assert ok.headers["x-ratelimit-remaining-requests"] == str(RPM - 1)
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) > TPM - 100  # only its own small estimate


async def test_a_json_body_sent_as_text_is_415_and_not_counted(gw: Any, mock: MockOpenAI) -> None:
    body = orjson.dumps({"model": "gpt-mini", "messages": USER})
    async with Client(gw) as c:
        for content_type in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded"):
            r = await c.post("/v1/chat/completions", content=body, headers={"content-type": content_type})
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        ok = await c.chat()
    assert ok.headers["x-ratelimit-remaining-requests"] == str(RPM - 1)
    assert len(mock.requests) == 1


async def test_unknown_fields_reach_the_upstream_untouched(gw: Any, mock: MockOpenAI) -> None:
    extra = {"vendor_option": {"nested": [1, "two", None]}, "reasoning_effort": "xhigh", "metadata": {"k": "v"}}
    async with Client(gw) as c:
        r = await c.chat(stream=None, temperature=None, **extra)
    assert r.status_code == 200, r.text
    sent = mock.requests[0].json()
    assert {k: sent[k] for k in extra} == extra
    assert sent["stream"] is None and sent["temperature"] is None


async def test_an_oversized_head_is_431_before_auth(gw: Any, mock: MockOpenAI) -> None:
    async with Client(gw, key="sk-not-a-key-0000000000") as c:
        big = await c.get("/v1/models", headers={"x-big": "a" * 65536})
        small = await c.get("/v1/models")
    assert big.status_code == 431 and big.json()["error"]["code"] == "request_header_fields_too_large"
    assert big.headers["x-request-id"]
    assert small.status_code == 401  # the same bad key, within the bound, reaches auth
