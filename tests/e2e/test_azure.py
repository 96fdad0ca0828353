"""The plain `openai` SDK against a real gateway process whose aliases live on Azure OpenAI (the mock).

Clients never learn they are talking to Azure: requests go out on deployment URLs
with the api-version and the `api-key` header, Azure's extra stream events are
dropped, and its error answers come back in OpenAI's shape.
"""

from __future__ import annotations

import base64
import json
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam, ChatCompletionToolParam

from tests.mock_azure import CONTENT_FILTER_MESSAGE, DEPLOYMENTS, MockAzure
from tests.mock_openai import embedding_vector

from .conftest import TEAM_A_KEY, GatewayFactory, GatewayProcess

pytestmark = pytest.mark.e2e

AZURE_KEY = "azure-e2e-key-7c41d2a9b0e35f68a1"
WRONG_AZURE_KEY = "azure-e2e-revoked-key-5e0d9f1a27"
SECRETS = (TEAM_A_KEY, AZURE_KEY, WRONG_AZURE_KEY)
CHAT_MODEL = DEPLOYMENTS["chat-dep"].model
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def azure_config(mock: MockAzure) -> dict[str, Any]:
    def provider(**fields: Any) -> dict[str, Any]:
        return {"type": "azure_openai", "base_url": mock.url, "api_key": AZURE_KEY, **fields}

    aliases = {
        "az-chat": ("azure", "chat-dep"),
        "az-async": ("azure", "chat-async"),
        "az-instruct": ("azure", "instruct-dep"),
        "az-embed": ("azure", "embed-dep"),
        "az-image": ("azure", "image-dep"),
        "az-retired": ("azure", "retired-dep"),  # no such deployment on the resource
        "az-badkey": ("azure-badkey", "chat-dep"),
        "az-old": ("azure-old", "chat-dep"),
        "az-data": ("azure-data", "chat-dep"),
    }
    return {
        "store": {"url": "memory://"},
        "auth": {"keys": [{"name": "team-a", "key": TEAM_A_KEY, "models": ["az-*"]}]},
        "providers": {
            "azure": provider(),
            "azure-badkey": provider(api_key=WRONG_AZURE_KEY),
            "azure-old": provider(api_version="2023-01-01"),  # well-formed, but the resource refuses it
            "azure-data": provider(allow_data_sources=True),
        },
        "models": [
            {"name": name, "deployments": [{"provider": p, "model": m}]} for name, (p, m) in aliases.items()
        ],
        # Error mapping is checked one upstream answer at a time: no retries, and a breaker
        # that never opens (tests/e2e/test_replicas_breaker.py and the integration tests
        # cover failover and the breaker).
        "router": {"retries": 0, "timeouts": {"connect_s": 5, "first_byte_s": 5, "total_s": 30}},
        "breaker": {"failures": 100000},
    }


@pytest.fixture(scope="module")
def azure_mock() -> Iterator[MockAzure]:
    mock = MockAzure(api_key=AZURE_KEY)
    with mock:
        yield mock


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory, azure_mock: MockAzure) -> GatewayProcess:
    return module_gateway_factory(azure_config(azure_mock))


@pytest.fixture
def azure(azure_mock: MockAzure) -> Iterator[MockAzure]:
    azure_mock.reset()
    yield azure_mock
    azure_mock.reset()


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with gateway.client() as c:
        yield c


def unique(text: str = "hello") -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def openai_error(err: openai.APIStatusError, status: int) -> dict[str, Any]:
    """Status, OpenAI's error shape, and no secret anywhere in the answer."""
    response = err.response
    assert err.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["type"], str)
    assert error["message"]
    assert_clean(response.text)
    assert_clean(str(response.headers))
    return error


# -- answers ------------------------------------------------------------------------------------


def test_chat_goes_to_the_deployment_url_with_the_azure_key(client: openai.OpenAI, azure: MockAzure) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model="az-chat", messages=messages, temperature=0.2
    )
    completion = raw.parse()

    assert completion.choices[0].message.content == "echo: second question"
    assert completion.model == CHAT_MODEL
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert "prompt_filter_results" in json.loads(raw.content)  # relayed as bytes, Azure's fields included
    assert raw.headers.get("apim-request-id") is None and raw.headers.get("x-ms-region") is None
    (seen,) = azure.requests
    assert (seen.path, seen.query) == (
        "/openai/deployments/chat-dep/chat/completions",
        "api-version=2024-10-21",
    )
    assert seen.header_values("api-key") == [AZURE_KEY]
    assert seen.header("authorization") is None
    assert seen.json() == {"model": "chat-dep", "messages": messages, "temperature": 0.2}


