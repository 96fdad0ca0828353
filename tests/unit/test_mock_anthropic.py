"""The mock Anthropic upstream, checked against the official `anthropic` SDK so it cannot drift into fiction.

The SDK client runs with `_strict_response_validation=True`, and raw bodies and
events are also validated against the SDK's own types.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import pydantic
import pytest
from anthropic.types import (
    ErrorResponse,
    Message,
    MessageParam,
    RawMessageStreamEvent,
    ToolChoiceToolParam,
    ToolParam,
)

from tests.mock_anthropic import VERSION, MockAnthropic

MODEL = "claude-mock-1"
WEATHER: ToolParam = {
    "name": "get_weather",
    "description": "Weather for a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CLOCK: ToolParam = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
STREAM_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RawMessageStreamEvent)


@pytest.fixture(scope="module")
def server() -> Iterator[MockAnthropic]:
    mock = MockAnthropic()
    with mock:
        yield mock


@pytest.fixture
def mock(server: MockAnthropic) -> Iterator[MockAnthropic]:
    server.reset()
    yield server
    server.reset()


def sdk(mock: MockAnthropic, **kwargs: Any) -> anthropic.Anthropic:
    kwargs.setdefault("api_key", mock.api_key)
    return anthropic.Anthropic(
        base_url=mock.base_url, max_retries=0, timeout=10, _strict_response_validation=True, **kwargs
    )


@pytest.fixture
def client(mock: MockAnthropic) -> Iterator[anthropic.Anthropic]:
    with sdk(mock) as c:
        yield c


@pytest.fixture
def raw(mock: MockAnthropic) -> Iterator[httpx.Client]:
    headers = {"x-api-key": mock.api_key, "anthropic-version": VERSION}
    with httpx.Client(base_url=mock.base_url, headers=headers, timeout=10) as c:
        yield c


def user(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


def events_of(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each SSE event, checking that the name and the data's type agree."""
    out = []
    for block in body.decode().split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        name = name_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        out.append((name, data))
    return out


# -- messages ---------------------------------------------------------------------


def test_message_echoes_the_last_user_message(client: anthropic.Anthropic, mock: MockAnthropic) -> None:
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=100, messages=user("hi there"))
    message = raw.parse()

    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: hi there"
    assert (message.role, message.model, message.stop_reason) == ("assistant", MODEL, "end_turn")
    assert message.id.startswith("msg_")
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2, 3)
    assert message.usage.cache_read_input_tokens == 0
    assert raw.headers["request-id"].startswith("req_")
    assert "openai-version" not in raw.headers
    Message.model_validate(json.loads(raw.http_response.content))
    (seen,) = mock.requests
    assert seen.path == "/v1/messages"
    assert seen.header("anthropic-version")
    assert (
        seen.header("authorization") == f"Bearer {mock.api_key}"
    )  # the SDK's way; the gateway's is x-api-key


def test_system_prompt_counts_as_cached(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL, max_tokens=100, system="you are terse", messages=user("a b c")
    )
    assert message.usage.cache_read_input_tokens == 3
    assert message.usage.input_tokens == 3


def test_stop_sequences_and_max_tokens(client: anthropic.Anthropic) -> None:
    cut = client.messages.create(
        model=MODEL, max_tokens=100, stop_sequences=["STOP"], messages=user("one STOP two")
    )
    assert cut.content[0].type == "text"
    assert cut.content[0].text == "echo: one "
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", "STOP")

    short = client.messages.create(model=MODEL, max_tokens=2, messages=user("one two three"))
    assert short.content[0].type == "text"
    assert short.content[0].text == "echo: one "
    assert short.stop_reason == "max_tokens"
    assert short.usage.output_tokens == 2


# -- streaming --------------------------------------------------------------------


def test_stream_helper_assembles_the_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=MODEL, max_tokens=100, system="s", messages=user("stream me")
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()

    assert "".join(texts) == "echo: stream me"
    assert final.content[0].type == "text"
    assert final.content[0].text == "echo: stream me"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3
    assert final.usage.cache_read_input_tokens == 1


