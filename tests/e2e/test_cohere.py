"""The official `openai` SDK against a real gateway process whose aliases are Cohere deployments.

The upstream is `MockCohere` (Cohere's v2 wire format, checked against the `cohere` SDK in
tests/unit/test_mock_cohere.py), so every answer here went OpenAI -> Cohere -> OpenAI.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from typing import Any

import openai
import pydantic
import pytest
from openai.types.chat import (
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionToolParam,
)

from tests.mock_cohere import MockCohere
from tests.mock_openai import embedding_vector

from .conftest import SECRETS, TEAM_A_KEY, GatewayFactory, GatewayProcess

pytestmark = pytest.mark.e2e

CO_KEY = "co-upstream-secret-e2e-71c3d9aa"
CO_WRONG_KEY = "co-revoked-secret-e2e-0b5e2f11"
CHAT_MODEL = "command-x"
EMBED_MODEL = "embed-x"
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class GetWeather(pydantic.BaseModel):
    city: str


@pytest.fixture(scope="module")
def cohere_mock() -> Iterator[MockCohere]:
    with MockCohere(api_key=CO_KEY) as mock:
        yield mock


@pytest.fixture(autouse=True)
def _fresh_cohere(cohere_mock: MockCohere) -> Iterator[None]:
    cohere_mock.reset()
    yield
    cohere_mock.reset()


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory, cohere_mock: MockCohere) -> GatewayProcess:
    deployment = {"provider": "co", "model": EMBED_MODEL}
    config = {
        "server": {"host": "127.0.0.1", "port": 8080},
        "auth": {"keys": [{"name": "team-a", "key": TEAM_A_KEY, "models": ["co-*"]}]},
        "providers": {
            "co": {"type": "cohere", "base_url": cohere_mock.base_url, "api_key": CO_KEY},
            "co-revoked": {"type": "cohere", "base_url": cohere_mock.base_url, "api_key": CO_WRONG_KEY},
        },
        "models": [
            {"name": "co-chat", "deployments": [{"provider": "co", "model": CHAT_MODEL}]},
            {"name": "co-embed", "deployments": [{**deployment, "params": {"input_type": "search_query"}}]},
            {"name": "co-embed-default", "deployments": [deployment]},
            {"name": "co-revoked", "deployments": [{"provider": "co-revoked", "model": CHAT_MODEL}]},
        ],
        # Error mapping is checked one upstream answer at a time: no retries, and a breaker
        # that never opens (tests/e2e/test_replicas_breaker.py and the integration tests
        # cover failover and the breaker).
        "router": {"retries": 0, "timeouts": {"connect_s": 5, "first_byte_s": 5, "total_s": 30}},
        "breaker": {"failures": 100000},
    }
    return module_gateway_factory(config)


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with gateway.client() as c:
        yield c


def assert_no_secrets(text: str) -> None:
    for secret in (*SECRETS, CO_KEY, CO_WRONG_KEY):
        assert secret not in text


def only_request(mock: MockCohere, path: str = "/v2/chat") -> dict[str, Any]:
    (request,) = mock.requests
    assert (request.method, request.path) == ("POST", path)
    assert request.header("authorization") == f"Bearer {CO_KEY}"
    body: dict[str, Any] = request.json()
    return body


# -- chat ---------------------------------------------------------------------------------------


def test_plain_chat(client: openai.OpenAI, cohere_mock: MockCohere) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="co-chat", messages=[{"role": "user", "content": "hello there"}], temperature=0.3, max_tokens=20
    )
    completion = raw.parse()

    assert raw.headers["x-request-id"]
    assert completion.object == "chat.completion"
    assert completion.model == CHAT_MODEL
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    # Billed units, not Cohere's template-inflated token count.
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 3)
    assert completion.usage.total_tokens == 5
    assert only_request(cohere_mock) == {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "temperature": 0.3,
        "max_tokens": 20,
    }


def test_multi_turn_with_system_prompt(client: openai.OpenAI, cohere_mock: MockCohere) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "text", "text": "second question"}]},
    ]
    completion = client.chat.completions.create(
        model="co-chat", messages=messages, top_p=1.0, stop=["zzz"], seed=3, user="end-user-1"
    )

    assert completion.choices[0].message.content == "echo: second question"
    sent = only_request(cohere_mock)
    assert sent["messages"] == [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "text", "text": "second question"}]},
    ]
    assert (sent["p"], sent["stop_sequences"], sent["seed"]) == (0.99, ["zzz"], 3)
    assert "user" not in sent and "top_p" not in sent


@pytest.mark.parametrize(
    ("extra", "finish", "content"),
    [({"max_completion_tokens": 2}, "length", "echo: one "), ({"stop": "two"}, "stop", "echo: one ")],
)
def test_finish_reasons(client: openai.OpenAI, extra: dict[str, Any], finish: str, content: str) -> None:
    completion = client.chat.completions.create(
        model="co-chat", messages=[{"role": "user", "content": "one two three"}], **extra
    )
    assert completion.choices[0].finish_reason == finish
    assert completion.choices[0].message.content == content


def test_stream_with_include_usage(client: openai.OpenAI, cohere_mock: MockCohere) -> None:
    cohere_mock.behave(model=CHAT_MODEL, chunks=6, chunk_delay=0.01)
    with client.chat.completions.create(
        model="co-chat",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)

    *body, last = chunks
    assert body[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in body if c.choices[0].delta.content]
    assert pieces == [f"chunk{i} " for i in range(6)]
    assert body[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in body)
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (2, 6, 8)
    assert len({c.id for c in chunks}) == 1
    assert {c.model for c in chunks} == {CHAT_MODEL}
    sent = only_request(cohere_mock)
    assert sent["stream"] is True and "stream_options" not in sent


def test_stream_without_usage(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model="co-chat", messages=[{"role": "user", "content": "a b c"}], stream=True
    ) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: a b c"
    assert all(c.choices and c.usage is None for c in chunks)


# -- tools ----------------------------------------------------------------------------------------


def test_tool_round_trip(client: openai.OpenAI, cohere_mock: MockCohere) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": 'What is the weather? call get_weather {"city": "Paris"}'}
    ]
    first = client.chat.completions.create(model="co-chat", messages=messages, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content == "I will call get_weather."  # Cohere's tool plan

    messages.append(choice.message.model_dump(exclude_none=True))  # type: ignore[arg-type]
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"})
    second = client.chat.completions.create(model="co-chat", messages=messages, tools=[WEATHER])
    assert second.choices[0].message.content == "tool said: sunny, 21C"
    assert second.choices[0].finish_reason == "stop"

    sent = cohere_mock.requests[1].json()
    assert sent["tools"] == [WEATHER]
    assert sent["messages"][1] == {
        "role": "assistant",
        "tool_plan": "I will call get_weather.",
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": call.function.arguments},
            }
        ],
    }
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}


def test_tool_round_trip_streamed(client: openai.OpenAI, cohere_mock: MockCohere) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {
            "role": "user",
            "content": 'call get_weather {"city": "Lisbon"} and call get_weather {"city": "Porto"}',
        }
    ]
    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    with client.chat.completions.stream(model="co-chat", messages=messages, tools=[tool]) as stream:
        kinds = [event.type for event in stream]
        first = stream.get_final_completion()

    assert "tool_calls.function.arguments.delta" in kinds
    assert kinds.count("tool_calls.function.arguments.done") == 2
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [c.function.parsed_arguments for c in calls] == [
        GetWeather(city="Lisbon"),
        GetWeather(city="Porto"),
    ]
    assert len({c.id for c in calls}) == 2
    assert cohere_mock.requests[0].json()["strict_tools"] is True

    messages.append(
        {"role": "assistant", "tool_calls": [c.model_dump(include={"id", "type", "function"}) for c in calls]}
    )  # type: ignore[misc]
    for call, weather in zip(calls, ("rain", "sun"), strict=True):
        messages.append({"role": "tool", "tool_call_id": call.id, "content": weather})
    with client.chat.completions.stream(model="co-chat", messages=messages, tools=[tool]) as stream:
        second = stream.get_final_completion()
    assert second.choices[0].message.content == "tool said: rain; sun"
    assert second.choices[0].finish_reason == "stop"


def test_tool_choice(client: openai.OpenAI, cohere_mock: MockCohere) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "call get_weather"}]
    completion = client.chat.completions.create(
        model="co-chat", messages=messages, tools=[WEATHER], tool_choice="none"
    )
    assert completion.choices[0].message.tool_calls is None
    completion = client.chat.completions.create(
        model="co-chat", messages=messages, tools=[WEATHER], tool_choice="required"
    )
    assert completion.choices[0].message.tool_calls
    assert [r.json()["tool_choice"] for r in cohere_mock.requests] == ["NONE", "REQUIRED"]


def test_named_tool_choice(client: openai.OpenAI, cohere_mock: MockCohere) -> None:
    clock: ChatCompletionToolParam = {"type": "function", "function": {"name": "now"}}
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "what is it like?"}]
    named: ChatCompletionNamedToolChoiceParam = {"type": "function", "function": {"name": "now"}}
    completion = client.chat.completions.create(
        model="co-chat",
        messages=messages,
        tools=[WEATHER, clock],
        tool_choice=named,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls or [] if c.type == "function"] == ["now"]
    sent = cohere_mock.requests[0].json()
    assert (sent["tool_choice"], [t["function"]["name"] for t in sent["tools"]]) == ("REQUIRED", ["now"])

    with client.chat.completions.stream(
        model="co-chat",
        messages=messages,
        tools=[WEATHER, clock],
        tool_choice=named,
    ) as stream:
        streamed = stream.get_final_completion()
    assert [c.function.name for c in streamed.choices[0].message.tool_calls or []] == ["now"]

    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="co-chat",
            messages=messages,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "now"}},
        )
    assert exc.value.body == {
        "message": "tool_choice names the function 'now', which is not in 'tools'.",
        "type": "invalid_request_error",
        "param": "tool_choice",
        "code": None,
    }
    assert len(cohere_mock.requests) == 2  # the refused request never went upstream


# -- embeddings -----------------------------------------------------------------------------------


def test_embeddings_single_and_batch(client: openai.OpenAI, cohere_mock: MockCohere) -> None:
    single = client.embeddings.create(model="co-embed", input="alpha beta", encoding_format="float")
    assert single.object == "list"
    assert single.model == EMBED_MODEL
    assert [d.embedding for d in single.data] == [embedding_vector("alpha beta")]
    assert (single.usage.prompt_tokens, single.usage.total_tokens) == (2, 2)

    texts = ["one", "two three", "four"]
    batch = client.embeddings.create(
        model="co-embed-default", input=texts, encoding_format="float", dimensions=4
    )
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert [d.embedding for d in batch.data] == [embedding_vector(t, 4) for t in texts]

    first, second = (r.json() for r in cohere_mock.requests)
    assert first == {
        "model": EMBED_MODEL,
        "texts": ["alpha beta"],
        "input_type": "search_query",
        "embedding_types": ["float"],
    }
    assert second["input_type"] == "search_document"
    assert (second["texts"], second["output_dimension"]) == (texts, 4)


def test_embeddings_base64(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    # The SDK asks for base64 by default and decodes it: float32, little-endian.
    decoded = client.embeddings.create(model="co-embed", input=["x y", "z"])
    assert [d.embedding for d in decoded.data] == [embedding_vector("x y"), embedding_vector("z")]

    with gateway.http() as http:
        body = http.post(
            "/v1/embeddings", json={"model": "co-embed", "input": "q", "encoding_format": "base64"}
        ).json()
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == embedding_vector("q")


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "client_status", "error_class"),
    [
        (400, 400, openai.BadRequestError),
        (402, 429, openai.RateLimitError),
        (403, 403, openai.PermissionDeniedError),
        (404, 404, openai.NotFoundError),
        (408, 408, openai.APIStatusError),
        (413, 413, openai.APIStatusError),
        (422, 400, openai.BadRequestError),
        (429, 429, openai.RateLimitError),
        (499, 502, openai.InternalServerError),
        (500, 500, openai.InternalServerError),
        (502, 502, openai.InternalServerError),
        (503, 503, openai.InternalServerError),
        (504, 504, openai.InternalServerError),
        (529, 503, openai.InternalServerError),
    ],
)
def test_upstream_errors_map_to_openai_errors(
    client: openai.OpenAI,
    cohere_mock: MockCohere,
    status: int,
    client_status: int,
    error_class: type[Exception],
) -> None:
    message = f"cohere says {status}"
    cohere_mock.behave(model=CHAT_MODEL, status=status, error={"message": message})
    with pytest.raises(error_class) as info:
        client.chat.completions.create(model="co-chat", messages=[{"role": "user", "content": "x"}])
    err = info.value
    assert isinstance(err, openai.APIStatusError)
    assert err.status_code == client_status
    assert isinstance(err.body, dict)
    assert set(err.body) == {"message", "type", "param", "code"}
    assert err.body["message"] == f"Upstream provider 'co' (cohere) answered {status}: {message}"
    assert err.response.headers["x-request-id"]
    if status == 429:
        assert err.response.headers["retry-after"] == "1"
    assert_no_secrets(err.response.text)


def test_revoked_upstream_key_is_401_without_the_key(
    gateway: GatewayProcess, cohere_mock: MockCohere
) -> None:
    with gateway.client() as client, pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="co-revoked", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["message"].endswith("answered 401: invalid api token")  # type: ignore[index]
    assert cohere_mock.requests[0].header("authorization") == f"Bearer {CO_WRONG_KEY}"
    assert_no_secrets(info.value.response.text)


def test_error_before_a_stream_starts(client: openai.OpenAI, cohere_mock: MockCohere) -> None:
    cohere_mock.behave(model=CHAT_MODEL, status=429)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="co-chat", messages=[{"role": "user", "content": "x"}], stream=True
        )


def test_generation_error_mid_stream_is_an_sse_error(client: openai.OpenAI, cohere_mock: MockCohere) -> None:
    cohere_mock.behave(model=CHAT_MODEL, chunks=5, error_after=2, error={"message": "model crashed"})
    pieces = []
    with (
        client.chat.completions.create(
            model="co-chat", messages=[{"role": "user", "content": "x"}], stream=True
        ) as stream,
        pytest.raises(openai.APIError) as info,
    ):
        for chunk in stream:
            pieces.append(chunk.choices[0].delta.content)
    assert pieces[1:] == ["chunk0 ", "chunk1 "]
    assert type(info.value) is openai.APIError
    assert (
        info.value.message == "Upstream provider 'co' (cohere) ended the generation with ERROR: model crashed"
    )


def test_upstream_reset_mid_stream_is_an_sse_error(client: openai.OpenAI, cohere_mock: MockCohere) -> None:
    cohere_mock.behave(model=CHAT_MODEL, chunks=5, reset_after=2)
    with (
        client.chat.completions.create(
            model="co-chat", messages=[{"role": "user", "content": "x"}], stream=True
        ) as stream,
        pytest.raises(openai.APIError) as info,
    ):
        list(stream)
    assert type(info.value) is openai.APIError
    assert_no_secrets(str(info.value.body))


def test_generation_error_without_a_stream_is_a_server_error(
    client: openai.OpenAI, cohere_mock: MockCohere
) -> None:
    cohere_mock.behave(model=CHAT_MODEL, finish_reason="ERROR")
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="co-chat", messages=[{"role": "user", "content": "x"}])
    assert_no_secrets(info.value.response.text)


# -- refusals -------------------------------------------------------------------------------------


def test_capabilities_cohere_lacks_are_400(client: openai.OpenAI, cohere_mock: MockCohere) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="co-chat", prompt="a cat")
    assert "Provider 'co' (cohere)" in info.value.message and "images" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="co-chat", prompt="once upon")
    assert "Provider 'co' (cohere)" in info.value.message and "completions" in info.value.message
    assert cohere_mock.requests == []


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": {
                    "type": "allowed_tools",
                    "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "x"}}]},
                },
            },
            "tool_choice",
        ),
        ({"parallel_tool_calls": False, "tools": [WEATHER]}, "parallel_tool_calls"),
    ],
)
def test_unsupported_parameters_are_400(
    client: openai.OpenAI, cohere_mock: MockCohere, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="co-chat", messages=[{"role": "user", "content": "x"}], **extra)
    assert info.value.param == param
    assert info.value.body["param"] == param  # type: ignore[index]
    assert f"Provider 'co' (cohere) does not support '{param}'" in info.value.message
    assert cohere_mock.requests == []


def test_token_array_embeddings_are_400(client: openai.OpenAI, cohere_mock: MockCohere) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="co-embed", input=[[1, 2, 3]])
    assert info.value.param == "input"
    assert cohere_mock.requests == []
