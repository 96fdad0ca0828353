"""The Azure mock, checked against the official SDK's `AzureOpenAI` client so it cannot drift into fiction.

Answers are validated strictly (`model_validate`) against the SDK's types, since the
SDK itself parses leniently; Azure's own stream events are shown to fail that check,
which is why the gateway drops them.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
from openai.types import Completion, CreateEmbeddingResponse, ImagesResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from tests.mock_azure import (
    CHOICE_FILTER,
    CONTENT_FILTER_MESSAGE,
    DEPLOYMENTS,
    IMAGE_FILTER,
    PROMPT_FILTER,
    MockAzure,
)
from tests.mock_openai import embedding_vector

VERSION = "2024-10-21"
CHAT_MODEL = DEPLOYMENTS["chat-dep"].model
TOOLS: list[dict[str, object]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def server() -> Iterator[MockAzure]:
    mock = MockAzure()
    with mock:
        yield mock


@pytest.fixture
def mock(server: MockAzure) -> Iterator[MockAzure]:
    server.reset()
    yield server
    server.reset()


def azure(
    mock: MockAzure,
    api_key: str | None = None,
    api_version: str = VERSION,
    azure_deployment: str | None = None,
) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=mock.url,
        azure_deployment=azure_deployment,
        api_key=api_key or mock.api_key,
        api_version=api_version,
        max_retries=0,
        timeout=10,
    )


@pytest.fixture
def client(mock: MockAzure) -> Iterator[openai.AzureOpenAI]:
    with azure(mock) as c:
        yield c


@pytest.fixture
def raw(mock: MockAzure) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mock.url, headers={"api-key": mock.api_key}, timeout=10) as c:
        yield c


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def data_events(body: bytes) -> list[dict[str, object]]:
    """The JSON events of an SSE body, asserting Azure's framing (compact JSON, `[DONE]` last)."""
    assert body.endswith(b"data: [DONE]\n\n")
    events = body.split(b"\n\n")[:-2]
    out = []
    for event in events:
        assert event.startswith(b"data: {"), event
        assert b'": ' not in event and b'", "' not in event  # compact, as Azure writes it
        out.append(json.loads(event.removeprefix(b"data: ")))
    return out


# -- requests -------------------------------------------------------------------------------


def test_chat_uses_the_deployment_url_api_version_and_api_key(
    client: openai.AzureOpenAI, mock: MockAzure
) -> None:
    completion = client.chat.completions.create(model="chat-dep", messages=user("hi there"))

    ChatCompletion.model_validate(completion.model_dump())
    assert completion.choices[0].message.content == "echo: hi there"
    assert completion.model == CHAT_MODEL  # the model behind the deployment, not its name
    (seen,) = mock.requests
    assert (seen.method, seen.path, seen.query) == (
        "POST",
        "/openai/deployments/chat-dep/chat/completions",
        f"api-version={VERSION}",
    )
    assert seen.header("api-key") == mock.api_key
    assert seen.header("authorization") is None
    assert seen.json()["model"] == "chat-dep"


def test_chat_answer_carries_azures_filter_results(client: openai.AzureOpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="chat-dep", messages=user("hello"))
    body = json.loads(raw.content)

    assert body["prompt_filter_results"] == [{"prompt_index": 0, "content_filter_results": PROMPT_FILTER}]
    assert body["choices"][0]["content_filter_results"] == CHOICE_FILTER
    assert "service_tier" not in body
    assert raw.headers["apim-request-id"]
    assert raw.headers["x-ms-region"]


def test_a_body_without_model_is_served_by_the_url(raw: httpx.Client, mock: MockAzure) -> None:
    response = raw.post(
        f"/openai/deployments/chat-dep/chat/completions?api-version={VERSION}",
        json={"messages": user("no model field")},
    )

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: no model field"


def test_client_with_azure_deployment_reaches_the_same_url(mock: MockAzure) -> None:
    with azure(mock, azure_deployment="chat-dep") as client:
        client.chat.completions.create(model="ignored", messages=user("x"))

    assert mock.requests[0].path == "/openai/deployments/chat-dep/chat/completions"


# -- streams --------------------------------------------------------------------------------