def test_stream_event_sequence_on_the_wire(raw: httpx.Client) -> None:
    body = {"model": MODEL, "max_tokens": 50, "stream": True, "messages": user("x y")}
    with raw.stream("POST", "/v1/messages", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        events = events_of(response.read())

    for name, data in events:
        if name != "ping":  # the SDK skips pings before parsing, so its union has no type for them
            STREAM_EVENT.validate_python(data)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert (start["content"], start["stop_reason"], start["usage"]["output_tokens"]) == ([], None, 1)
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert events[-2][1]["usage"] == {"output_tokens": 3}


@pytest.mark.anyio
async def test_async_client_streams(mock: MockAnthropic) -> None:
    mock.behave(model=MODEL, chunks=4)
    async with (
        anthropic.AsyncAnthropic(
            base_url=mock.base_url, api_key=mock.api_key, max_retries=0, _strict_response_validation=True
        ) as client,
        client.messages.stream(model=MODEL, max_tokens=100, messages=user("x")) as stream,
    ):
        texts = [t async for t in stream.text_stream]
    assert "".join(texts) == "chunk0 chunk1 chunk2 chunk3 "


# -- tools ------------------------------------------------------------------------


def test_tool_use_when_asked(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=100,
        tools=[WEATHER, CLOCK],
        messages=user('please call get_weather {"city": "Paris"} and call get_time'),
    )
    assert message.stop_reason == "tool_use"
    text, weather, clock = message.content
    assert text.type == "text"
    assert weather.type == "tool_use"
    assert (weather.name, weather.input) == ("get_weather", {"city": "Paris"})
    assert weather.id.startswith("toolu_")
    assert clock.type == "tool_use"
    assert (clock.name, clock.input) == ("get_time", {})


def test_tool_round_trip(client: anthropic.Anthropic) -> None:
    first = client.messages.create(
        model=MODEL, max_tokens=100, tools=[WEATHER], messages=user('call get_weather {"city": "Oslo"}')
    )
    call = first.content[-1]
    assert call.type == "tool_use"
    answer = client.messages.create(
        model=MODEL,
        max_tokens=100,
        tools=[WEATHER],
        messages=[
            *user('call get_weather {"city": "Oslo"}'),
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "-3C"}]},
        ],
    )
    assert answer.stop_reason == "end_turn"
    assert answer.content[0].type == "text"
    assert answer.content[0].text == "tool result: -3C"


def test_tool_use_streamed_is_reassembled_by_the_sdk(client: anthropic.Anthropic, raw: httpx.Client) -> None:
    args = {"city": "Lisbon", "units": "metric", "days": [1, 2, 3]}
    prompt = "call get_weather " + json.dumps(args)
    with client.messages.stream(
        model=MODEL, max_tokens=100, tools=[WEATHER], messages=user(prompt)
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[-1].type == "tool_use"
    assert final.content[-1].input == args

    body = {"model": MODEL, "max_tokens": 100, "stream": True, "tools": [WEATHER], "messages": user(prompt)}
    events = events_of(raw.post("/v1/messages", json=body).content)
    fragments = [
        d["delta"]["partial_json"] for _, d in events if d.get("delta", {}).get("type") == "input_json_delta"
    ]
    assert fragments[0] == ""
    assert len(fragments) > 2
    assert json.loads("".join(fragments)) == args


def test_tool_choice(client: anthropic.Anthropic) -> None:
    forced = client.messages.create(
        model=MODEL, max_tokens=100, tools=[WEATHER, CLOCK], tool_choice={"type": "any"}, messages=user("hi")
    )
    assert [b.type for b in forced.content] == ["tool_use"]  # no text first when a tool is forced

    named = client.messages.create(
        model=MODEL,
        max_tokens=100,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "tool", "name": "get_time"},
        messages=user("call get_weather"),
    )
    assert [(b.type, getattr(b, "name", None)) for b in named.content] == [("tool_use", "get_time")]

    none = client.messages.create(
        model=MODEL,
        max_tokens=100,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        messages=user("call get_weather"),
    )
    assert [b.type for b in none.content] == ["text"]

    single = client.messages.create(
        model=MODEL,
        max_tokens=100,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        messages=user("call get_weather and call get_time"),
    )
    assert [b.type for b in single.content] == ["text", "tool_use"]


