"""The Azure OpenAI adapter: config, request targets and headers, the stream filter, error mapping."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from gateway.config import ConfigError, parse
from gateway.errors import InvalidRequest
from gateway.providers import Capability, Operation, Target, build_adapter
from gateway.providers.azure import (
    DEFAULT_API_VERSION,
    AzureOpenAIAdapter,
    AzureOpenAIConfig,
    AzureStreamFilter,
)
from tests.mock_azure import CONTENT_FILTER_MESSAGE, content_filter_error

KEY = "azure-key-0123456789abcdef"
ENDPOINT = "https://contoso.openai.azure.com"


def config(**fields: object) -> AzureOpenAIConfig:
    return AzureOpenAIConfig(**{"base_url": ENDPOINT, "api_key": KEY, **fields})  # type: ignore[arg-type]


def adapter(base_path: str = "", **fields: object) -> AzureOpenAIAdapter:
    built = build_adapter("azure", config(**fields), base_path)
    assert isinstance(built, AzureOpenAIAdapter)
    return built


def error(status: int, raw: Any) -> tuple[int, dict[str, Any]]:
    body = orjson.dumps(raw) if isinstance(raw, dict) else raw.encode() if isinstance(raw, str) else raw
    out_status, out = adapter().translate_error(status, body)
    parsed = orjson.loads(out)
    assert set(parsed) == {"error"}
    assert set(parsed["error"]) == {"message", "type", "param", "code"}
    assert isinstance(parsed["error"]["type"], str)
    return out_status, parsed["error"]


# -- config -----------------------------------------------------------------------------------


def test_config_from_yaml_with_defaults() -> None:
    parsed = parse(f"providers:\n  az: {{type: azure_openai, base_url: '{ENDPOINT}', api_key: {KEY}}}\n", {})
    provider = parsed.providers["az"]

    assert isinstance(provider, AzureOpenAIConfig)
    assert provider.api_version == DEFAULT_API_VERSION == "2024-10-21"
    assert provider.enabled
    assert all(provider.supports(capability) for capability in Capability)


def test_api_version_is_configurable_and_checked() -> None:
    assert config(api_version="2025-04-01-preview").api_version == "2025-04-01-preview"
    with pytest.raises(ConfigError) as info:
        parse(
            f"providers:\n  az: {{type: azure_openai, base_url: '{ENDPOINT}', api_key: k, api_version: latest}}\n",
            {},
        )
    assert info.value.problems[0].startswith("providers.az.api_version: Expected `str` matching regex")


@pytest.mark.parametrize(("base_url", "api_key"), [("", KEY), (ENDPOINT, "")])
def test_no_default_endpoint_so_empty_base_url_or_key_disables(base_url: str, api_key: str) -> None:
    assert AzureOpenAIConfig.default_base_url == ""
    assert not AzureOpenAIConfig(base_url=base_url, api_key=api_key).enabled


@pytest.mark.parametrize("path", ["/openai", "/openai/", "/openai/deployments/gpt4", "/apim/openai"])
def test_sdk_style_base_url_is_refused(path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(f"providers:\n  az: {{type: azure_openai, base_url: '{ENDPOINT}{path}', api_key: k}}\n", {})
    assert info.value.problems == [
        "providers.az: base_url: give the resource endpoint (https://NAME.openai.azure.com), "
        "without /openai or a deployment path"
    ]


def test_a_path_prefix_that_is_not_openai_is_kept() -> None:
    assert (
        config(base_url="https://apim.example.com/my-openai-proxy/").url
        == "https://apim.example.com/my-openai-proxy"
    )


# -- requests ---------------------------------------------------------------------------------


def test_key_goes_in_api_key_header_only() -> None:
    headers = adapter(headers={"X-Team": "search"}).keys.keys[0].headers

    assert headers == [
        (b"content-type", b"application/json"),
        (b"api-key", KEY.encode()),
        (b"x-team", b"search"),
    ]
    assert not any(name == b"authorization" for name, _ in headers)


@pytest.mark.parametrize(
    ("op", "path"),
    [
        (Operation.chat, "chat/completions"),
        (Operation.completions, "completions"),
        (Operation.embeddings, "embeddings"),
        (Operation.images, "images/generations"),
    ],
)
def test_target_is_the_deployment_url_with_api_version(op: Operation, path: str) -> None:
    target = adapter().target(op, Target("gpt-4o-prod"))

    assert target == f"/openai/deployments/gpt-4o-prod/{path}?api-version=2024-10-21".encode()


def test_target_keeps_a_base_path_uses_the_configured_version_and_quotes_the_name() -> None:
    azure = adapter("/aoai", api_version="2025-04-01-preview")

    first = azure.target(Operation.chat, Target("odd name/x"))
    assert first == b"/aoai/openai/deployments/odd%20name%2Fx/chat/completions?api-version=2025-04-01-preview"
    assert azure.target(Operation.chat, Target("odd name/x")) == first


def test_body_names_the_deployment_and_is_otherwise_the_clients() -> None:
    body = {"model": "alias", "messages": [{"role": "user", "content": "hi"}], "user": "u1"}

    encoded = adapter().encode_body(Operation.chat, dict(body), Target("gpt-4o-prod"))

    assert orjson.loads(encoded) == {**body, "model": "gpt-4o-prod"}


@pytest.mark.parametrize(
    ("fields", "asked"),
    [
        ({}, True),  # the default version, 2024-10-21, accepts stream_options
        ({"api_version": "2024-08-01-preview"}, True),
        ({"api_version": "2024-06-01"}, False),  # older versions refuse the field
        ({"api_version": "2024-06-01", "stream_usage": True}, True),
        ({"stream_usage": False}, False),
    ],
)
def test_a_stream_asks_for_usage_where_the_api_version_accepts_it(
    fields: dict[str, Any], asked: bool
) -> None:
    body = {"model": "alias", "messages": [], "stream": True}

    azure = adapter(**fields)
    sent = orjson.loads(azure.encode_body(Operation.chat, dict(body), Target("d")))
    translator = azure.stream_translator(Operation.chat, body)

    assert ("stream_options" in sent) is asked
    if asked:
        assert sent["stream_options"] == {"include_usage": True}
    assert isinstance(translator, AzureStreamFilter)
    assert translator.feed(USAGE_EVENT) == (b"" if asked else USAGE_EVENT)


SOURCES = [{"type": "azure_search", "parameters": {"endpoint": "https://x", "index_name": "docs"}}]


@pytest.mark.parametrize(
    ("allow", "param", "says"),
    [
        (False, "data_sources", "On Your Data is not enabled for this provider"),
        (False, "dataSources", "the 2023 previews' spelling"),
        (True, "dataSources", "the 2023 previews' spelling"),
    ],
)
def test_on_your_data_is_refused_naming_provider_and_parameter(allow: bool, param: str, says: str) -> None:
    body = {"messages": [], param: SOURCES}

    with pytest.raises(InvalidRequest) as info:
        adapter(allow_data_sources=allow).encode_body(Operation.chat, body, Target("gpt-4o-prod"))

    assert info.value.status == 400
    assert info.value.param == param
    assert info.value.message.startswith(f"Provider 'azure' (azure_openai) does not accept '{param}': ")
    assert says in info.value.message


def test_on_your_data_is_relayed_where_the_provider_allows_it() -> None:
    body = {"messages": [], "data_sources": SOURCES}
    sent = orjson.loads(
        adapter(allow_data_sources=True).encode_body(Operation.chat, body, Target("gpt-4o-prod"))
    )
    assert sent == {"messages": [], "data_sources": SOURCES, "model": "gpt-4o-prod"}


@pytest.mark.parametrize("version", ["2024-02-01", "2024-02-15-preview", "2024-10-21", "2025-04-01-preview"])
def test_allow_data_sources_takes_api_versions_that_accept_it(version: str) -> None:
    assert config(allow_data_sources=True, api_version=version).allow_data_sources


def test_allow_data_sources_on_an_older_api_version_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse(
            f"providers:\n  az: {{type: azure_openai, base_url: '{ENDPOINT}', api_key: k, "
            "api_version: 2023-12-01-preview, allow_data_sources: true}\n",
            {},
        )
    assert info.value.problems == [
        "providers.az: allow_data_sources: On Your Data's data_sources needs api_version 2024-02-01 or later "
        "(this entry has 2023-12-01-preview)"
    ]


def test_json_answers_are_relayed_untranslated() -> None:
    assert adapter().translates is False


# -- streams ----------------------------------------------------------------------------------

PROMPT_FILTER = (
    b'data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":'
    b'[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}\n\n'
)
ANNOTATION = (
    b'data: {"choices":[{"index":0,"finish_reason":null,"content_filter_results":{},'
    b'"content_filter_offsets":{"check_offset":0,"start_offset":0,"end_offset":9}}],'
    b'"created":0,"id":"","model":"","object":""}\n\n'
)


def chunk(content: str) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": None, "content_filter_results": {}}
    event = {
        "choices": [choice],
        "created": 1,
        "id": "chatcmpl-1",
        "model": "gpt-4o",
        "object": "chat.completion.chunk",
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


STREAM = PROMPT_FILTER + chunk("Hello") + ANNOTATION + chunk(' "object":"" ') + chunk("!") + ANNOTATION
EXPECTED = chunk("Hello") + chunk(' "object":"" ') + chunk("!") + b"data: [DONE]\n\n"


def run(pieces: list[bytes]) -> bytes:
    stream = AzureStreamFilter()
    return b"".join(stream.feed(piece) for piece in pieces) + stream.finish()


def test_filter_drops_azures_events_and_relays_the_rest_byte_for_byte() -> None:
    assert run([STREAM + b"data: [DONE]\n\n"]) == EXPECTED


def test_filter_keeps_on_your_data_chunks_and_their_context() -> None:
    # On Your Data's chunks name another `object`; the first carries the citations beside the role.
    context = {"citations": [{"content": "c", "title": "t", "url": None, "filepath": None, "chunk_id": "0"}]}
    head = {"index": 0, "delta": {"role": "assistant", "context": {**context, "intent": '["q"]'}}}
    event = {"id": "x", "model": "gpt-4o", "created": 1, "object": "extensions.chat.completion.chunk"}
    first = b"data: " + orjson.dumps(
        {**event, "choices": [{**head, "end_turn": False, "finish_reason": None}]}
    )
    stream = PROMPT_FILTER + first + b"\n\n" + chunk("Hi") + b"data: [DONE]\n\n"
    assert run([stream]) == first + b"\n\n" + chunk("Hi") + b"data: [DONE]\n\n"
    assert run([stream[i : i + 3] for i in range(0, len(stream), 3)]) == run([stream])


def test_filter_is_used_for_streams() -> None:
    assert isinstance(adapter().stream_translator(Operation.chat, {"stream": True}), AzureStreamFilter)


def test_filter_output_does_not_depend_on_how_reads_split_the_stream() -> None:
    data = STREAM + b"data: [DONE]\n\n"
    assert run([data[i : i + 1] for i in range(len(data))]) == EXPECTED
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
        assert run([data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]) == EXPECTED


def test_filter_passes_a_read_without_marker_as_is_and_holds_only_a_partial_line() -> None:
    stream = AzureStreamFilter()
    read = chunk("a") + chunk("b")

    assert stream.feed(read) is read
    assert stream.feed(b'data: {"choi') == b""
    assert stream.feed(b'ces":[]}\n\n') == b'data: {"choices":[]}\n\n'


def test_filter_handles_crlf_and_spaced_json() -> None:
    spaced = b'data: {"choices": [], "object": "", "prompt_filter_results": []}\r\n\r\n'
    kept = b'data: {"choices": [], "object": "chat.completion.chunk"}\r\n\r\n'

    assert run([spaced + kept + b"data: [DONE]\r\n\r\n"]) == kept + b"data: [DONE]\r\n\r\n"


def test_filter_finish_returns_an_unterminated_tail_unless_it_is_an_annotation() -> None:
    stream = AzureStreamFilter()
    stream.feed(b"data: [DONE]")
    assert stream.finish() == b"data: [DONE]"

    stream = AzureStreamFilter()
    stream.feed(PROMPT_FILTER.rstrip(b"\n"))
    assert stream.finish() == b""


def test_filter_drops_every_line_of_an_annotation_event() -> None:
    event = PROMPT_FILTER.rstrip(b"\n") + b"\nid: 7\n\n"
    assert run([event + chunk("x"), b"data: [DONE]\n\n"]) == chunk("x") + b"data: [DONE]\n\n"


USAGE_EVENT = (
    b'data: {"choices":[],"created":1,"id":"chatcmpl-1","model":"gpt-4o","object":"chat.completion.chunk",'
    b'"usage":{"completion_tokens":3,"prompt_tokens":8,"total_tokens":11}}\n\n'
)


def test_filter_drops_azures_events_and_the_usage_event_split_anywhere() -> None:
    nulls = STREAM.replace(
        b'"object":"chat.completion.chunk"}', b'"object":"chat.completion.chunk","usage":null}'
    )
    data = nulls + USAGE_EVENT + b"data: [DONE]\n\n"
    expected = EXPECTED.replace(
        b'"object":"chat.completion.chunk"}', b'"object":"chat.completion.chunk","usage":null}'
    )
    assert expected != EXPECTED
    for at in range(len(data) + 1):
        stream = AzureStreamFilter(strip_usage=True)
        out = stream.feed(data[:at]) + stream.feed(data[at:]) + stream.finish()
        assert out == expected, at
        assert stream.usage == (8, 3)


def test_filter_keeps_the_usage_event_when_the_client_asked_for_it() -> None:
    stream = AzureStreamFilter()
    assert stream.feed(PROMPT_FILTER + USAGE_EVENT) == USAGE_EVENT
    assert stream.usage is None


def test_filter_keeps_comments_and_other_fields_between_events() -> None:
    heartbeat = b": keep-alive\n\n"
    assert run([heartbeat + PROMPT_FILTER + heartbeat + chunk("x")]) == heartbeat + heartbeat + chunk("x")


# -- errors -----------------------------------------------------------------------------------


def test_content_filter_keeps_message_and_names_what_was_filtered() -> None:
    status, body = error(400, content_filter_error("violence", "high"))

    assert status == 400
    assert body == {
        "message": CONTENT_FILTER_MESSAGE + " (filtered: violence high)",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "content_filter",
    }


def test_jailbreak_and_image_content_filter_spellings() -> None:
    _, jailbreak = error(400, content_filter_error("jailbreak"))
    image = {
        "error": {
            "code": "contentFilter",
            "message": "Your task failed as a result of our safety system.",
            "inner_error": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_results": {
                    "sexual": {"filtered": True, "severity": "high"},
                    "hate": {"filtered": False},
                },
                "revised_prompt": "x",
            },
        }
    }
    _, images = error(400, image)

    assert jailbreak["message"] == CONTENT_FILTER_MESSAGE + " (filtered: jailbreak)"
    assert images == {
        "message": "Your task failed as a result of our safety system. (filtered: sexual high)",
        "type": "invalid_request_error",
        "param": None,
        "code": "content_filter",
    }


def test_inner_error_without_filter_results_adds_nothing() -> None:
    raw = {
        "error": {
            "code": "content_filter",
            "message": "Filtered.",
            "innererror": {"code": "ResponsibleAIPolicyViolation"},
        }
    }
    assert error(400, raw)[1]["message"] == "Filtered."
    raw["error"]["innererror"] = {"content_filter_result": {"hate": {"filtered": False, "severity": "safe"}}}
    assert error(400, raw)[1]["message"] == "Filtered."


def test_429_is_a_rate_limit_error_with_the_message_kept() -> None:
    message = "Requests to the ChatCompletions_Create Operation ... Please retry after 6 seconds."
    status, body = error(429, {"error": {"code": "429", "message": message}})

    assert status == 429
    assert body == {
        "message": message,
        "type": "rate_limit_exceeded",
        "param": None,
        "code": "rate_limit_exceeded",
    }


def test_401_says_the_provider_rejected_the_gateways_key() -> None:
    message = "Access denied due to invalid subscription key or wrong API endpoint."
    status, body = error(401, {"error": {"code": "401", "message": message}})

    assert status == 401
    assert body == {
        "message": f"Upstream provider 'azure' answered 401: {message}",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_api_management_shape_is_wrapped() -> None:
    message = "Access denied due to invalid subscription key. Make sure to provide a valid key."
    status, body = error(401, {"statusCode": 401, "message": message})

    assert status == 401
    assert body["message"] == f"Upstream provider 'azure' answered 401: {message}"
    assert body["code"] is None


def test_deployment_not_found_is_model_not_found() -> None:
    raw = {
        "error": {
            "code": "DeploymentNotFound",
            "message": "The API deployment for this resource does not exist.",
        }
    }
    status, body = error(404, raw)

    assert status == 404
    assert body["code"] == "model_not_found"
    assert (
        body["message"]
        == "Upstream provider 'azure' answered 404: The API deployment for this resource does not exist."
    )


def test_openai_shaped_errors_keep_their_fields() -> None:
    raw = {
        "error": {
            "message": "This model's maximum context length is 128000 tokens.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
            "status": 400,
        }
    }
    assert error(400, raw) == (400, {k: v for k, v in raw["error"].items() if k != "status"})


@pytest.mark.parametrize(
    ("status", "code", "expected_code", "expected_type"),
    [
        (500, "InternalServerError", "InternalServerError", "server_error"),
        (503, 503, None, "server_error"),
        (408, "Timeout", "Timeout", "invalid_request_error"),
        (400, None, None, "invalid_request_error"),
    ],
)
def test_type_and_code_for_other_statuses(
    status: int, code: object, expected_code: str | None, expected_type: str
) -> None:
    out_status, body = error(status, {"error": {"code": code, "message": "Something.", "param": 5}})

    assert out_status == status
    assert (body["code"], body["type"], body["param"]) == (expected_code, expected_type, None)
    assert body["message"] == "Something."


@pytest.mark.parametrize(
    "raw",
    [b"<html>Bad Gateway</html>", b"", b"[1, 2]", b'{"a": 1}', b'{"error": {"code": "InternalServerError"}}'],
)
@pytest.mark.parametrize("status", [502, 404])
def test_bodies_in_no_azure_shape_are_left_to_the_gateway(status: int, raw: bytes) -> None:
    assert adapter().translate_error(status, raw) == (status, None)