def test_stream_with_usage_is_openais_stream(client: openai.OpenAI, azure: MockAzure) -> None:
    azure.behave(model="chat-dep", chunks=5, chunk_delay=0.01)
    with client.chat.completions.with_streaming_response.create(
        model="az-chat", messages=user(unique()), stream=True, stream_options={"include_usage": True}
    ) as response:
        body = response.read()

    events = [json.loads(e.removeprefix(b"data: ")) for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    assert body.endswith(b"data: [DONE]\n\n")
    assert b'"object":""' not in body  # Azure's prompt-filter event is dropped
    for event in events:
        ChatCompletionChunk.model_validate(event)
        assert event["model"] == CHAT_MODEL
    *chunks, last = events
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == [f"chunk{i} " for i in range(5)]
    assert last["choices"] == []
    assert (last["usage"]["completion_tokens"], last["usage"]["prompt_tokens"]) == (5, 2)
    assert azure.requests[0].json()["stream_options"] == {"include_usage": True}


def test_async_filter_stream_works_with_openai_style_client_code(client: openai.OpenAI) -> None:
    prompt = unique("filtered later")
    text = ""
    with client.chat.completions.create(model="az-async", messages=user(prompt), stream=True) as stream:
        for chunk in stream:
            # OpenAI code indexes the first choice's delta: Azure's annotation events have none.
            text += chunk.choices[0].delta.content or ""
            assert chunk.object == "chat.completion.chunk"

    assert text == f"echo: {prompt}"


@pytest.mark.anyio
async def test_async_client_stream(gateway: GatewayProcess) -> None:
    async with gateway.async_client() as client:
        stream = await client.chat.completions.create(
            model="az-async",
            messages=user("async azure"),
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: async azure"
    assert chunks[-1].usage is not None


def test_tool_calling_round_trip(client: openai.OpenAI, azure: MockAzure) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Oslo"}]
    first = client.chat.completions.create(model="az-chat", messages=messages, tools=TOOLS)
    (call,) = first.choices[0].message.tool_calls or []
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})

    messages += [
        {"role": "assistant", "tool_calls": [call.model_dump()]},  # type: ignore[list-item]
        {"role": "tool", "tool_call_id": call.id, "content": "snow, -3C"},
    ]
    answer = client.chat.completions.create(model="az-chat", messages=messages, tools=TOOLS)

    assert answer.choices[0].message.content == "echo: snow, -3C"
    assert answer.choices[0].finish_reason == "stop"
    sent = azure.requests[-1].json()
    assert sent["tools"] == TOOLS
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.id
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": "snow, -3C"}


