"""Anthropic's answers in OpenAI's shape: a whole message, a stream of events, an error.

    message          -> chat.completion (text joined, tool_use -> tool_calls, usage, finish_reason)
    event stream     -> chat.completion.chunk events, then `data: [DONE]`
    error body/event -> {"error": {message, type, param, code}}, 529 overloaded -> 503

In JSON mode (`json_tool`, the forced tool of `response_format`) that tool's call is
the answer: its input becomes the message content (streamed: its `input_json_delta`
fragments become content deltas) and its `tool_use` stop reason "stop".

Prompt tokens are everything Anthropic read: `input_tokens` plus the cache's
`cache_creation_input_tokens` and `cache_read_input_tokens` (the API counts them
apart); the part read from the cache is `prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.errors import UpstreamError
from gateway.providers.base import StreamTranslator

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Anthropic's own status for "overloaded"; OpenAI clients (and their retry logic) know 503.
OVERLOADED = 529
# Events are small (a delta, a message head); an upstream that never ends one must not grow memory.
MAX_EVENT_BYTES = 1 << 20


def finish_reason(stop_reason: Any, json_tool: str | None = None) -> str:
    if stop_reason == "tool_use" and json_tool is not None:
        return "stop"  # the forced JSON tool's call is the answer, not a call for the client to make
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def usage(prompt: int, cached: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _count(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _malformed(provider: str, what: str) -> UpstreamError:
    return UpstreamError(f"Upstream provider '{provider}' (anthropic) sent {what}.")


def translate_message(raw: bytes, provider: str, json_tool: str | None = None) -> bytes:
    """A Messages API message as a chat.completion (`json_tool`: see the module docstring)."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        message = None
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        raise _malformed(provider, "an answer that is not a Messages API message")
    texts = []
    calls = []
    for block in message["content"]:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use" and json_tool is not None and block.get("name") == json_tool:
            texts.append(orjson.dumps(block.get("input") or {}).decode())
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            function = {"name": block.get("name"), "arguments": arguments}
            calls.append({"id": block.get("id"), "type": "function", "function": function})
        # Thinking blocks have no place in a chat.completion message.
    reply: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
        "annotations": [],
    }
    if calls:
        reply["tool_calls"] = calls
    counts = message.get("usage")
    counts = counts if isinstance(counts, dict) else {}
    cached = _count(counts.get("cache_read_input_tokens"))
    prompt = _count(counts.get("input_tokens")) + _count(counts.get("cache_creation_input_tokens")) + cached
    return orjson.dumps(
        {
            "id": message.get("id"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": message.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": reply,
                    "logprobs": None,
                    "finish_reason": finish_reason(message.get("stop_reason"), json_tool),
                }
            ],
            "usage": usage(prompt, cached, _count(counts.get("output_tokens"))),
            "system_fingerprint": None,
        }
    )