def test_stream_starts_with_the_prompt_filter_event_and_rates_each_piece(
    client: openai.AzureOpenAI,
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="chat-dep", messages=user("one two"), stream=True, stream_options={"include_usage": True}
    )
    events = data_events(raw.http_response.read())

    first, role, *content, finish, usage = events
    assert first == {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": PROMPT_FILTER}],
    }
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionChunk.model_validate(first)  # not an OpenAI chunk: the gateway drops it
    for chunk in (role, *content, finish, usage):
        ChatCompletionChunk.model_validate(chunk)
        assert chunk["model"] == CHAT_MODEL
    assert [c["choices"][0]["delta"]["content"] for c in content] == ["echo: ", "one ", "two"]  # type: ignore[index]
    assert all(c["choices"][0]["content_filter_results"] == CHOICE_FILTER for c in content)  # type: ignore[index]
    assert role["choices"][0]["content_filter_results"] == {}  # type: ignore[index]
    assert finish["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert usage["choices"] == []
    assert usage["usage"]["total_tokens"] == 7  # type: ignore[index]


def test_async_filter_deployment_adds_annotation_events_without_delta(client: openai.AzureOpenAI) -> None:
    with client.chat.completions.create(model="chat-async", messages=user("a b c"), stream=True) as stream:
        chunks = list(stream)

    annotations = [c for c in chunks if not c.id]  # Azure's own events: no id, and an empty object
    assert len(annotations) == 3  # the prompt filter, one mid-stream, one after the finish
    offsets = [c.choices[0].model_extra["content_filter_offsets"] for c in annotations[1:]]  # type: ignore[index]
    assert [o["end_offset"] for o in offsets] == [6, 11]
    assert all(c.choices[0].delta is None for c in annotations[1:])  # breaks `choices[0].delta.content`
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.id and c.choices)
    assert text == "echo: a b c"


def test_sdk_stream_helper_skips_azures_events(client: openai.AzureOpenAI) -> None:
    with client.chat.completions.stream(model="chat-async", messages=user("kept whole")) as stream:
        completion = stream.get_final_completion()

    assert completion.choices[0].message.content == "echo: kept whole"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == DEPLOYMENTS["chat-async"].model


# -- On Your Data --------------------------------------------------------------------------------

SEARCH = {
    "type": "azure_search",
    "parameters": {
        "endpoint": "https://search.mock",
        "index_name": "handbook",
        "authentication": {"type": "api_key", "key": "search-key"},
    },
}


def test_on_your_data_answer_carries_context_citations_and_intent(
    client: openai.AzureOpenAI, mock: MockAzure
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="chat-dep", messages=user("leave policy"), extra_body={"data_sources": [SEARCH]}
    )
    completion = raw.parse()
    answer = json.loads(raw.http_response.content)
    assert answer["object"] == "extensions.chat.completion"
    # OpenAI's type but for `object`, and the message's additions the SDK keeps as extras.
    ChatCompletion.model_validate({**answer, "object": "chat.completion"})
    message = completion.choices[0].message
    assert message.content == "echo: leave policy"
    context = (message.model_extra or {})["context"]
    assert json.loads(context["intent"]) == ["leave policy"]
    (citation,) = context["citations"]
    assert set(citation) == {"content", "title", "url", "filepath", "chunk_id"}
    assert citation["url"] == "https://search.mock/handbook/doc1.md"
    assert (message.model_extra or {})["end_turn"] is True
    assert mock.requests[0].json()["data_sources"] == [SEARCH]


def test_on_your_data_stream_sends_the_context_with_the_role(client: openai.AzureOpenAI) -> None:
    with client.chat.completions.create(
        model="chat-dep", messages=user("leave policy"), stream=True, extra_body={"data_sources": [SEARCH]}
    ) as stream:
        chunks = [c for c in stream if c.id]  # less the prompt-filter event

    assert {c.object for c in chunks} == {"extensions.chat.completion.chunk"}
    role, *content, finish = chunks
    assert role.choices[0].delta.role == "assistant"
    context = (role.choices[0].delta.model_extra or {})["context"]
    assert context["citations"][0]["title"] == "handbook-doc1"
    assert all("context" not in (c.choices[0].delta.model_extra or {}) for c in (*content, finish))
    assert "".join(c.choices[0].delta.content or "" for c in content) == "echo: leave policy"
    assert [(c.choices[0].model_extra or {})["end_turn"] for c in chunks] == [False] * (len(chunks) - 1) + [
        True
    ]
    assert finish.choices[0].finish_reason == "stop"