def test_streamed_tool_calling_round_trip(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Porto"}]
    with client.chat.completions.stream(
        model="az-chat", messages=messages, tools=TOOLS, stream_options={"include_usage": True}
    ) as stream:
        first = stream.get_final_completion()
    (call,) = first.choices[0].message.tool_calls or []
    assert json.loads(call.function.arguments) == {"city": "Porto"}
    assert first.choices[0].finish_reason == "tool_calls"
    assert first.usage is not None
    assert first.id.startswith("chatcmpl-") and first.model == CHAT_MODEL

    messages += [
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    with client.chat.completions.stream(model="az-chat", messages=messages, tools=TOOLS) as stream:
        pieces = [event.delta for event in stream if event.type == "content.delta"]
        answer = stream.get_final_completion()

    assert "".join(pieces) == answer.choices[0].message.content == "echo: sunny"


def test_completions_plain_and_streamed(client: openai.OpenAI, azure: MockAzure) -> None:
    prompt = unique("complete")
    completion = client.completions.create(model="az-instruct", prompt=prompt, max_tokens=5)
    with client.completions.create(
        model="az-instruct", prompt=prompt, stream=True, stream_options={"include_usage": True}
    ) as stream:
        *chunks, last = list(stream)

    assert completion.choices[0].text == f"echo: {prompt}"
    assert "".join(c.choices[0].text for c in chunks) == f"echo: {prompt}"
    assert all(c.object == "text_completion" for c in chunks)
    assert last.usage is not None
    assert [r.path for r in azure.requests] == ["/openai/deployments/instruct-dep/completions"] * 2


def test_embeddings_single_and_batch(client: openai.OpenAI, azure: MockAzure) -> None:
    texts = [unique("one"), unique("two"), unique("three")]
    single = client.embeddings.create(model="az-embed", input=texts[0], encoding_format="float")
    batch = client.embeddings.create(model="az-embed", input=texts, encoding_format="float")
    packed = client.embeddings.create(model="az-embed", input=texts[0], encoding_format="base64")

    assert single.data[0].embedding == embedding_vector(texts[0])
    assert [d.embedding for d in batch.data] == [embedding_vector(t) for t in texts]
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert batch.usage.prompt_tokens == 6
    vector = struct.unpack("<8f", base64.b64decode(packed.data[0].embedding))  # type: ignore[arg-type]
    assert list(vector) == embedding_vector(texts[0])
    assert azure.requests[1].json() == {"model": "embed-dep", "input": texts, "encoding_format": "float"}
    assert {r.path for r in azure.requests} == {"/openai/deployments/embed-dep/embeddings"}


def test_images(client: openai.OpenAI, azure: MockAzure) -> None:
    by_url = client.images.generate(model="az-image", prompt="a lighthouse", size="1024x1024")
    as_b64 = client.images.generate(model="az-image", prompt="a lighthouse", response_format="b64_json")

    assert by_url.data and by_url.data[0].url
    assert as_b64.data and base64.b64decode(as_b64.data[0].b64_json or "").startswith(b"\x89PNG")
    assert azure.requests[0].path == "/openai/deployments/image-dep/images/generations"
    assert azure.requests[0].json()["size"] == "1024x1024"


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_content_filter_is_a_400_naming_the_category(
    client: openai.OpenAI, azure: MockAzure, stream: bool
) -> None:
    azure.filter_prompt("chat-dep", category="violence", severity="high")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="az-chat", messages=user("something violent"), stream=stream)

    error = openai_error(err.value, 400)
    assert error == {
        "message": CONTENT_FILTER_MESSAGE + " (filtered: violence high)",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "content_filter",
    }


def test_throttled_429_keeps_retry_after(client: openai.OpenAI, azure: MockAzure) -> None:
    azure.throttle("chat-dep", retry_after=6)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="az-chat", messages=user("x"))

    error = openai_error(err.value, 429)
    assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")
    assert "Please retry after 6 seconds" in error["message"]
    assert err.value.response.headers["retry-after"] == "6"


def test_wrong_azure_key_is_a_401_that_names_the_provider(client: openai.OpenAI, azure: MockAzure) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(model="az-badkey", messages=user("x"))

    error = openai_error(err.value, 401)
    assert error["message"].startswith(
        "Upstream provider 'azure-badkey' answered 401: Access denied due to invalid"
    )
    assert azure.requests[0].header("api-key") == WRONG_AZURE_KEY


def test_api_management_401_is_mapped_and_an_echoed_key_masked(
    client: openai.OpenAI, azure: MockAzure
) -> None:
    message = f"Access denied due to invalid subscription key {AZURE_KEY}."
    azure.behave(
        model="chat-dep", status=401, body=json.dumps({"statusCode": 401, "message": message}).encode()
    )
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(model="az-chat", messages=user("x"))

    error = openai_error(err.value, 401)
    assert (
        error["message"]
        == "Upstream provider 'azure' answered 401: Access denied due to invalid subscription key ***."
    )


def test_missing_deployment_is_a_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="az-retired", messages=user("x"))

    error = openai_error(err.value, 404)
    assert error["code"] == "model_not_found"
    assert error["message"].startswith(
        "Upstream provider 'azure' answered 404: The API deployment for this resource"
    )


def test_refused_api_version_is_a_400(client: openai.OpenAI, azure: MockAzure) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="az-old", messages=user("x"))

    error = openai_error(err.value, 400)
    assert (error["message"], error["code"]) == ("API version not supported", "BadRequest")
    assert azure.requests[0].query == "api-version=2023-01-01"


def test_on_your_data_is_refused_before_azure(client: openai.OpenAI, azure: MockAzure) -> None:
    sources = [
        {"type": "azure_search", "parameters": {"endpoint": "https://search.example", "index_name": "hr"}}
    ]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="az-chat", messages=user("x"), extra_body={"data_sources": sources}
        )

    error = openai_error(err.value, 400)
    assert (error["param"], error["type"]) == ("data_sources", "invalid_request_error")
    assert "'azure' (azure_openai) does not accept 'data_sources'" in error["message"]
    assert azure.requests == []


SEARCH = {
    "type": "azure_search",
    "parameters": {
        "endpoint": "https://search.example",
        "index_name": "hr",
        "authentication": {"type": "api_key", "key": "client-search-key"},
    },
}


