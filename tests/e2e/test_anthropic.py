"""The official `openai` SDK against a real gateway process whose `anthropic` provider is the mock Messages API.

What the mock received is asserted as well as what the client got, so each test
pins both directions of the translation.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam, ChatCompletionToolParam

from tests.mock_anthropic import MockAnthropic
from tests.mock_openai import MockOpenAI

from .conftest import SECRETS, TEAM_A_KEY, TEAM_A_MODELS, GatewayFactory, GatewayProcess, default_config

pytestmark = pytest.mark.e2e

ANTHROPIC_KEY = "sk-ant-e2e-upstream-secret-6d1e"
UPSTREAM_MODEL = "claude-mock-1"
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def anthropic_mock() -> Iterator[MockAnthropic]:
    mock = MockAnthropic(api_key=ANTHROPIC_KEY)
    with mock:
        yield mock


@pytest.fixture
def mock(anthropic_mock: MockAnthropic) -> Iterator[MockAnthropic]:
    anthropic_mock.reset()
    yield anthropic_mock
    anthropic_mock.reset()


@pytest.fixture(scope="module")
def gateway(
    module_gateway_factory: GatewayFactory, mock_upstream: MockOpenAI, anthropic_mock: MockAnthropic
) -> GatewayProcess:
    config = default_config(mock_upstream)
    config["providers"]["claude"] = {
        "type": "anthropic",
        "base_url": anthropic_mock.base_url,
        "api_key": ANTHROPIC_KEY,
    }
    config["models"] += [
        {"name": "claude", "deployments": [{"provider": "claude", "model": UPSTREAM_MODEL}]},
        {
            "name": "claude-short",
            "deployments": [
                {"provider": "claude", "model": "claude-mock-short", "params": {"max_tokens": 3, "top_k": 5}}
            ],
        },
    ]
    config["auth"]["keys"][0]["models"] = sorted(TEAM_A_MODELS | {"claude", "claude-short"})
    return module_gateway_factory(config)


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with gateway.client(TEAM_A_KEY) as c:
        yield c


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def names(completion: ChatCompletion) -> list[str]:
    """The names of the functions a completion calls."""
    return [c.function.name for c in completion.choices[0].message.tool_calls or [] if c.type == "function"]


def assert_openai_error(err: openai.APIStatusError, status: int) -> dict[str, Any]:
    assert err.status_code == status, err.response.text
    body = err.response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert err.response.headers["x-request-id"]
    for secret in (*SECRETS, ANTHROPIC_KEY):
        assert secret not in err.response.text
    return error


# -- chat ----------------------------------------------------------------------------------


def test_plain_chat(client: openai.OpenAI, mock: MockAnthropic) -> None:
    prompt = unique("hello claude")
    raw = client.chat.completions.with_raw_response.create(model="claude", messages=user(prompt))
    completion = raw.parse()

    assert completion.choices[0].message.content == f"echo: {prompt}"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.object, completion.model) == ("chat.completion", UPSTREAM_MODEL)
    assert completion.id.startswith("msg_")
    assert completion.usage is not None
    assert (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
        completion.usage.total_tokens,
    ) == (3, 4, 7)
    assert raw.headers["x-request-id"]

    (seen,) = mock.requests
    assert (seen.method, seen.path) == ("POST", "/v1/messages")
    assert seen.json() == {"model": UPSTREAM_MODEL, "messages": user(prompt), "max_tokens": 4096}
    assert seen.header("x-api-key") == ANTHROPIC_KEY
    assert seen.header("anthropic-version") == "2023-06-01"
    assert seen.header("authorization") is None  # the client's gateway key never goes upstream


def test_multi_turn_with_system_prompt(client: openai.OpenAI, mock: MockAnthropic) -> None:
    completion = client.chat.completions.create(
        model="claude",
        messages=[
            {"role": "system", "content": "you are a terse bot"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"},
            {"role": "user", "content": [{"type": "text", "text": "and more"}]},
        ],
        temperature=0.3,
        top_p=0.9,
        max_completion_tokens=200,
        stop=["NEVER"],
        user="end-user-7",
        seed=42,
    )
    assert completion.choices[0].message.content == "echo: second question and more"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 5  # the mock's cached system prompt
    assert completion.usage.prompt_tokens == 5 + 8

    assert mock.requests[0].json() == {
        "model": UPSTREAM_MODEL,
        "system": "you are a terse bot",
        "messages": [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": [{"type": "text", "text": "first answer"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "second question"},
                    {"type": "text", "text": "and more"},
                ],
            },
        ],
        "max_tokens": 200,
        "stop_sequences": ["NEVER"],
        "temperature": 0.3,
        "top_p": 0.9,
        "metadata": {"user_id": "end-user-7"},
    }


def test_deployment_params_and_length_finish(client: openai.OpenAI, mock: MockAnthropic) -> None:
    completion = client.chat.completions.create(model="claude-short", messages=user("one two three four"))
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "echo: one two "
    sent = mock.requests[0].json()
    assert (sent["max_tokens"], sent["top_k"]) == (3, 5)


def test_stop_sequence(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="claude", messages=user("keep END drop"), stop="END")
    assert completion.choices[0].message.content == "echo: keep "
    assert completion.choices[0].finish_reason == "stop"


# -- streaming -----------------------------------------------------------------------------


def test_stream_with_include_usage(client: openai.OpenAI, mock: MockAnthropic) -> None:
    mock.behave(model=UPSTREAM_MODEL, chunks=6, chunk_delay=0.01)
    stream = client.chat.completions.create(
        model="claude",
        messages=[{"role": "system", "content": "be brief"}, *user("x")],
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        chunks = list(stream)

    *body, last = chunks
    assert body[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in body if c.choices[0].delta.content]
    assert pieces == [f"chunk{i} " for i in range(6)]
    assert [c.choices[0].finish_reason for c in body][-1] == "stop"
    assert all(c.usage is None for c in body)
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (3, 6, 9)
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens == 2
    assert len({c.id for c in chunks}) == 1
    assert "stream_options" not in mock.requests[0].json()
    assert mock.requests[0].json()["stream"] is True


def test_stream_without_usage(client: openai.OpenAI) -> None:
    prompt = unique("stream me")
    with client.chat.completions.create(model="claude", messages=user(prompt), stream=True) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == f"echo: {prompt}"
    assert all(c.choices and c.usage is None for c in chunks)


@pytest.mark.anyio
async def test_async_client_stream(gateway: GatewayProcess) -> None:
    async with gateway.async_client(TEAM_A_KEY) as client:
        stream = await client.chat.completions.create(
            model="claude", messages=user("async works"), stream=True
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
    assert "".join(p or "" for p in pieces) == "echo: async works"


def test_error_event_mid_stream_raises(client: openai.OpenAI, mock: MockAnthropic) -> None:
    mock.behave(model=UPSTREAM_MODEL, chunks=5, error_after=2)
    seen = []
    stream = client.chat.completions.create(model="claude", messages=user("x"), stream=True)
    with stream, pytest.raises(openai.APIError) as exc:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert exc.value.message == "Overloaded"
    assert exc.value.body == {
        "message": "Overloaded",
        "type": "overloaded_error",
        "param": None,
        "code": None,
    }
    assert seen == [None, "chunk0 ", "chunk1 "]


# -- tools ---------------------------------------------------------------------------------


def test_tool_round_trip(client: openai.OpenAI, mock: MockAnthropic) -> None:
    question = 'call get_weather {"city": "Paris"}'
    first = client.chat.completions.create(model="claude", messages=user(question), tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == f"echo: {question}"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})

    answer = client.chat.completions.create(
        model="claude",
        tools=[WEATHER],
        messages=[
            *user(question),
            choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
        ],
    )
    assert answer.choices[0].message.content == "tool result: 18C and sunny"
    assert answer.choices[0].finish_reason == "stop"

    sent = mock.requests[1].json()
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city.",
            "input_schema": WEATHER["function"]["parameters"],
        }
    ]
    assert sent["messages"][1]["content"][-1] == {
        "type": "tool_use",
        "id": call.id,
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    assert sent["messages"][2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C and sunny"}],
    }


def test_tool_round_trip_streamed(client: openai.OpenAI, mock: MockAnthropic) -> None:
    args = {"city": "Lisbon", "days": [1, 2, 3], "note": 'a "quoted" word'}
    question = "call get_weather " + json.dumps(args)
    with client.chat.completions.stream(
        model="claude", messages=user(question), tools=[WEATHER], tool_choice="required"
    ) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [json.loads(e.arguments) for e in done] == [args]
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None  # a forced tool call comes without text
    (call,) = choice.message.tool_calls or []
    assert json.loads(call.function.arguments) == args
    assert mock.requests[0].json()["tool_choice"] == {"type": "any"}

    with client.chat.completions.stream(
        model="claude",
        tools=[WEATHER],
        messages=[
            *user(question),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": call.function.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": [{"type": "text", "text": "rain"}]},
        ],
    ) as stream:
        answer = stream.get_final_completion()
    assert answer.choices[0].message.content == "tool result: rain"


def test_parallel_tool_calls_false_and_named_choice(client: openai.OpenAI, mock: MockAnthropic) -> None:
    clock: ChatCompletionToolParam = {"type": "function", "function": {"name": "get_time"}}
    completion = client.chat.completions.create(
        model="claude",
        messages=user("call get_weather and call get_time"),
        tools=[WEATHER, clock],
        parallel_tool_calls=False,
    )
    assert names(completion) == ["get_weather"]
    named = client.chat.completions.create(
        model="claude",
        messages=user("anything"),
        tools=[WEATHER, clock],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert names(named) == ["get_time"]
    first, second = (r.json() for r in mock.requests)
    assert first["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert second["tool_choice"] == {"type": "tool", "name": "get_time"}
    assert second["tools"][1] == {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}


class City(pydantic.BaseModel):
    city: str
    population: int


def test_json_schema_answers_parse_with_the_sdk(client: openai.OpenAI, mock: MockAnthropic) -> None:
    ask = user('call City {"city": "Paris", "population": 2100000}')
    completion = client.chat.completions.parse(model="claude", messages=ask, response_format=City)
    choice = completion.choices[0]
    assert choice.message.parsed == City(city="Paris", population=2100000)
    assert (choice.finish_reason, choice.message.tool_calls) == ("stop", None)

    with client.chat.completions.stream(model="claude", messages=ask, response_format=City) as stream:
        contents = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(contents) > 1  # the tool input's fragments, streamed as they came
    assert final.choices[0].message.parsed == City(city="Paris", population=2100000)
    assert final.choices[0].finish_reason == "stop"

    sent = mock.requests[0].json()
    (tool,) = sent["tools"]
    assert tool["name"] == "City"
    assert tool["input_schema"]["required"] == ["city", "population"]
    assert sent["tool_choice"] == {"type": "tool", "name": "City", "disable_parallel_tool_use": True}


def test_json_object_answer_is_json_content(client: openai.OpenAI, mock: MockAnthropic) -> None:
    completion = client.chat.completions.create(
        model="claude",
        messages=user('answer in JSON: call json_object {"ok": true}'),
        response_format={"type": "json_object"},
    )
    assert json.loads(completion.choices[0].message.content or "") == {"ok": True}
    assert completion.choices[0].finish_reason == "stop"
    assert mock.requests[0].json()["tools"][0]["input_schema"] == {"type": "object"}


def test_image_parts(client: openai.OpenAI, mock: MockAnthropic) -> None:
    client.chat.completions.create(
        model="claude",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://images.example/cat.jpg"}},
                ],
            }
        ],
    )
    assert mock.requests[0].json()["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://images.example/cat.jpg"}},
    ]


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "status", "exc_type", "kind"),
    [
        (400, 400, openai.BadRequestError, "invalid_request_error"),
        (401, 401, openai.AuthenticationError, "authentication_error"),
        (403, 403, openai.PermissionDeniedError, "permission_error"),
        (404, 404, openai.NotFoundError, "not_found_error"),
        (429, 429, openai.RateLimitError, "rate_limit_error"),
        (500, 500, openai.InternalServerError, "api_error"),
        (529, 503, openai.InternalServerError, "overloaded_error"),
    ],
)
def test_upstream_errors_keep_status_and_message(
    client: openai.OpenAI,
    mock: MockAnthropic,
    upstream: int,
    status: int,
    exc_type: type[openai.APIStatusError],
    kind: str,
) -> None:
    mock.behave(model=UPSTREAM_MODEL, status=upstream, error={"message": f"upstream says {upstream}"})
    with pytest.raises(exc_type) as exc:
        client.chat.completions.create(model="claude", messages=user("x"))
    error = assert_openai_error(exc.value, status)
    assert (error["message"], error["type"]) == (f"upstream says {upstream}", kind)
    if upstream == 429:
        assert exc.value.response.headers["retry-after"] == "1"


def test_upstream_rejection_of_a_translated_body_is_relayed(client: openai.OpenAI) -> None:
    # A tool result with no tool call before it: the API's own 400, message intact.
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="claude", messages=[{"role": "tool", "tool_call_id": "toolu_nope", "content": "x"}]
        )
    error = assert_openai_error(exc.value, 400)
    assert "unexpected `tool_use_id`" in error["message"]


def test_malformed_answer_is_502(client: openai.OpenAI, mock: MockAnthropic) -> None:
    mock.behave(model=UPSTREAM_MODEL, body=b"<html>oops</html>")
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="claude", messages=user("x"))
    error = assert_openai_error(exc.value, 502)
    assert (
        error["message"]
        == "Upstream provider 'claude' (anthropic) sent an answer that is not a Messages API message."
    )


def test_stream_that_is_not_an_event_stream_ends_with_an_error(
    client: openai.OpenAI, mock: MockAnthropic
) -> None:
    mock.behave(model=UPSTREAM_MODEL, body=b'{"not": "events"}')
    stream = client.chat.completions.create(model="claude", messages=user("x"), stream=True)
    with stream, pytest.raises(openai.APIError) as exc:
        list(stream)
    assert exc.value.message == "Upstream provider 'claude' (anthropic) ended the stream before message_stop."


def test_embeddings_on_an_anthropic_alias_is_refused(client: openai.OpenAI, mock: MockAnthropic) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="claude", input="x")
    error = assert_openai_error(exc.value, 400)
    assert "'claude' (anthropic)" in error["message"]
    assert "embeddings" in error["message"]
    assert mock.requests == []


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}, "tools": [WEATHER]}, "response_format"),
        ({"temperature": 1.5}, "temperature"),
    ],
)
def test_unsupported_params_are_400(
    client: openai.OpenAI, mock: MockAnthropic, params: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="claude", messages=user("x"), **params)
    error = assert_openai_error(exc.value, 400)
    assert error["param"] == param
    assert "Provider 'claude' (anthropic)" in error["message"]
    assert mock.requests == []


def test_bad_tool_call_arguments_are_400(client: openai.OpenAI, mock: MockAnthropic) -> None:
    broken: ChatCompletionMessageParam = {
        "role": "assistant",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{nope"}}
        ],
    }
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="claude",
            tools=[WEATHER],
            messages=[*user("x"), broken, {"role": "tool", "tool_call_id": "call_1", "content": "y"}],
        )
    assert assert_openai_error(exc.value, 400)["param"] == "messages[1].tool_calls[0].function.arguments"
    assert mock.requests == []
