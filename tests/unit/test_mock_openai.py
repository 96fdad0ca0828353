"""The mock upstream, checked against the official `openai` SDK so it cannot drift into fiction.

Each response is also validated strictly (`Model.model_validate`) against the SDK's own
types: the SDK itself parses leniently and would accept a malformed mock.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai.types import Completion, CreateEmbeddingResponse, ImagesResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from tests.mock_openai import MockOpenAI, embedding_vector


@pytest.fixture(scope="module")
def server() -> Iterator[MockOpenAI]:
    with MockOpenAI() as mock:
        yield mock


@pytest.fixture
def mock(server: MockOpenAI) -> Iterator[MockOpenAI]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def client(mock: MockOpenAI) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=mock.base_url, api_key=mock.api_key, max_retries=0, timeout=10) as c:
        yield c


@pytest.fixture
def raw(mock: MockOpenAI) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {mock.api_key}"}
    with httpx.Client(base_url=mock.base_url, headers=headers, timeout=10) as c:
        yield c


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def sse_events(body: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, asserting OpenAI's framing on the way."""
    assert body.endswith(b"data: [DONE]\n\n")
    events = body.split(b"\n\n")
    assert events[-1] == b""
    out = []
    for event in events[:-1]:
        assert event.startswith(b"data: "), event
        assert b"\n" not in event
        out.append(event.removeprefix(b"data: "))
    return out


# -- endpoints ---------------------------------------------------------------------


def test_chat_completion_echoes_the_last_user_message(client: openai.OpenAI, mock: MockOpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="mock-gpt-upstream", messages=user("hi there")
    )
    completion = raw.parse()

    assert completion.choices[0].message.content == "echo: hi there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "mock-gpt-upstream"
    assert completion.object == "chat.completion"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 3)
    assert completion.usage.total_tokens == 7
    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["x-request-id"].startswith("req_")
    ChatCompletion.model_validate(json.loads(raw.content))
    assert mock.requests[0].json()["model"] == "mock-gpt-upstream"


def test_chat_completion_n_choices(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="m", messages=user("x"), n=3)
    assert [c.index for c in completion.choices] == [0, 1, 2]


def test_chat_stream_framing_on_the_wire(raw: httpx.Client) -> None:
    body = {"model": "mock-gpt-upstream", "messages": user("one two three"), "stream": True}
    with raw.stream("POST", "/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["transfer-encoding"] == "chunked"
        events = sse_events(response.read())

    chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: one two three"
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert len({c.id for c in chunks}) == 1
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_chat_stream_include_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="mock-gpt-upstream",
        messages=user("a b c d"),
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        chunks = list(stream)

    *content, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (6, 5, 11)
    assert all(c.usage is None for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content) == "echo: a b c d"


@pytest.mark.anyio
async def test_async_client_streams(mock: MockOpenAI) -> None:
    mock.behave(model="m", chunks=4)
    async with openai.AsyncOpenAI(base_url=mock.base_url, api_key=mock.api_key, max_retries=0) as client:
        stream = await client.chat.completions.create(model="m", messages=user("x"), stream=True)
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
    assert "".join(p or "" for p in pieces) == "chunk0 chunk1 chunk2 chunk3 "


def test_completions(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model="mock-instruct", prompt="say this")
    completion = raw.parse()
    assert completion.choices[0].text == "echo: say this"
    assert completion.object == "text_completion"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 2
    Completion.model_validate(json.loads(raw.content))


def test_completions_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="mock-instruct", prompt="p q", stream=True, stream_options={"include_usage": True}
    )
    with stream:
        chunks = list(stream)
    *content, last = chunks
    assert "".join(c.choices[0].text for c in content) == "echo: p q"
    assert content[-1].choices[0].finish_reason == "stop"
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == len(content)
    # The SDK types `finish_reason` as always set; on the wire it is null until the last chunk.
    for chunk in [content[-1], last]:
        Completion.model_validate(chunk.to_dict())


