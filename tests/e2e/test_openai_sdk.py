"""The official `openai` SDK against a real gateway process in front of the mock upstream.

Happy paths run on both stores (memory, and a real redis-server); error paths on the
memory store. Each test sends its own unique prompt, so no answer can come from a
cache filled by another test.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.mock_openai import MockOpenAI, embedding_vector

from .conftest import (
    ADMIN_KEY,
    FIRST_BYTE_S,
    SECRETS,
    TEAM_A_KEY,
    TEAM_A_MODELS,
    TEAM_B_KEY,
    TEAM_B_MODELS,
    UPSTREAM_KEY,
    GatewayFactory,
    GatewayProcess,
    default_config,
)

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
UPSTREAM_CHAT_MODEL = "mock-gpt-upstream"


def unique(text: str = "hello") -> str:
    return f"{text} {uuid.uuid4().hex}"


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def assert_no_secrets(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def assert_openai_error(err: openai.APIStatusError, status: int) -> dict[str, object]:
    """Status, OpenAI's error shape, JSON, a request id, and nothing that should stay inside."""
    response = err.response
    assert err.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-request-id")
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, object] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert err.body == error
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
    assert_no_secrets(response.text)
    assert_no_secrets(str(response.headers))
    return error


def content_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- happy paths, on both stores ----------------------------------------------------------


def test_chat_completion(store_gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    prompt = unique("what is up")
    with store_gateway.client() as client:
        completion = client.chat.completions.create(model="gpt-mini", messages=user(prompt), temperature=0.2)

    assert completion.choices[0].message.content == f"echo: {prompt}"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model in ("gpt-mini", UPSTREAM_CHAT_MODEL)
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 5)
    assert completion.usage.total_tokens == 9
    (seen,) = mock_upstream.requests
    assert (seen.method, seen.path) == ("POST", CHAT)
    assert seen.json() == {"model": UPSTREAM_CHAT_MODEL, "messages": user(prompt), "temperature": 0.2}


def test_chat_stream_with_usage(store_gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    mock_upstream.behave(model=UPSTREAM_CHAT_MODEL, chunks=6, chunk_delay=0.02)
    with store_gateway.client() as client:
        stream = client.chat.completions.create(
            model="gpt-mini",
            messages=user(unique()),
            stream=True,
            stream_options={"include_usage": True},
        )
        with stream:
            chunks = list(stream)

    *body, last = chunks
    assert body[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in body if c.choices and c.choices[0].delta.content]
    assert pieces == [f"chunk{i} " for i in range(6)]
    assert body[-1].choices[0].finish_reason == "stop"
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.completion_tokens, last.usage.prompt_tokens, last.usage.total_tokens) == (6, 2, 8)
    assert mock_upstream.requests[0].json()["stream_options"] == {"include_usage": True}


def usage_report(gateway: GatewayProcess, key_id: str) -> dict[str, Any]:
    """The key's usage per model, once the gateway has stored some (it writes once a second)."""
    deadline = time.monotonic() + 10
    with gateway.http(ADMIN_KEY) as admin:
        while True:
            report: dict[str, Any] = admin.get("/admin/usage", params={"key": key_id}).json()["models"]
            if report or time.monotonic() > deadline:
                return report
            time.sleep(0.1)


def test_chat_stream_without_usage_hides_it_and_counts_it(
    store_gateway: GatewayProcess, mock_upstream: MockOpenAI
) -> None:
    prompt = unique("stream me")
    with store_gateway.http(ADMIN_KEY) as admin:
        made = admin.post("/admin/keys", json={"name": "svc-stream-usage", "models": ["gpt-*"]}).json()
    with (
        store_gateway.client(made["secret"]) as client,
        client.chat.completions.create(model="gpt-mini", messages=user(prompt), stream=True) as stream,
    ):
        chunks = list(stream)
    assert content_of(chunks) == f"echo: {prompt}"
    assert all(c.choices for c in chunks)  # the usage event the gateway asked for is not relayed
    assert all(c.usage is None for c in chunks)
    assert mock_upstream.requests[0].json()["stream_options"] == {"include_usage": True}

    # The mock counts words: 3 in the prompt, 4 in its "echo: " answer. Usage is stored once a second.
    usage = usage_report(store_gateway, made["id"])["gpt-mini"]
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (1, 3, 4)