def test_on_your_data_answer_keeps_its_citations(client: openai.OpenAI, azure: MockAzure) -> None:
    question = unique("leave policy")
    completion = client.chat.completions.create(
        model="az-data", messages=user(question), extra_body={"data_sources": [SEARCH]}
    )

    message = completion.choices[0].message
    assert message.content == f"echo: {question}"
    context = (message.model_extra or {})["context"]
    assert json.loads(context["intent"]) == [question]
    (citation,) = context["citations"]
    assert (citation["title"], citation["url"]) == ("hr-doc1", "https://search.mock/hr/doc1.md")
    assert completion.object == "extensions.chat.completion"  # type: ignore[comparison-overlap]
    (sent,) = azure.requests
    assert sent.path == "/openai/deployments/chat-dep/chat/completions"
    assert sent.json()["data_sources"] == [SEARCH]


def test_on_your_data_stream_keeps_the_context_chunk(client: openai.OpenAI, azure: MockAzure) -> None:
    question = unique("leave policy")
    with client.chat.completions.create(
        model="az-data", messages=user(question), stream=True, extra_body={"data_sources": [SEARCH]}
    ) as stream:
        chunks = list(stream)

    # Azure's prompt-filter event and the usage event the gateway asked for are gone; the
    # context chunk, named "extensions.chat.completion.chunk", is not.
    assert all(c.id and c.choices for c in chunks)
    first, *rest = chunks
    context = (first.choices[0].delta.model_extra or {})["context"]
    assert context["citations"][0]["title"] == "hr-doc1"
    assert json.loads(context["intent"]) == [question]
    assert "".join(c.choices[0].delta.content or "" for c in rest) == f"echo: {question}"
    assert rest[-1].choices[0].finish_reason == "stop"
    assert azure.requests[0].json()["stream_options"] == {"include_usage": True}


def test_on_your_data_errors_from_azure_are_openai_shaped(client: openai.OpenAI, azure: MockAzure) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="az-data", messages=user("x"), extra_body={"data_sources": [SEARCH, SEARCH]}
        )
    error = openai_error(err.value, 400)
    assert error["code"] == "BadRequest"
    assert "exactly one data source" in error["message"]
    assert len(azure.requests) == 1


def test_data_sources_old_spelling_is_refused_even_where_allowed(
    client: openai.OpenAI, azure: MockAzure
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="az-data", messages=user("x"), extra_body={"dataSources": [SEARCH]}
        )
    assert openai_error(err.value, 400)["param"] == "dataSources"
    assert azure.requests == []


@pytest.mark.parametrize(
    ("status", "exception", "code"),
    [
        (403, openai.PermissionDeniedError, "AuthenticationTypeDisabled"),
        (500, openai.InternalServerError, "InternalServerError"),
        (503, openai.InternalServerError, "ServiceUnavailable"),
    ],
)
def test_server_and_permission_errors(
    client: openai.OpenAI, azure: MockAzure, status: int, exception: type[openai.APIStatusError], code: str
) -> None:
    azure.behave(model="chat-dep", status=status)
    with pytest.raises(exception) as err:
        client.chat.completions.create(model="az-chat", messages=user("x"))

    error = openai_error(err.value, status)
    assert error["code"] == code
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")


# -- credentials ----------------------------------------------------------------------------------


def test_keys_stay_on_their_side(client: openai.OpenAI, gateway: GatewayProcess, azure: MockAzure) -> None:
    answers: list[Any] = [
        client.chat.completions.with_raw_response.create(model="az-chat", messages=user("k1")).http_response,
        client.embeddings.with_raw_response.create(model="az-embed", input="k2").http_response,
        client.images.with_raw_response.generate(model="az-image", prompt="k3").http_response,
    ]
    with client.chat.completions.with_streaming_response.create(
        model="az-async", messages=user("k4"), stream=True
    ) as streamed:
        streamed.read()
        answers.append(streamed.http_response)
    with gateway.http() as http:
        answers += [
            http.post("/v1/chat/completions", json={"model": m, "messages": user("k5")})
            for m in ("az-badkey", "az-retired", "az-old")
        ]

    assert [a.status_code for a in answers] == [200, 200, 200, 200, 401, 404, 400]
    for answer in answers:
        assert_clean(answer.text)
        assert_clean(str(answer.headers))
    assert len(azure.requests) == 7
    for seen in azure.requests:
        assert TEAM_A_KEY not in seen.target and TEAM_A_KEY.encode() not in seen.body
        assert all(TEAM_A_KEY not in value for _, value in seen.headers)
        assert seen.header("authorization") is None and seen.header("x-api-key") is None
    assert TEAM_A_KEY not in gateway.log_text() and AZURE_KEY not in gateway.log_text()
