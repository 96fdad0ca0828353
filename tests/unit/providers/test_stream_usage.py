"""A stream's usage, asked for by the gateway: what goes upstream, and the usage event kept from a client
that did not ask for it (OpenAI family), or counted by the translators (Anthropic, Cohere)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from gateway import parse
from gateway.providers import Operation, Target, build_adapter
from gateway.providers.base import UsageFilter
from gateway.providers.openai import OpenAIAdapter

CHAT = Operation.chat


def event(obj: dict[str, Any], compact: bool = True) -> bytes:
    return b"data: " + (orjson.dumps(obj) if compact else json.dumps(obj).encode()) + b"\n\n"


def chunk(content: str, compact: bool = True, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}
    return event({"id": "c1", "object": "chat.completion.chunk", "choices": [choice], **extra}, compact)


def usage_event(compact: bool = True, choices: Any = ()) -> bytes:
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    listed = None if choices is None else list(choices)
    return event({"id": "c1", "object": "chat.completion.chunk", "choices": listed, "usage": usage}, compact)


DONE = b"data: [DONE]\n\n"


def run(pieces: list[bytes]) -> tuple[bytes, tuple[int, int] | None]:
    stream = UsageFilter()
    out = b"".join(stream.feed(piece) for piece in pieces) + stream.finish()
    return out, stream.usage


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "spaced"])
def test_the_usage_event_is_dropped_and_counted_wherever_reads_split_the_stream(compact: bool) -> None:
    body = chunk("Hi", compact, usage=None) + chunk(' "usage":{ ', compact, usage=None)
    data = body + usage_event(compact) + DONE
    for at in range(len(data) + 1):
        for at2 in (at, min(len(data), at + 7)):
            out, usage = run([data[:at], data[at:at2], data[at2:]])
            assert (out, usage) == (body + DONE, (9, 4)), (at, at2)
    out, usage = run([data[i : i + 1] for i in range(len(data))])
    assert (out, usage) == (body + DONE, (9, 4))


def test_usage_null_chunks_pass_untouched_and_uncopied() -> None:
    stream = UsageFilter()
    read = chunk("a", usage=None) + chunk("b", usage=None)
    assert stream.feed(read) is read
    assert stream.usage is None


def test_only_a_partial_line_is_held_back() -> None:
    stream = UsageFilter()
    first = chunk("a", usage=None)
    assert stream.feed(first + b'data: {"id":"c1","cho') == first
    assert stream.feed(b'ices":[]}\n\n') == b'data: {"id":"c1","choices":[]}\n\n'


def test_after_the_usage_event_reads_are_relayed_as_they_come() -> None:
    stream = UsageFilter()
    assert stream.feed(usage_event()) == b""
    tail = b"data: [DO"
    assert stream.feed(tail) is tail


@pytest.mark.parametrize("choices", [None, ()], ids=["null", "empty"])
def test_crlf_and_choices_null_or_missing(choices: Any) -> None:
    data = chunk("a") + usage_event(choices=choices) + DONE
    crlf = data.replace(b"\n", b"\r\n")
    assert run([crlf[:40], crlf[40:]]) == (
        chunk("a").replace(b"\n", b"\r\n") + b"data: [DONE]\r\n\r\n",
        (9, 4),
    )
    missing = usage_event().replace(b'"choices":[],', b"")
    assert run([missing + DONE]) == (DONE, (9, 4))


def test_a_content_chunk_carrying_usage_is_relayed() -> None:
    # Servers that put a running usage in content chunks: nothing of the answer may be lost.
    running = chunk("x", usage={"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10})
    data = running + usage_event() + DONE
    assert run([data]) == (running + DONE, (9, 4))


def test_an_unterminated_usage_event_at_the_end_is_dropped() -> None:
    assert run([chunk("a") + usage_event().rstrip(b"\n")]) == (chunk("a"), (9, 4))


# -- what goes upstream -----------------------------------------------------------------------


def adapter(kind: str = "openai", **fields: Any) -> OpenAIAdapter:
    extra = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in fields.items())
    yaml = f"providers:\n  p:\n    type: {kind}\n    base_url: http://x/v1\n    api_key: k\n{extra}"
    built = build_adapter("p", parse(yaml, {}).providers["p"], "/v1")
    assert isinstance(built, OpenAIAdapter)
    return built


def sent(built: OpenAIAdapter, body: dict[str, Any], op: Operation = CHAT) -> dict[str, Any]:
    return orjson.loads(built.encode_body(op, body, Target("up")))


def test_a_stream_asks_upstream_for_usage_merged_with_the_clients_options() -> None:
    body = {"model": "a", "messages": [], "stream": True, "stream_options": {"include_obfuscation": False}}
    openai = adapter()

    upstream = sent(openai, body)

    assert upstream["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert body["stream_options"] == {"include_obfuscation": False}  # the client's, for the relay
    assert isinstance(openai.stream_translator(CHAT, body), UsageFilter)
    completions = {"model": "a", "prompt": "p", "stream": True}
    assert sent(openai, completions, Operation.completions)["stream_options"] == {"include_usage": True}
    assert isinstance(openai.stream_translator(Operation.completions, completions), UsageFilter)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "a", "messages": [], "stream": True, "stream_options": {"include_usage": True}},
        {"model": "a", "messages": [], "stream": False},
        {"model": "a", "messages": []},
    ],
    ids=["client-asked", "not-streamed", "no-stream-field"],
)
def test_nothing_is_added_or_filtered_when_the_client_asked_or_did_not_stream(body: dict[str, Any]) -> None:
    openai = adapter()
    assert sent(openai, dict(body)) == {**body, "model": "up"}
    assert openai.stream_translator(CHAT, body) is None


@pytest.mark.parametrize(
    ("kind", "fields", "asks"),
    [
        ("openai", {}, True),
        ("openai", {"stream_usage": False}, False),
        ("openai_compatible", {}, False),  # some compatible servers refuse stream_options
        ("openai_compatible", {"stream_usage": True}, True),
        ("grok", {}, False),
        ("openrouter", {"stream_usage": True}, True),
    ],
)
def test_stream_usage_is_per_provider(kind: str, fields: dict[str, Any], asks: bool) -> None:
    body = {"model": "a", "messages": [], "stream": True}
    built = adapter(kind, **fields)
    assert ("stream_options" in sent(built, dict(body))) is asks
    assert isinstance(built.stream_translator(CHAT, body), UsageFilter) is asks


def test_stream_usage_is_refused_on_providers_that_count_natively() -> None:
    with pytest.raises(Exception, match="stream_usage"):
        parse("providers:\n  a:\n    type: anthropic\n    api_key: k\n    stream_usage: true\n", {})
