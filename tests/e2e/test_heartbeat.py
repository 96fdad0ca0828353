"""SSE heartbeats while a stream waits for its first token, through a real uvicorn process."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.mock_openai import MockOpenAI

from .conftest import GatewayFactory, GatewayProcess, default_config

HEARTBEAT_S = 0.2
SLOW = 1.0  # an upstream's wait before its response head: several heartbeat intervals
KEEP_ALIVE = b": keep-alive\n\n"


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory, mock_upstream: MockOpenAI) -> Iterator[GatewayProcess]:
    config = default_config(mock_upstream)
    config["router"]["heartbeat_s"] = HEARTBEAT_S
    config["models"].append(
        {
            "name": "gpt-pair",
            "deployments": [
                {"provider": "mock", "model": "mock-gpt-first"},
                {"provider": "mock", "model": "mock-gpt-upstream"},
            ],
        }
    )
    config["auth"]["keys"][0]["models"].append("gpt-pair")
    config["cache"] = {"enabled": True}  # deterministic: only temperature-0 requests are cached
    yield module_gateway_factory(config)


def body(model: str = "gpt-mini", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"hello {uuid.uuid4().hex}"}],
        "stream": True,
        **extra,
    }


def raw_stream(gateway: GatewayProcess, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    with gateway.http(timeout=10) as http, http.stream("POST", "/v1/chat/completions", json=request) as r:
        return r.status_code, dict(r.headers), r.read()


def access_line(gateway: GatewayProcess, request_id: str) -> dict[str, Any]:
    """The request's access log line, written once its answer has ended."""
    for _ in range(100):
        for line in gateway.log_text().splitlines():
            if "gateway.access" in line and request_id in line:
                return dict(json.loads(line[line.index("{") :]))
        time.sleep(0.02)
    raise AssertionError(f"no access log line for {request_id}")


def contents(raw: bytes) -> list[str]:
    pieces = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                pieces.append(choices[0]["delta"]["content"])
    return pieces


def test_slow_first_token_gets_heartbeats_then_the_stream(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    mock_upstream.behave(model="mock-gpt-upstream", delay_head=SLOW, chunks=3)
    status, headers, raw = raw_stream(gateway, body())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["x-request-id"] and "x-gateway-overhead-ms" in headers
    assert raw.startswith(KEEP_ALIVE) and raw.count(KEEP_ALIVE) >= 2
    assert contents(raw) == ["chunk0 ", "chunk1 ", "chunk2 "]
    assert raw.rstrip().endswith(b"data: [DONE]")


def test_long_gaps_mid_stream_get_heartbeats(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    mock_upstream.behave(model="mock-gpt-upstream", chunks=3, chunk_delay=SLOW)
    status, _, raw = raw_stream(gateway, body())
    assert status == 200 and contents(raw) == ["chunk0 ", "chunk1 ", "chunk2 "]
    first_content = raw.index(b'"content"')
    assert KEEP_ALIVE in raw[first_content:]  # between content events
    for event in raw.split(b"\n\n")[:-1]:  # every heartbeat is an event of its own, never inside one
        assert event.startswith((b"data: ", b": keep-alive")), event


def test_the_sdk_ignores_heartbeats(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    mock_upstream.behave(model="mock-gpt-upstream", delay_head=SLOW, chunks=3)
    with gateway.client() as client:
        stream = client.chat.completions.create(**body())
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert pieces == ["chunk0 ", "chunk1 ", "chunk2 "]


def test_fast_upstream_gets_no_heartbeat(gateway_factory: GatewayFactory, mock_upstream: MockOpenAI) -> None:
    config = default_config(mock_upstream)
    config["router"]["heartbeat_s"] = 2  # none before 2 s, however loaded the machine
    gateway = gateway_factory(config)
    status, headers, raw = raw_stream(gateway, body())
    assert status == 200 and b": keep-alive" not in raw
    assert headers["x-gateway-deployment"] == "mock/mock-gpt-upstream"  # the relay's own head
    assert contents(raw)


def test_upstream_error_after_heartbeats_is_an_error_event(
    gateway: GatewayProcess, mock_upstream: MockOpenAI
) -> None:
    mock_upstream.behave(model="mock-gpt-upstream", delay_head=SLOW, status=500)
    status, headers, raw = raw_stream(gateway, body())
    assert status == 200 and raw.startswith(KEEP_ALIVE)
    assert raw.endswith(b"\n\n") and b"event: error\ndata: " in raw
    event = json.loads(raw.split(b"event: error\ndata: ")[1])
    assert set(event["error"]) == {"message", "type", "param", "code"}
    request_id = headers["x-request-id"]
    # The access log tells the failure, though the wire said 200 before it was known.
    assert access_line(gateway, request_id)["status"] == 500

    with gateway.client(max_retries=0) as client:
        stream = client.chat.completions.create(**body())
        with stream, pytest.raises(openai.APIError) as exc:
            list(stream)
    assert type(exc.value) is openai.APIError and isinstance(exc.value.body, dict)
    assert exc.value.body["type"] == "server_error"


def test_failover_goes_on_behind_heartbeats(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    first = mock_upstream.behave(model="mock-gpt-first", delay_head=SLOW, status=503)
    mock_upstream.behave(model="mock-gpt-upstream", chunks=2)
    status, _, raw = raw_stream(gateway, body("gpt-pair"))
    assert status == 200 and raw.startswith(KEEP_ALIVE)
    assert len(first.requests) == 1  # retries: 0 in this config; failover walked to the second
    assert contents(raw) == ["chunk0 ", "chunk1 "] and b"event: error" not in raw


def test_cache_keeps_no_heartbeat(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    mock_upstream.behave(model="mock-gpt-upstream", delay_head=SLOW, chunks=3)
    request = body(temperature=0)
    status, headers, first = raw_stream(gateway, request)
    assert status == 200 and headers["x-cache"] == "miss" and first.startswith(KEEP_ALIVE)
    for _ in range(50):  # the fill is written after the answer
        status, headers, again = raw_stream(gateway, request)
        if headers["x-cache"] == "hit":
            break
    assert headers["x-cache"] == "hit" and b"keep-alive" not in again
    assert again == first.replace(KEEP_ALIVE, b"")
    with gateway.client() as client:  # the stored stream, assembled for a non-streaming request
        answer = client.chat.completions.create(**{**request, "stream": False})
    assert answer.choices[0].message.content == "chunk0 chunk1 chunk2 "