def test_sdk_stream_helper_skips_on_your_data_chunks(client: openai.AzureOpenAI) -> None:
    # Their `object` is not "chat.completion.chunk": the helper's Azure filter drops them all.
    with client.chat.completions.stream(
        model="chat-dep", messages=user("leave policy"), extra_body={"data_sources": [SEARCH]}
    ) as stream:
        kinds = [event.type for event in stream]
    assert kinds == []


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"data_sources": []}, "exactly one data source"),
        ({"data_sources": [SEARCH, SEARCH]}, "exactly one data source"),
        ({"data_sources": [{"type": "bing", "parameters": {}}]}, "unknown data source type"),
        ({"data_sources": [{"type": "azure_search"}]}, "Required property"),
        ({"data_sources": [SEARCH], "logprobs": True}, "not supported with data_sources"),
    ],
)
def test_on_your_data_request_checks_are_400(
    client: openai.AzureOpenAI, extra: dict[str, Any], says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="chat-dep", messages=user("x"), extra_body=extra)
    assert exc.value.code == "BadRequest"
    assert says in exc.value.message


@pytest.mark.anyio
async def test_async_client_streams(mock: MockAzure) -> None:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=mock.url, api_key=mock.api_key, api_version=VERSION, max_retries=0, timeout=10
    ) as client:
        stream = await client.chat.completions.create(model="chat-dep", messages=user("async"), stream=True)
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]

    assert "".join(p or "" for p in pieces) == "echo: async"


def test_completions_plain_and_streamed(client: openai.AzureOpenAI) -> None:
    completion = client.completions.create(model="instruct-dep", prompt="say this")
    Completion.model_validate(completion.model_dump())
    assert completion.choices[0].text == "echo: say this"
    assert completion.model_extra is not None
    assert completion.model_extra["prompt_filter_results"][0]["content_filter_results"] == PROMPT_FILTER

    raw = client.completions.with_raw_response.create(model="instruct-dep", prompt="p q", stream=True)
    first, *chunks = data_events(raw.http_response.read())
    assert first["object"] == "" and first["choices"] == []
    assert "".join(c["choices"][0]["text"] for c in chunks) == "echo: p q"  # type: ignore[index]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert all(c["model"] == DEPLOYMENTS["instruct-dep"].model for c in chunks)


# -- embeddings, images --------------------------------------------------------------------


def test_embeddings_single_batch_and_base64(client: openai.AzureOpenAI) -> None:
    single = client.embeddings.create(model="embed-dep", input="hello")
    batch = client.embeddings.create(model="embed-dep", input=["a", "b", "c"])
    packed = client.embeddings.with_raw_response.create(
        model="embed-dep", input="hello", encoding_format="base64"
    )

    CreateEmbeddingResponse.model_validate(batch.model_dump())
    assert single.data[0].embedding == embedding_vector("hello")
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert batch.model == DEPLOYMENTS["embed-dep"].model
    vector = json.loads(packed.content)["data"][0]["embedding"]
    assert list(struct.unpack("<8f", base64.b64decode(vector))) == embedding_vector("hello")


def test_images_carry_filter_results(client: openai.AzureOpenAI) -> None:
    by_url = client.images.generate(model="image-dep", prompt="a cat")
    as_b64 = client.images.generate(model="image-dep", prompt="a cat", response_format="b64_json")

    ImagesResponse.model_validate(by_url.model_dump())
    image = by_url.data[0]  # type: ignore[index]
    assert image.url
    assert image.model_extra == {
        "content_filter_results": IMAGE_FILTER,
        "prompt_filter_results": PROMPT_FILTER,
    }
    assert base64.b64decode(as_b64.data[0].b64_json or "").startswith(b"\x89PNG")  # type: ignore[index]


# -- tools ----------------------------------------------------------------------------------


