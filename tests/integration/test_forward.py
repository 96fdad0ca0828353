from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from tests.integration.conftest import KEY_B, Client
from tests.mock_openai import MockOpenAI

pytestmark = pytest.mark.anyio


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and "sk-upstream-secret" not in response.text
    return err


async def test_chat_rewrites_model_and_swaps_credentials(client: Client, mock: MockOpenAI) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "gpt-mini", "messages": [{"role": "user", "content": "hello there"}]},
        headers={"x-api-key": "also-client", "connection": "keep-alive", "te": "trailers",
                 "proxy-authorization": "Basic eA==", "x-request-id": "client-id-1"},
    )
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"].startswith("echo: hello there")
    assert r.headers["x-request-id"] == "client-id-1"
    assert float(r.headers["x-gateway-overhead-ms"]) >= 0
    (seen,) = mock.requests_to("/v1/chat/completions")
    assert seen.json()["model"] == "mock-gpt-upstream"
    assert seen.header("authorization") == "Bearer sk-upstream-secret"
    names = {k.lower() for k, _ in seen.headers}
    for leaked in ("x-api-key", "te", "proxy-authorization", "x-request-id", "keep-alive"):
        assert leaked not in names
    assert not any("sk-int" in v for _, v in seen.headers)


async def test_stream_is_relayed_chunk_by_chunk(client: Client, mock: MockOpenAI) -> None:
    mock.behave(model="mock-gpt-upstream", chunks=5, chunk_delay=0.05)
    async with client.stream(
        "POST", "/v1/chat/completions",
        json={"model": "gpt-mini", "stream": True, "stream_options": {"include_usage": True},
              "messages": [{"role": "user", "content": "one two three four five"}]},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    last = orjson.loads(events[-2][6:])
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0


@pytest.mark.parametrize(
    ("path", "body", "check"),
    [
        ("/v1/embeddings", {"model": "emb", "input": ["a", "b"]}, lambda j: len(j["data"]) == 2),
        ("/v1/completions", {"model": "instruct", "prompt": "say"}, lambda j: j["object"] == "text_completion"),
        ("/v1/images/generations", {"model": "img", "prompt": "a cat"}, lambda j: len(j["data"]) >= 1),
    ],
)
async def test_other_operations(client: Client, mock: MockOpenAI, path: str, body: dict, check: Any) -> None:  # type: ignore[type-arg]
    r = await client.post(path, json=body)
    assert r.status_code == 200, r.text
    assert check(r.json())
    assert mock.requests_to(path)[0].json()["model"].startswith("mock-")


async def test_models_lists_only_allowed_served_aliases(gw: Any) -> None:
    async with Client(gw, KEY_B) as c:
        r = await c.get("/v1/models")
        assert r.status_code == 200 and r.headers["x-request-id"]
        assert [m["id"] for m in r.json()["data"]] == ["gpt-mini", "gpt-other"]
        assert (await c.get("/v1/models/gpt-other")).json()["id"] == "gpt-other"
        error_of(await c.get("/v1/models/emb"), 404)
        error_of(await c.get("/v1/models/unserved"), 404)


async def test_health(gw: Any) -> None:
    async with Client(gw, None) as c:
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        r = await c.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready"


async def test_readyz_503_when_store_down(gw: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.store import StoreError

    async def down() -> None:
        raise StoreError("connection refused")

    monkeypatch.setattr(gw.store, "ping", down)
    async with Client(gw, None) as c:
        err = error_of(await c.get("/readyz"), 503)
    assert "store unreachable" in err["message"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "nope"}, 404, "model_not_found"),
        ({"model": "unserved"}, 404, "model_not_found"),
        ({"model": "gpt-other"}, 403, "model_not_allowed"),
        ({"model": "search", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_operation"),
    ],
)
async def test_routing_errors(client: Client, mock: MockOpenAI, body: dict, status: int, code: str) -> None:  # type: ignore[type-arg]
    err = error_of(await client.chat(**body), status)
    assert err["code"] == code and err["param"] == "model"
    assert mock.requests == []


async def test_unsupported_operation_names_provider_and_operation(client: Client) -> None:
    err = error_of(await client.post("/v1/embeddings", json={"model": "search", "input": "x"}), 400)
    assert "'pplx'" in err["message"] and "perplexity" in err["message"] and "embeddings" in err["message"]


@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
async def test_upstream_errors_keep_status_and_message(client: Client, mock: MockOpenAI, status: int) -> None:
    mock.behave(model="mock-gpt-upstream", status=status)
    err = error_of(await client.chat(), status)
    assert "(mock)" in err["message"] or err["message"]


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (502, b"<html>\n<h1>502 Bad Gateway</h1> sk-upstream-secret\n" + b"x" * 2000 + b"</html>"),
        (503, b"Service Unavailable sk-upstream-secret"),
        (500, b'{"detail": "not an error in OpenAI\'s shape sk-upstream-secret"}'),
    ],
)
async def test_upstream_error_body_of_another_shape_is_logged_not_shown(
    client: Client, mock: MockOpenAI, caplog: pytest.LogCaptureFixture, status: int, body: bytes
) -> None:
    mock.behave(model="mock-gpt-upstream", status=status, body=body)
    response = await client.chat()
    err = error_of(response, status)
    rid = response.headers["x-request-id"]
    assert err == {
        "message": f"Upstream provider 'mock' (deployment mock/mock-gpt-upstream) answered HTTP {status}; "
        f"request id {rid}.",
        "type": "upstream_error",
        "param": None,
        "code": None,
    }
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway.forward" and rid in r.getMessage()]
    assert len(logged) == 2  # one line per failed attempt: the first and its one retry
    assert all("***" in line and "sk-upstream-secret" not in line for line in logged)
    assert all(f"answered {status}" in line and "\n" not in line for line in logged)
    assert len(logged[0]) < 750  # the body truncated to 500 bytes
    assert ("Bad Gateway" if status == 502 else "Unavailable" if status == 503 else "detail") in logged[0]