def test_forced_single_tool_call_as_a_json_answer(client: anthropic.Anthropic) -> None:
    # What the gateway sends for a JSON response_format: one tool, forced, called once.
    answer: ToolParam = {
        "name": "city_answer",
        "description": "Give your whole answer by calling this tool.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    choice: ToolChoiceToolParam = {"type": "tool", "name": "city_answer", "disable_parallel_tool_use": True}
    asked = 'call city_answer {"city": "Oslo"} and call city_answer {"city": "Rome"}'
    message = client.messages.create(
        model=MODEL, max_tokens=100, tools=[answer], tool_choice=choice, messages=user(asked)
    )
    assert message.stop_reason == "tool_use"
    (call,) = message.content
    assert call.type == "tool_use"
    assert (call.name, call.input) == ("city_answer", {"city": "Oslo"})

    with client.messages.stream(
        model=MODEL, max_tokens=100, tools=[answer], tool_choice=choice, messages=user(asked)
    ) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [("tool_use", {"city": "Oslo"})]


# -- authentication and validation ------------------------------------------------------


def assert_error(err: anthropic.APIStatusError, status: int, kind: str) -> str:
    assert err.status_code == status
    body = err.response.json()
    assert set(body) == {"type", "error", "request_id"}
    assert (body["type"], body["error"]["type"]) == ("error", kind)
    if kind != "request_too_large":  # in the API reference's error list, not (yet) in the SDK's types
        ErrorResponse.model_validate(body)
    message: str = body["error"]["message"]
    return message


def test_wrong_or_missing_key_is_401(mock: MockAnthropic) -> None:
    with sdk(mock, api_key="sk-ant-wrong") as c, pytest.raises(anthropic.AuthenticationError) as exc:
        c.messages.create(model=MODEL, max_tokens=10, messages=user("x"))
    assert assert_error(exc.value, 401, "authentication_error") == "invalid x-api-key"

    response = httpx.post(mock.base_url + "/v1/messages", json={}, headers={"anthropic-version": VERSION})
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "x-api-key header is required"


def test_missing_version_header_is_400(mock: MockAnthropic) -> None:
    omit = {"anthropic-version": anthropic.Omit()}
    with sdk(mock, default_headers=omit) as c, pytest.raises(anthropic.BadRequestError) as exc:
        c.messages.create(model=MODEL, max_tokens=10, messages=user("x"))
    assert mock.requests[0].header("anthropic-version") is None
    assert assert_error(exc.value, 400, "invalid_request_error") == "anthropic-version: header is required"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": MODEL, "messages": user("x")}, "max_tokens: Field required"),
        (
            {"model": MODEL, "max_tokens": 5, "messages": user("x"), "n": 2},
            "n: Extra inputs are not permitted",
        ),
        ({"model": MODEL, "max_tokens": 5, "messages": []}, "messages: at least one message is required"),
        (
            {"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
            "messages.0.role: Input should be 'user' or 'assistant'",
        ),
        (
            {"model": MODEL, "max_tokens": 5, "temperature": 1.5, "messages": user("x")},
            "temperature: Input should be less than or equal to 1",
        ),
        (
            {"model": MODEL, "max_tokens": 5, "tools": [{"name": "f"}], "messages": user("x")},
            "tools.0.input_schema: Field required",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "tools": [{"name": "f", "input_schema": {"type": "array"}}],
                "messages": user("x"),
            },
            "tools.0.input_schema.type: Input should be 'object'",
        ),
        (
            {"model": MODEL, "max_tokens": 5, "metadata": {"user": "u"}, "messages": user("x")},
            "metadata: only user_id is permitted",
        ),
    ],
)
def test_body_checks_are_400(raw: httpx.Client, body: dict[str, Any], message: str) -> None:
    response = raw.post("/v1/messages", json=body)
    assert response.status_code == 400
    assert response.json()["error"] == {"type": "invalid_request_error", "message": message}


def test_tool_results_must_answer_the_previous_tool_use(client: anthropic.Anthropic) -> None:
    stray: list[MessageParam] = [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}
    ]
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model=MODEL, max_tokens=10, messages=stray)
    assert "unexpected `tool_use_id`" in assert_error(exc.value, 400, "invalid_request_error")

    unanswered: list[MessageParam] = [
        *user("x"),
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
        *user("no result"),
    ]
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model=MODEL, max_tokens=10, messages=unanswered)
    assert "without `tool_result` blocks" in assert_error(exc.value, 400, "invalid_request_error")


def test_unknown_path_is_404(raw: httpx.Client) -> None:
    response = raw.post("/v1/complete", json={})
    assert response.status_code == 404
    assert response.json()["error"] == {"type": "not_found_error", "message": "Not Found"}


# -- behaviours ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exc_type", "kind"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (413, anthropic.ContentTooLargeError, "request_too_large"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
def test_behave_status_raises_the_sdk_class(
    client: anthropic.Anthropic,
    mock: MockAnthropic,
    status: int,
    exc_type: type[anthropic.APIStatusError],
    kind: str,
) -> None:
    mock.behave(model=MODEL, status=status, error={"message": f"boom {status}"})
    with pytest.raises(exc_type) as exc:
        client.messages.create(model=MODEL, max_tokens=10, messages=user("x"))
    assert assert_error(exc.value, status, kind) == f"boom {status}"
    if status == 429:
        assert exc.value.response.headers["retry-after"] == "1"


def test_error_event_mid_stream_raises(client: anthropic.Anthropic, mock: MockAnthropic) -> None:
    mock.behave(model=MODEL, chunks=5, error_after=2)
    texts = []
    with (
        pytest.raises(anthropic.APIStatusError) as exc,
        client.messages.stream(model=MODEL, max_tokens=100, messages=user("x")) as stream,
    ):
        for text in stream.text_stream:
            texts.append(text)
    assert texts == ["chunk0 ", "chunk1 "]
    assert isinstance(exc.value.body, dict)
    assert exc.value.body["error"] == {"type": "overloaded_error", "message": "Overloaded"}


def test_reset_mid_stream(client: anthropic.Anthropic, mock: MockAnthropic) -> None:
    mock.behave(model=MODEL, chunks=5, reset_after=1)
    texts = []
    with (
        pytest.raises(httpx2.TransportError),  # the SDK's stream lets its HTTP library's error through
        client.messages.stream(model=MODEL, max_tokens=100, messages=user("x")) as stream,
    ):
        for text in stream.text_stream:
            texts.append(text)
    assert texts == ["chunk0 "]