def test_tool_call_round_trip(client: openai.AzureOpenAI, mock: MockAzure) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Paris"}]
    first = client.chat.completions.create(model="chat-dep", messages=messages, tools=TOOLS)  # type: ignore[arg-type]

    ChatCompletion.model_validate(first.model_dump())
    (call,) = first.choices[0].message.tool_calls or []
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]

    messages += [
        first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"},
    ]
    answer = client.chat.completions.create(model="chat-dep", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "echo: sunny, 21C"
    assert mock.requests[-1].json()["messages"][-1]["tool_call_id"] == call.id


def test_streamed_tool_call_is_reassembled_by_the_sdk(client: openai.AzureOpenAI) -> None:
    with client.chat.completions.stream(
        model="chat-dep",
        messages=[{"role": "user", "content": "Lisbon"}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream_options={"include_usage": True},
    ) as stream:
        completion = stream.get_final_completion()

    (call,) = completion.choices[0].message.tool_calls or []
    assert json.loads(call.function.arguments) == {"city": "Lisbon"}
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage is not None


# -- errors ---------------------------------------------------------------------------------


def test_wrong_key_is_azures_401(mock: MockAzure) -> None:
    with azure(mock, api_key="wrong") as client, pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(model="chat-dep", messages=user("x"))

    assert err.value.code == "401"
    assert "invalid subscription key" in err.value.message


def test_missing_key_is_a_401_saying_so(mock: MockAzure) -> None:
    with httpx.Client(base_url=mock.url, timeout=10) as plain:
        response = plain.post(f"/openai/deployments/chat-dep/chat/completions?api-version={VERSION}", json={})

    assert response.status_code == 401
    assert "missing subscription key" in response.json()["error"]["message"]


def test_api_version_missing_is_404_and_unknown_is_400(raw: httpx.Client, mock: MockAzure) -> None:
    missing = raw.post("/openai/deployments/chat-dep/chat/completions", json={"messages": user("x")})
    with azure(mock, api_version="2023-01-01") as client, pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="chat-dep", messages=user("x"))

    assert (missing.status_code, missing.json()) == (
        404,
        {"error": {"code": "404", "message": "Resource not found"}},
    )
    assert err.value.body == {"code": "BadRequest", "message": "API version not supported"}


def test_unknown_path_and_method_are_404(raw: httpx.Client) -> None:
    assert raw.post(f"/openai/deployments/chat-dep/audio/speech?api-version={VERSION}").status_code == 404
    assert raw.get(f"/openai/deployments/chat-dep/chat/completions?api-version={VERSION}").status_code == 404


def test_unknown_deployment_is_deployment_not_found(client: openai.AzureOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-dep", messages=user("x"))

    assert err.value.code == "DeploymentNotFound"


def test_operation_the_model_lacks_is_400(client: openai.AzureOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="chat-dep", input="x")

    assert err.value.code == "OperationNotSupported"
    assert CHAT_MODEL in err.value.message


def test_content_filter_400(client: openai.AzureOpenAI, mock: MockAzure) -> None:
    mock.filter_prompt("chat-dep", category="sexual", severity="medium")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="chat-dep", messages=user("x"))

    body = err.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["param"], body["type"], body["message"]) == (
        "content_filter",
        "prompt",
        None,
        CONTENT_FILTER_MESSAGE,
    )
    assert body["innererror"]["content_filter_result"]["sexual"] == {"filtered": True, "severity": "medium"}


def test_throttle_429_sends_both_retry_headers(client: openai.AzureOpenAI, mock: MockAzure) -> None:
    mock.throttle("chat-dep", retry_after=4)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="chat-dep", messages=user("x"))

    headers = err.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("4", "4000")
    assert err.value.code == "429"
    assert "Please retry after 6 seconds" in err.value.message


@pytest.mark.parametrize(
    ("status", "exception", "code"),
    [
        (403, openai.PermissionDeniedError, "AuthenticationTypeDisabled"),
        (429, openai.RateLimitError, "429"),
        (500, openai.InternalServerError, "InternalServerError"),
        (503, openai.InternalServerError, "ServiceUnavailable"),
    ],
)
def test_behave_status_uses_azures_error_bodies(
    client: openai.AzureOpenAI,
    mock: MockAzure,
    status: int,
    exception: type[openai.APIStatusError],
    code: str,
) -> None:
    mock.behave(model="chat-dep", status=status)
    with pytest.raises(exception) as err:
        client.chat.completions.create(model="chat-dep", messages=user("x"))

    assert err.value.status_code == status
    assert err.value.code == code
    if status == 429:
        assert err.value.response.headers["retry-after-ms"] == "1000"