async def test_upstream_error_in_openai_shape_keeps_its_message_masked(client: Client, mock: MockOpenAI) -> None:
    mock.behave(model="mock-gpt-upstream", status=400, error={"message": "bad thing near sk-upstream-secret"})
    err = error_of(await client.chat(), 400)
    assert err["message"] == "bad thing near ***"


async def test_unreachable_upstream_is_502(client: Client) -> None:
    err = error_of(await client.chat(model="dead"), 502)
    assert "sk-dead-secret" not in err["message"]


async def test_hung_upstream_is_504(client: Client, mock: MockOpenAI) -> None:
    b = mock.behave(model="mock-gpt-upstream", hang=True)
    err = error_of(await client.chat(), 504)
    assert err["code"] == "upstream_timeout"
    assert await asyncio.to_thread(b.wait_disconnected, 2.0)


async def test_stream_reset_midway_ends_with_error_event(client: Client, mock: MockOpenAI) -> None:
    mock.behave(model="mock-gpt-upstream", chunks=6, reset_after=2)
    async with client.stream("POST", "/v1/chat/completions",
                             json={"model": "gpt-mini", "stream": True, "messages": [{"role": "user", "content": "a b c d e f"}]}) as r:
        assert r.status_code == 200
        text = (await r.aread()).decode()
    assert "event: error" in text and "[DONE]" not in text
    # Bytes had reached the client: no retry, although router.retries allows two.
    assert len(mock.requests_to("/v1/chat/completions")) == 1


async def test_client_disconnect_cancels_upstream(gw: Any, mock: MockOpenAI) -> None:
    b = mock.behave(model="mock-gpt-upstream", hang=True)
    sent: list[Any] = []
    gone = asyncio.Event()
    body = orjson.dumps({"model": "gpt-mini", "messages": [{"role": "user", "content": "x"}]})
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Any:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(m: Any) -> None:
        sent.append(m)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
             "headers": [(b"authorization", f"Bearer {KEY_B}".encode())]}
    task = asyncio.create_task(gw(scope, receive, send))
    await asyncio.to_thread(mock.wait_for_requests, 1, 2.0)
    gone.set()
    await asyncio.wait_for(task, 2.0)
    assert sent == []
    assert await asyncio.to_thread(b.wait_disconnected, 2.0)


async def test_malformed_upstream_answer_is_502(client: Client, mock: MockOpenAI) -> None:
    # Two conflicting Content-Length headers: a framing error, never relayed.
    mock.behave(model="mock-gpt-upstream", headers=[("content-length", "5000")], body=b'{"partial": ')
    err = error_of(await client.chat(), 502)
    assert err["type"] == "upstream_error"


async def test_nearly_openai_error_is_completed(client: Client, mock: MockOpenAI) -> None:
    mock.behave(model="mock-gpt-upstream", status=400, body=b'{"error": {"message": "bad thing", "type": null}}')
    err = error_of(await client.chat(), 400)
    assert err == {"message": "bad thing", "type": "upstream_error", "param": None, "code": None}


async def test_retry_after_headers_are_relayed(client: Client, mock: MockOpenAI) -> None:
    mock.behave(model="mock-gpt-upstream", status=429, headers=[("retry-after-ms", "1500"), ("retry-after", "2")])
    r = await client.chat()
    assert r.status_code == 429 and r.headers["retry-after-ms"] == "1500" and r.headers["retry-after"] == "2"