def test_completions(store_gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    prompt = unique("complete this")
    with store_gateway.client() as client:
        completion = client.completions.create(model="instruct", prompt=prompt, max_tokens=5)
        stream = client.completions.create(
            model="instruct", prompt=prompt + " again", stream=True, stream_options={"include_usage": True}
        )
        with stream:
            chunks = list(stream)

    assert completion.choices[0].text == f"echo: {prompt}"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3
    *pieces, last = chunks
    assert "".join(c.choices[0].text for c in pieces) == f"echo: {prompt} again"
    assert last.usage is not None
    assert last.usage.completion_tokens == len(pieces)
    assert [r.json()["model"] for r in mock_upstream.requests] == ["mock-instruct", "mock-instruct"]
    assert mock_upstream.requests[0].json()["max_tokens"] == 5


def test_embeddings_single_and_batch(store_gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    texts = [unique("one"), unique("two three"), unique("four")]
    with store_gateway.client() as client:
        single = client.embeddings.create(model="emb", input=texts[0], encoding_format="float")
        batch = client.embeddings.create(model="emb", input=texts, encoding_format="float")

    assert single.data[0].embedding == embedding_vector(texts[0])
    assert single.usage.prompt_tokens == 2
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert [d.embedding for d in batch.data] == [embedding_vector(t) for t in texts]
    assert batch.usage.prompt_tokens == 7
    assert [r.json()["model"] for r in mock_upstream.requests] == ["mock-embed", "mock-embed"]
    assert mock_upstream.requests[1].json()["input"] == texts


def test_embeddings_base64(store_gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    texts = [unique("x"), unique("y")]
    with store_gateway.client() as client:
        explicit = client.embeddings.create(model="emb", input=texts, encoding_format="base64")
        # Without a format the SDK asks for base64 and decodes it itself.
        default = client.embeddings.create(model="emb", input=texts[0])

    for item, text in zip(explicit.data, texts, strict=True):
        assert isinstance(item.embedding, str)
        assert list(struct.unpack("<8f", base64.b64decode(item.embedding))) == embedding_vector(text)
    assert default.data[0].embedding == embedding_vector(texts[0])
    assert [r.json()["encoding_format"] for r in mock_upstream.requests] == ["base64", "base64"]


def test_images(store_gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    prompt = unique("a lighthouse")
    with store_gateway.client() as client:
        urls = client.images.generate(model="img", prompt=prompt, n=2, size="1024x1024")
        b64 = client.images.generate(model="img", prompt=prompt, response_format="b64_json")

    assert urls.data is not None
    assert len(urls.data) == 2
    assert all(i.url and i.url.startswith("https://images.mock.invalid/") for i in urls.data)
    assert b64.data is not None
    assert b64.data[0].b64_json is not None
    assert base64.b64decode(b64.data[0].b64_json).startswith(b"\x89PNG")
    first = mock_upstream.requests[0].json()
    assert (first["model"], first["prompt"], first["n"], first["size"]) == (
        "mock-image",
        prompt,
        2,
        "1024x1024",
    )


def test_models_list_shows_only_the_keys_aliases(
    store_gateway: GatewayProcess, mock_upstream: MockOpenAI
) -> None:
    with store_gateway.client(TEAM_A_KEY) as a, store_gateway.client(TEAM_B_KEY) as b:
        a_models = list(a.models.list())
        b_ids = {m.id for m in b.models.list()}
    assert {m.id for m in a_models} == TEAM_A_MODELS
    assert len(a_models) == len(TEAM_A_MODELS)
    assert all(m.object == "model" for m in a_models)
    assert b_ids == TEAM_B_MODELS
    assert mock_upstream.requests == []  # answered from config, not the upstream's list


def test_models_retrieve(store_gateway: GatewayProcess) -> None:
    with store_gateway.client() as client:
        model = client.models.retrieve("gpt-mini")
        assert (model.id, model.object) == ("gpt-mini", "model")
        with pytest.raises(openai.NotFoundError) as hidden:
            client.models.retrieve("gpt-secret")  # exists, but not for team-a
        with pytest.raises(openai.NotFoundError) as unknown:
            client.models.retrieve("no-such-model")
    assert_openai_error(hidden.value, 404)
    assert_openai_error(unknown.value, 404)


@pytest.mark.anyio
async def test_async_client(store_gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    prompt = unique("async")
    mock_upstream.behave(model=UPSTREAM_CHAT_MODEL, chunks=4)
    async with store_gateway.async_client() as client:
        stream = await client.chat.completions.create(
            model="gpt-mini", messages=user(prompt), stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        embedding = await client.embeddings.create(model="emb", input=prompt, encoding_format="float")
        models = [m.id async for m in client.models.list()]
    assert content_of(chunks) == "chunk0 chunk1 chunk2 chunk3 "
    assert chunks[-1].usage is not None
    assert embedding.data[0].embedding == embedding_vector(prompt)
    assert set(models) == TEAM_A_MODELS


# -- response headers --------------------------------------------------------------------


def test_every_response_carries_one_request_id(gateway: GatewayProcess) -> None:
    with gateway.client() as client:
        ids = [
            client.chat.completions.with_raw_response.create(
                model="gpt-mini", messages=user(unique())
            ).headers.get_list("x-request-id"),
            client.embeddings.with_raw_response.create(model="emb", input=unique()).headers.get_list(
                "x-request-id"
            ),
            client.models.with_raw_response.list().headers.get_list("x-request-id"),
            client.models.with_raw_response.retrieve("gpt-mini").headers.get_list("x-request-id"),
        ]
        with client.chat.completions.with_streaming_response.create(
            model="gpt-mini", messages=user(unique()), stream=True
        ) as streamed:
            stream_headers = streamed.headers
            list(streamed.iter_lines())
    with gateway.http() as http, gateway.http(api_key=None) as anonymous:
        errors = [
            http.post(CHAT, json={"model": "no-such-model", "messages": user("x")}),
            http.post(CHAT, json={"model": "gpt-secret", "messages": user("x")}),
            anonymous.post(CHAT, json={"model": "gpt-mini", "messages": user("x")}),
        ]
    ids += [stream_headers.get_list("x-request-id")]
    ids += [r.headers.get_list("x-request-id") for r in errors]
    for values in ids:
        assert len(values) == 1, values
        assert values[0]
        assert not values[0].startswith("req_mock")  # the gateway's own id, not the upstream's
    flat = [v[0] for v in ids]
    assert len(set(flat)) == len(flat)


def test_client_request_id_is_echoed(gateway: GatewayProcess) -> None:
    request_id = f"client-{uuid.uuid4().hex}"
    with gateway.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-mini", messages=user(unique()), extra_headers={"x-request-id": request_id}
        )
    assert raw.headers.get_list("x-request-id") == [request_id]


@pytest.mark.parametrize(
    "bad_id",
    [
        pytest.param("a" * 300, id="300-chars"),
        pytest.param("has spaces in it", id="spaces"),
        pytest.param('quote"and<angle>', id="punctuation"),
    ],
)
def test_malformed_request_id_is_replaced(gateway: GatewayProcess, bad_id: str) -> None:
    with gateway.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-mini", messages=user(unique()), extra_headers={"x-request-id": bad_id}
        )
    (replaced,) = raw.headers.get_list("x-request-id")
    assert replaced != bad_id
    assert 0 < len(replaced) <= 128
    assert replaced.isascii()
    assert replaced.isprintable()
    assert " " not in replaced


def test_overhead_header(gateway: GatewayProcess) -> None:
    with gateway.client() as client:
        raw = client.chat.completions.with_raw_response.create(model="gpt-mini", messages=user(unique()))
    (overhead,) = raw.headers.get_list("x-gateway-overhead-ms")
    assert float(overhead) >= 0


# -- what reaches the upstream -------------------------------------------------------------


def test_upstream_sees_the_provider_key_only(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    with gateway.client(default_headers={"x-api-key": TEAM_A_KEY}) as client:
        client.chat.completions.create(model="gpt-mini", messages=user(unique()))
    (seen,) = mock_upstream.requests
    assert seen.header_values("authorization") == [f"Bearer {UPSTREAM_KEY}"]
    assert seen.header("x-api-key") is None
    for _, value in seen.headers:
        assert TEAM_A_KEY not in value
    assert TEAM_A_KEY.encode() not in seen.body


def test_x_api_key_authenticates_and_is_not_forwarded(
    gateway: GatewayProcess, mock_upstream: MockOpenAI
) -> None:
    with gateway.http(api_key=None) as http:
        response = http.post(
            CHAT, json={"model": "gpt-mini", "messages": user(unique())}, headers={"x-api-key": TEAM_A_KEY}
        )
    assert response.status_code == 200, response.text
    (seen,) = mock_upstream.requests
    assert seen.header("x-api-key") is None
    assert seen.header_values("authorization") == [f"Bearer {UPSTREAM_KEY}"]


def test_hop_by_hop_headers_are_not_forwarded(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    hop_by_hop = {
        "Connection": "keep-alive, X-Hop-Custom",
        "Keep-Alive": "timeout=5, max=100",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "X-Hop-Custom": "named-by-connection",  # hop-by-hop because Connection lists it (RFC 9110 7.6.1)
    }
    with gateway.http() as http:
        response = http.post(CHAT, json={"model": "gpt-mini", "messages": user(unique())}, headers=hop_by_hop)
    assert response.status_code == 200, response.text
    (seen,) = mock_upstream.requests
    for name in ("keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "x-hop-custom"):
        assert seen.header(name) is None, (name, seen.headers)
    # The gateway's own connection management is its business; the client's tokens are not.
    for value in seen.header_values("connection"):
        assert value.lower() in ("keep-alive", "close"), value


def test_chunked_client_body_is_not_forwarded_chunked(
    gateway: GatewayProcess, mock_upstream: MockOpenAI
) -> None:
    prompt = unique("chunked")
    payload = httpx.Request("POST", "http://x", json={"model": "gpt-mini", "messages": user(prompt)}).content

    def pieces() -> Iterator[bytes]:
        yield payload[:7]
        yield payload[7:]

    with gateway.http() as http:
        response = http.post(CHAT, content=pieces(), headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == f"echo: {prompt}"
    (seen,) = mock_upstream.requests
    assert seen.header("transfer-encoding") is None
    assert seen.header("content-length") == str(len(seen.body))


@pytest.fixture
def canary() -> Iterator[socket.socket]:
    """A listening socket no request may ever reach."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.settimeout(0.3)
        yield sock


def assert_untouched(canary: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        conn, _ = canary.accept()
        conn.close()


def test_client_cannot_choose_the_upstream(
    gateway: GatewayProcess, mock_upstream: MockOpenAI, canary: socket.socket
) -> None:
    evil = f"127.0.0.1:{canary.getsockname()[1]}"
    tricks = {
        "Host": evil,
        "X-Forwarded-Host": evil,
        "X-Forwarded-Proto": "https",
        "X-Original-URL": f"http://{evil}/v1/chat/completions",
        "Forwarded": f"host={evil}",
    }
    with gateway.http() as http:
        by_header = http.post(
            CHAT,
            json={"model": "gpt-mini", "messages": user(unique()), "base_url": f"http://{evil}/v1"},
            headers=tricks,
        )
        by_model = http.post(CHAT, json={"model": f"http://{evil}/v1", "messages": user("x")})
    assert by_header.status_code == 200, by_header.text
    assert by_model.status_code == 404
    (seen,) = mock_upstream.requests
    assert seen.header("host") == f"{mock_upstream.host}:{mock_upstream.port}"
    assert seen.path == CHAT
    assert_untouched(canary)


def test_absolute_uri_request_target_changes_nothing(
    gateway: GatewayProcess, mock_upstream: MockOpenAI, canary: socket.socket
) -> None:
    evil = f"127.0.0.1:{canary.getsockname()[1]}"
    body = httpx.Request("POST", "http://x", json={"model": "gpt-mini", "messages": user(unique())}).content
    head = (
        f"POST http://{evil}/v1/chat/completions HTTP/1.1\r\n"
        f"Host: {evil}\r\n"
        f"Authorization: Bearer {TEAM_A_KEY}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(head + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    assert status in (200, 400, 404), reply[:500]
    for seen in mock_upstream.requests:
        assert seen.header("host") == f"{mock_upstream.host}:{mock_upstream.port}"
        assert seen.path == CHAT
    assert_untouched(canary)


# -- errors through the SDK ---------------------------------------------------------------


def test_missing_key_is_401(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    with gateway.client() as client, pytest.raises(openai.AuthenticationError) as exc:
        client.chat.completions.create(
            model="gpt-mini", messages=user("x"), extra_headers={"Authorization": openai.Omit()}
        )
    assert_openai_error(exc.value, 401)
    assert mock_upstream.requests == []


def test_wrong_key_is_401(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    wrong = "sk-team-a-e2e-wrong-0000000000000"
    with gateway.client(wrong) as client, pytest.raises(openai.AuthenticationError) as exc:
        client.chat.completions.create(model="gpt-mini", messages=user("x"))
    assert_openai_error(exc.value, 401)
    assert wrong not in exc.value.response.text
    assert mock_upstream.requests == []


def test_model_not_allowed_is_403(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    with gateway.client(TEAM_A_KEY) as client, pytest.raises(openai.PermissionDeniedError) as exc:
        client.chat.completions.create(model="gpt-secret", messages=user("x"))
    assert_openai_error(exc.value, 403)
    assert mock_upstream.requests == []


def test_unknown_model_is_404(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    with gateway.client() as client, pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=user("x"))
    error = assert_openai_error(exc.value, 404)
    assert error["param"] == "model"
    assert mock_upstream.requests == []


def test_upstream_400_passes_through(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    marker = f"Invalid 'messages[0].content': string too long ({uuid.uuid4().hex})"
    mock_upstream.behave(
        model=UPSTREAM_CHAT_MODEL,
        status=400,
        error={"message": marker, "param": "messages[0].content", "code": "string_above_max_length"},
    )
    with gateway.client() as client, pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="gpt-mini", messages=user(unique()))
    error = assert_openai_error(exc.value, 400)
    assert error["message"] == marker
    assert (error["param"], error["code"]) == ("messages[0].content", "string_above_max_length")


def test_upstream_429_is_429_with_retry_after(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    mock_upstream.behave(model=UPSTREAM_CHAT_MODEL, status=429)
    with gateway.client() as client, pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="gpt-mini", messages=user(unique()))
    assert_openai_error(exc.value, 429)
    assert exc.value.response.headers.get("retry-after")


def test_upstream_429_before_a_stream_starts(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    mock_upstream.behave(model=UPSTREAM_CHAT_MODEL, status=429)
    with gateway.client() as client, pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="gpt-mini", messages=user(unique()), stream=True)
    assert_openai_error(exc.value, 429)


def test_upstream_500_passes_through(gateway: GatewayProcess, mock_upstream: MockOpenAI) -> None:
    # The gateway passes upstream error statuses through unchanged.
    mock_upstream.behave(model=UPSTREAM_CHAT_MODEL, status=500)
    with gateway.client() as client, pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="gpt-mini", messages=user(unique()))
    assert_openai_error(exc.value, 500)


def test_upstream_connection_refused_is_502(gateway: GatewayProcess) -> None:
    started = time.monotonic()
    with gateway.client() as client, pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="gpt-dead", messages=user(unique()))
    assert_openai_error(exc.value, 502)
    assert time.monotonic() - started < 5


def test_upstream_hang_is_504_within_first_byte_timeout(
    gateway: GatewayProcess, mock_upstream: MockOpenAI
) -> None:
    rule = mock_upstream.behave(model=UPSTREAM_CHAT_MODEL, hang=True)
    started = time.monotonic()
    with gateway.client(timeout=FIRST_BYTE_S + 10) as client, pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="gpt-mini", messages=user(unique()))
    elapsed = time.monotonic() - started
    assert_openai_error(exc.value, 504)
    assert FIRST_BYTE_S - 0.2 <= elapsed < FIRST_BYTE_S + 1, elapsed
    # Having given up, the gateway must not leave the upstream call running.
    assert rule.wait_disconnected(1.0)


def test_client_disconnect_mid_stream_closes_the_upstream(
    gateway: GatewayProcess, mock_upstream: MockOpenAI
) -> None:
    rule = mock_upstream.behave(model=UPSTREAM_CHAT_MODEL, chunks=100, chunk_delay=0.1)
    with gateway.client() as client:
        stream = client.chat.completions.create(model="gpt-mini", messages=user(unique()), stream=True)
        received = [chunk for _, chunk in zip(range(3), stream, strict=False)]
        assert len(received) == 3
        assert not rule.disconnected.is_set()
        stream.close()
    assert rule.wait_disconnected(1.0)
    assert not rule.completed.is_set()


def test_upstream_reset_mid_stream_ends_with_an_error_event(
    gateway: GatewayProcess, mock_upstream: MockOpenAI
) -> None:
    mock_upstream.behave(model=UPSTREAM_CHAT_MODEL, chunks=6, reset_after=2)
    pieces = []
    with gateway.client() as client:
        stream = client.chat.completions.create(model="gpt-mini", messages=user(unique()), stream=True)
        with stream, pytest.raises(openai.APIError) as exc:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
    assert pieces == ["chunk0 ", "chunk1 "]
    # An SSE error event the SDK raises, not a torn connection.
    assert type(exc.value) is openai.APIError, repr(exc.value)
    assert isinstance(exc.value.body, dict)
    assert exc.value.body.get("message")
    assert_no_secrets(str(exc.value.body))


def test_upstream_error_event_mid_stream_reaches_the_client(
    gateway: GatewayProcess, mock_upstream: MockOpenAI
) -> None:
    mock_upstream.behave(
        model=UPSTREAM_CHAT_MODEL, chunks=4, error_after=2, error={"message": "upstream fell over"}
    )
    with gateway.client() as client:
        stream = client.chat.completions.create(model="gpt-mini", messages=user(unique()), stream=True)
        with stream, pytest.raises(openai.APIError) as exc:
            list(stream)
    assert exc.value.message == "upstream fell over"


# -- logs ------------------------------------------------------------------------------------


def test_no_secret_in_the_log(gateway_factory: GatewayFactory, mock_upstream: MockOpenAI) -> None:
    wrong = "sk-team-a-e2e-wrong-key-1111111111"
    probe = f"log-probe-{uuid.uuid4().hex}"
    gateway = gateway_factory(default_config(mock_upstream), env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})
    mock_upstream.behave(model=UPSTREAM_CHAT_MODEL, status=500, times=3)
    with gateway.client() as a, gateway.client(wrong) as bad, gateway.http(api_key=None) as anonymous:
        with pytest.raises(openai.InternalServerError):
            a.chat.completions.create(model="gpt-mini", messages=user(unique()))
        mock_upstream.reset()
        a.chat.completions.create(
            model="gpt-mini", messages=user(unique()), extra_headers={"x-request-id": probe}
        )
        with a.chat.completions.create(model="gpt-mini", messages=user(unique()), stream=True) as stream:
            list(stream)
        a.embeddings.create(model="emb", input=unique())
        list(a.models.list())
        calls: list[Callable[[], object]] = [
            lambda: bad.chat.completions.create(model="gpt-mini", messages=user("x")),
            lambda: a.chat.completions.create(model="gpt-secret", messages=user("x")),
            lambda: a.chat.completions.create(model="no-such-model", messages=user("x")),
            lambda: a.chat.completions.create(model="gpt-dead", messages=user("x")),
        ]
        for call in calls:
            with pytest.raises(openai.APIStatusError):
                call()
        anonymous.post(CHAT, json={"model": "gpt-mini", "messages": user("x")}, headers={"x-api-key": wrong})
        anonymous.post(CHAT, content=b"{not json", headers={"Authorization": f"Bearer {TEAM_B_KEY}"})
    gateway.stop()
    log = gateway.log_text()
    assert_no_secrets(log)
    assert wrong not in log
    # Not vacuous: the log does record requests (the access log names each request's id).
    assert probe in log, "no access log line carries the request id"


def test_a_client_leaving_right_after_done_is_counted_with_the_usage_it_got(
    gateway: GatewayProcess, mock_upstream: MockOpenAI
) -> None:
    # The upstream ends its stream 2 s after `[DONE]`; the client hangs up as soon as it reads it.
    mock_upstream.behave(end_delay=2.0)
    with gateway.http(ADMIN_KEY) as admin:
        made = admin.post("/admin/keys", json={"name": "svc-leaves-early", "models": ["gpt-*"]}).json()
    body = json.dumps({"model": "gpt-mini", "stream": True, "messages": user(unique("leave early"))}).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer {made['secret']}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"data: [DONE]" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    usage = usage_report(gateway, made["id"])["gpt-mini"]
    # The mock counts words: 3 in the prompt, 4 in its "echo: " answer; not a stream cut short.
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (1, 3, 4)