def error_body(message: str, kind: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


def translate_error(status: int, raw: bytes, provider: str) -> tuple[int, bytes | None]:
    """Anthropic's `{"type": "error", "error": {type, message}}` -> OpenAI's shape, type and message kept."""
    if status == OVERLOADED:
        status = 503
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return status, None  # not Anthropic's shape (a proxy's page, say)
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = f"Upstream provider '{provider}' answered {status}."
    kind = error.get("type")
    return status, error_body(message, kind if isinstance(kind, str) else "api_error")


def _data_of(block: bytes) -> bytes | None:
    """The `data:` payload of one SSE event (its JSON `type` repeats the `event:` line's name)."""
    first = block.find(b"\n")
    if first < 0:
        return block[5:] if block.startswith(b"data:") else None
    # Anthropic's shape, checked in C: an `event:` line, then one `data:` line, last.
    if (
        block.startswith(b"data:", first + 1)
        and block.find(b"\n", first + 1) < 0
        and not block.startswith(b"data:")
    ):
        return block[first + 6 :]
    lines = [line[5:] for line in block.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


_WAITING, _OPEN, _STOPPED, _FAILED = range(4)


class AnthropicStreamTranslator(StreamTranslator):
    """Messages API events -> chat.completion.chunk events, one event at a time.

    message_start       -> the role chunk (id, model, prompt usage noted)
    content_block_start -> tool_use: the tool call's id and name (arguments ""); JSON tool: nothing
    content_block_delta -> text_delta: content; input_json_delta: an argument fragment (JSON tool:
                           content)
    message_delta       -> finish reason and output usage noted
    message_stop        -> the finish chunk, then the usage chunk if asked for (`usage` either way)
    error               -> an `error` event the SDKs raise; the stream ends there
    ping, content_block_stop, thinking deltas, unknown events -> nothing
    """

    __slots__ = (
        "base",
        "cache_creation",
        "cache_read",
        "completion",
        "head",
        "include_usage",
        "input",
        "json_block",
        "json_tool",
        "pending",
        "provider",
        "reason",
        "state",
        "tail",
        "text_head",
        "text_tail",
        "tools",
        "usage",
        "usage_null",
    )

    def __init__(self, provider: str, include_usage: bool, json_tool: str | None = None) -> None:
        self.provider = provider
        self.include_usage = include_usage
        self.json_tool = json_tool
        self.json_block: Any = None  # the content block index of the JSON tool's call, once started
        self.pending = b""
        self.state = _WAITING
        # Every chunk is `head + delta + tail`; head carries the id, created and model of message_start.
        self.base = b""
        self.head = b""
        self.usage_null = b',"usage":null' if include_usage else b""
        self.tail = b',"logprobs":null,"finish_reason":null}]' + self.usage_null + b"}\n\n"
        # The per-token chunk, `text_head + JSON string + text_tail`: two joins, not four.
        self.text_head = b""
        self.text_tail = b"}" + self.tail
        self.tools: dict[Any, int] = {}  # Anthropic content block index -> OpenAI tool_calls index
        self.input = self.cache_creation = self.cache_read = self.completion = 0
        self.reason = "stop"
        self.usage: tuple[int, int] | None = None

    def feed(self, data: bytes) -> bytes:
        if self.state >= _STOPPED:
            return b""
        if self.pending:
            data = self.pending + data
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        # Complete events, and the start of the next one (b"" when the data ended an event).
        blocks = data.split(b"\n\n")
        self.pending = blocks.pop()
        if len(self.pending) > MAX_EVENT_BYTES:
            raise _malformed(self.provider, f"a stream event over {MAX_EVENT_BYTES} bytes")
        out = b""
        for block in blocks:
            payload = _data_of(block)
            if payload is None:
                continue
            try:
                event = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise _malformed(self.provider, "a stream event that is not JSON") from None
            if not isinstance(event, dict):
                raise _malformed(self.provider, "a stream event that is not an object")
            out += self.event(event)
            if self.state >= _STOPPED:
                break
        return out

    def finish(self) -> bytes:
        if self.state == _STOPPED:
            return b"data: [DONE]\n\n"
        if self.state == _FAILED:
            return b""
        message = f"Upstream provider '{self.provider}' (anthropic) ended the stream before message_stop."
        return b"event: error\ndata: " + error_body(message, "upstream_error") + b"\n\n"

    def event(self, event: dict[str, Any]) -> bytes:
        kind = event.get("type")
        if kind == "content_block_delta":
            return self.block_delta(event)
        if kind == "content_block_start":
            self.check_open(kind)
            return self.block_start(event)
        if kind == "message_start":
            return self.start(event.get("message"))
        if kind == "message_delta":
            self.check_open(kind)
            delta = event.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason") is not None:
                self.reason = finish_reason(delta["stop_reason"], self.json_tool)
            self.count(event.get("usage"))
            return b""
        if kind == "message_stop":
            self.check_open(kind)
            return self.stop()
        if kind == "error":
            return self.error(event.get("error"))
        return b""  # ping, content_block_stop, and event types added after this was written

    def block_delta(self, event: dict[str, Any]) -> bytes:
        if self.state != _OPEN:  # checked inline: this is the per-token path
            self.check_open("content_block_delta")
        delta = event.get("delta")
        if not isinstance(delta, dict):
            return b""
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            return self.text_head + orjson.dumps(text) + self.text_tail if text else b""
        if kind == "input_json_delta":
            fragment = delta.get("partial_json")
            if self.json_block is not None and event.get("index") == self.json_block:
                return self.text_head + orjson.dumps(fragment) + self.text_tail if fragment else b""
            index = self.tools.get(event.get("index"))
            if index is None or not fragment:
                return b""
            call = b'{"tool_calls":[{"index":%d,"function":{"arguments":' % index
            return self.head + call + orjson.dumps(fragment) + b"}}]}" + self.tail
        return b""  # thinking, signature and citation deltas: no OpenAI field carries them

    def block_start(self, event: dict[str, Any]) -> bytes:
        block = event.get("content_block")
        if not isinstance(block, dict):
            return b""
        kind = block.get("type")
        if kind == "tool_use" and self.json_tool is not None and block.get("name") == self.json_tool:
            self.json_block = event.get("index")
            return b""  # its input arrives as input_json_delta fragments, relayed as content
        if kind == "tool_use":
            index = self.tools[event.get("index")] = len(self.tools)
            call = {
                "index": index,
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            return self.head + b'{"tool_calls":[' + orjson.dumps(call) + b"]}" + self.tail
        if kind == "text" and block.get("text"):
            return self.head + b'{"content":' + orjson.dumps(block["text"]) + b"}" + self.tail
        return b""

    def error(self, error: Any) -> bytes:
        self.state = _FAILED
        error = error if isinstance(error, dict) else {}
        message = error.get("message")
        if not isinstance(message, str) or not message:
            message = f"Upstream provider '{self.provider}' (anthropic) failed mid-stream."
        kind = error.get("type")
        body = error_body(message, kind if isinstance(kind, str) else "api_error")
        return b"event: error\ndata: " + body + b"\n\n"

    def check_open(self, kind: str) -> None:
        if self.state != _OPEN:
            raise _malformed(self.provider, f"'{kind}' before message_start")

    def start(self, message: Any) -> bytes:
        if not isinstance(message, dict):
            raise _malformed(self.provider, "a message_start without a message")
        self.state = _OPEN
        self.base = (
            b'{"id":'
            + orjson.dumps(message.get("id") or "")
            + b',"object":"chat.completion.chunk","created":%d,"model":' % int(time.time())
            + orjson.dumps(message.get("model") or "")
        )
        self.head = b"data: " + self.base + b',"choices":[{"index":0,"delta":'
        self.text_head = self.head + b'{"content":'
        self.count(message.get("usage"))
        # Content null, not "": a tool-call-only answer then reassembles (SDK stream helpers) to
        # content None, as the same answer non-streamed has.
        return self.head + b'{"role":"assistant","content":null}' + self.tail

    def count(self, counts: Any) -> None:
        """Usage from message_start, then message_delta's cumulative counts as they come."""
        if not isinstance(counts, dict):
            return
        for field, attr in (
            ("input_tokens", "input"),
            ("cache_creation_input_tokens", "cache_creation"),
            ("cache_read_input_tokens", "cache_read"),
            ("output_tokens", "completion"),
        ):
            value = counts.get(field)
            if isinstance(value, int):
                setattr(self, attr, value)

    def stop(self) -> bytes:
        self.state = _STOPPED
        done = b',"logprobs":null,"finish_reason":"' + self.reason.encode() + b'"}]'
        out = self.head + b"{}" + done + self.usage_null + b"}\n\n"
        prompt = self.input + self.cache_creation + self.cache_read
        self.usage = (prompt, self.completion)
        if self.include_usage:
            counts = orjson.dumps(usage(prompt, self.cache_read, self.completion))
            out += b"data: " + self.base + b',"choices":[],"usage":' + counts + b"}\n\n"
        return out