def test_embeddings_float_single_and_batch(client: openai.OpenAI, mock: MockOpenAI) -> None:
    single = client.embeddings.with_raw_response.create(
        model="mock-embed", input="hello", encoding_format="float"
    )
    CreateEmbeddingResponse.model_validate(json.loads(single.content))
    assert single.parse().data[0].embedding == embedding_vector("hello")

    batch = client.embeddings.create(model="mock-embed", input=["a b", "c", "d e f"], encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert [d.embedding for d in batch.data] == [embedding_vector(t) for t in ["a b", "c", "d e f"]]
    assert batch.usage.prompt_tokens == 6
    assert batch.model == "mock-embed"
    assert mock.requests[-1].json()["encoding_format"] == "float"


def test_embeddings_base64(client: openai.OpenAI, raw: httpx.Client, mock: MockOpenAI) -> None:
    explicit = client.embeddings.create(model="mock-embed", input=["x", "y"], encoding_format="base64")
    for item, text in zip(explicit.data, ["x", "y"], strict=True):
        assert isinstance(item.embedding, str)
        decoded = struct.unpack("<8f", base64.b64decode(item.embedding))
        assert list(decoded) == embedding_vector(text)

    # The SDK asks for base64 when no format is given, and decodes it itself.
    default = client.embeddings.create(model="mock-embed", input="x")
    assert mock.requests[-1].json()["encoding_format"] == "base64"
    assert default.data[0].embedding == embedding_vector("x")

    # The SDK types `embedding` as floats only; on the wire a base64 answer carries a string.
    wire = raw.post("/embeddings", json={"model": "e", "input": "x", "encoding_format": "base64"}).json()
    assert isinstance(wire["data"][0]["embedding"], str)
    wire["data"][0]["embedding"] = embedding_vector("x")
    CreateEmbeddingResponse.model_validate(wire)


def test_embeddings_of_token_arrays(client: openai.OpenAI) -> None:
    one = client.embeddings.create(model="e", input=[1, 2, 3], encoding_format="float")
    assert len(one.data) == 1
    assert one.usage.prompt_tokens == 3
    many = client.embeddings.create(model="e", input=[[1, 2], [3]], encoding_format="float")
    assert len(many.data) == 2


def test_embeddings_dimensions(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="e", input="x", dimensions=40, encoding_format="float")
    assert len(result.data[0].embedding) == 40


def test_images(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(model="mock-image", prompt="a cat", n=2)
    urls = raw.parse()
    ImagesResponse.model_validate(json.loads(raw.content))
    assert urls.data is not None
    assert len(urls.data) == 2
    assert all(i.url and i.url.startswith("https://") for i in urls.data)

    b64 = client.images.generate(model="mock-image", prompt="a cat", response_format="b64_json")
    assert b64.data is not None
    assert b64.data[0].b64_json is not None
    assert base64.b64decode(b64.data[0].b64_json).startswith(b"\x89PNG")


def test_models_list_and_retrieve(client: openai.OpenAI, raw: httpx.Client) -> None:
    ids = [m.id for m in client.models.list()]
    assert "mock-gpt-upstream" in ids
    model = client.models.retrieve("mock-embed")
    assert (model.id, model.object) == ("mock-embed", "model")
    Model.model_validate(raw.get("/models/mock-embed").json())
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("nope")
    assert exc.value.code == "model_not_found"


# -- authentication and errors -------------------------------------------------------


def assert_error_shape(err: openai.APIStatusError) -> dict[str, object]:
    body = err.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str)
    error: dict[str, object] = body["error"]
    assert err.body == error
    return error


def test_missing_key_is_401(mock: MockOpenAI) -> None:
    client = openai.OpenAI(base_url=mock.base_url, api_key="unused", max_retries=0)
    with client as c, pytest.raises(openai.AuthenticationError) as exc:
        c.models.list(extra_headers={"Authorization": openai.Omit()})
    assert mock.requests[0].header("authorization") is None
    error = assert_error_shape(exc.value)
    assert "didn't provide an API key" in str(error["message"])


def test_wrong_key_is_401(mock: MockOpenAI) -> None:
    client = openai.OpenAI(base_url=mock.base_url, api_key="sk-wrong", max_retries=0)
    with client as c, pytest.raises(openai.AuthenticationError) as exc:
        c.chat.completions.create(model="m", messages=user("x"))
    assert exc.value.status_code == 401
    assert assert_error_shape(exc.value)["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("status", "exc_type"),
    [
        (400, openai.BadRequestError),
        (403, openai.PermissionDeniedError),
        (404, openai.NotFoundError),
        (409, openai.ConflictError),
        (422, openai.UnprocessableEntityError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
def test_behave_status_raises_the_sdk_class(
    client: openai.OpenAI, mock: MockOpenAI, status: int, exc_type: type[openai.APIStatusError]
) -> None:
    rule = mock.behave(model="m", status=status, error={"message": f"boom {status}", "param": "messages"})
    with pytest.raises(exc_type) as exc:
        client.chat.completions.create(model="m", messages=user("x"))
    assert exc.value.status_code == status
    error = assert_error_shape(exc.value)
    assert (error["message"], error["param"]) == (f"boom {status}", "messages")
    assert rule.hits == 1
    if status == 429:
        assert exc.value.response.headers["retry-after"] == "1"


def test_in_stream_error_event_raises(client: openai.OpenAI, mock: MockOpenAI) -> None:
    mock.behave(model="m", chunks=5, error_after=2, error={"message": "overloaded mid-stream"})
    stream = client.chat.completions.create(model="m", messages=user("x"), stream=True)
    seen = []
    with stream, pytest.raises(openai.APIError) as exc:
        for chunk in stream:
            seen.append(chunk)
    assert type(exc.value) is openai.APIError
    assert exc.value.message == "overloaded mid-stream"
    assert len(seen) == 3  # the role chunk and two content chunks


def test_unknown_path_is_404(raw: httpx.Client) -> None:
    response = raw.post("/nope", json={})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Invalid URL (POST /v1/nope)"


def test_mangled_body_is_400(raw: httpx.Client) -> None:
    bad_json = raw.post("/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    assert "could not parse the JSON body" in bad_json.json()["error"]["message"]
    no_messages = raw.post("/chat/completions", json={"model": "m"})
    assert no_messages.status_code == 400
    assert no_messages.json()["error"]["param"] == "messages"
    no_model = raw.post("/chat/completions", json={"messages": []})
    assert no_model.status_code == 400


# -- behaviours ----------------------------------------------------------------------


def test_rules_match_model_path_and_times(client: openai.OpenAI, mock: MockOpenAI) -> None:
    once = mock.behave(model="a", status=500, times=1)
    embeddings = mock.behave(path="/v1/embeddings", status=429)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="a", messages=user("x"))
    assert client.chat.completions.create(model="a", messages=user("x")).choices  # rule used up
    assert client.chat.completions.create(model="b", messages=user("x")).choices
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model="a", input="x")
    assert (once.hits, embeddings.hits) == (1, 1)
    assert [r.path for r in once.requests] == ["/v1/chat/completions"]


def test_raw_body_override(raw: httpx.Client, mock: MockOpenAI) -> None:
    mock.behave(path="/v1/models", body=b'{"object": "list", "data": []}', headers=[("x-extra", "1")])
    response = raw.get("/models")
    assert response.json() == {"object": "list", "data": []}
    assert response.headers["x-extra"] == "1"


def test_delay_head(client: openai.OpenAI, mock: MockOpenAI) -> None:
    rule = mock.behave(model="slow", delay_head=0.5)
    started = time.monotonic()
    client.chat.completions.create(model="slow", messages=user("x"))
    assert time.monotonic() - started >= 0.45  # asyncio may wake a timer a hair early
    assert rule.completed.wait(2.0)  # set by the mock thread just after the answer is written
    assert not rule.disconnected.is_set()


def test_hang_until_the_client_gives_up(mock: MockOpenAI) -> None:
    rule = mock.behave(model="stuck", hang=True)
    client = openai.OpenAI(base_url=mock.base_url, api_key=mock.api_key, max_retries=0, timeout=0.5)
    with client as c, pytest.raises(openai.APITimeoutError):
        c.chat.completions.create(model="stuck", messages=user("x"))
    assert rule.wait_disconnected(1.0)
    assert not rule.completed.is_set()


def test_stream_chunks_with_delay(client: openai.OpenAI, mock: MockOpenAI) -> None:
    mock.behave(model="m", chunks=5, chunk_delay=0.1)
    arrivals = []
    started = time.monotonic()
    with client.chat.completions.create(model="m", messages=user("x"), stream=True) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append((time.monotonic() - started, chunk.choices[0].delta.content))
    assert [text for _, text in arrivals] == [f"chunk{i} " for i in range(5)]
    assert arrivals[-1][0] - arrivals[0][0] >= 0.35  # the chunks really were spread out


def test_reset_mid_stream(client: openai.OpenAI, mock: MockOpenAI) -> None:
    mock.behave(model="m", chunks=5, reset_after=2)
    pieces = []
    stream = client.chat.completions.create(model="m", messages=user("x"), stream=True)
    with stream, pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    assert pieces == ["chunk0 ", "chunk1 "]


def test_client_disconnect_mid_stream_is_seen(client: openai.OpenAI, mock: MockOpenAI) -> None:
    rule = mock.behave(model="m", chunks=50, chunk_delay=0.1)
    stream = client.chat.completions.create(model="m", messages=user("x"), stream=True)
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    assert not rule.disconnected.is_set()
    stream.close()
    assert rule.wait_disconnected(1.0)
    assert not rule.completed.is_set()


# -- recording -----------------------------------------------------------------------


def test_records_method_path_query_headers_and_raw_body(client: openai.OpenAI, mock: MockOpenAI) -> None:
    client.chat.completions.create(
        model="m",
        messages=user("x"),
        extra_headers={"X-Custom": "one"},
        extra_query={"api-version": "2024-01-01"},
    )
    (request,) = mock.requests
    assert (request.method, request.path, request.query) == (
        "POST",
        "/v1/chat/completions",
        "api-version=2024-01-01",
    )
    assert request.header("x-custom") == "one"
    assert (b"Host", f"{mock.host}:{mock.port}".encode()) in request.raw_headers  # names as sent
    assert request.header("authorization") == f"Bearer {mock.api_key}"
    assert request.header("content-length") == str(len(request.body))
    assert request.json() == {"model": "m", "messages": user("x")}
    assert request.http_version == "1.1"


def test_records_repeated_headers_and_chunked_bodies(raw: httpx.Client, mock: MockOpenAI) -> None:
    payload = json.dumps({"model": "m", "messages": user("chunked")}).encode()

    def body() -> Iterator[bytes]:
        yield payload[:10]
        yield payload[10:]

    headers = [("x-dup", "1"), ("x-dup", "2"), ("content-type", "application/json")]
    response = raw.post("/chat/completions", content=body(), headers=headers)
    assert response.json()["choices"][0]["message"]["content"] == "echo: chunked"
    (request,) = mock.requests
    assert request.header_values("x-dup") == ["1", "2"]
    assert request.header("transfer-encoding") == "chunked"
    assert request.body == payload


def test_keep_alive_serves_many_requests_on_one_connection(raw: httpx.Client, mock: MockOpenAI) -> None:
    before = mock.connections
    for _ in range(3):
        assert raw.get("/models").status_code == 200
    assert mock.connections - before == 1


def test_bad_framing_is_recorded_and_refused(mock: MockOpenAI) -> None:
    with socket.create_connection((mock.host, mock.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert mock.protocol_errors
    assert mock.requests == []


def test_wait_for_requests(raw: httpx.Client, mock: MockOpenAI) -> None:
    assert mock.wait_for_requests(1, timeout=0.1) == []
    raw.get("/models")
    assert len(mock.wait_for_requests(1, timeout=1)) == 1
    assert [r.path for r in mock.requests_to("/v1/models")] == ["/v1/models"]
