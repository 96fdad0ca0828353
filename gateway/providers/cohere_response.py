"""Cohere v2 answers in OpenAI's shapes: chat completions, chat streams, embeddings, errors.

Usage comes from `billed_units` (what the account is charged for, so what budgets
and per-key cost must count), falling back to `tokens` (everything the model read,
including Cohere's own prompt template) when an answer carries no billed units.
Cohere's reasoning ("thinking") content and citations have no place in OpenAI's
chat shape and are left out; a tool plan is the assistant's text beside its calls.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any, NamedTuple

import orjson

from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.providers.base import StreamTranslator

dumps = orjson.dumps

FINISH = {
    "COMPLETE": "stop",
    "STOP_SEQUENCE": "stop",
    "MAX_TOKENS": "length",
    "TOOL_CALL": "tool_calls",
    "ERROR_LIMIT": "length",
    "ERROR_TOXIC": "content_filter",
}
# Finish reasons that mean the generation failed: the client gets an error, not a truncated answer.
FAILED: dict[str, type[UpstreamError]] = {"ERROR": UpstreamError, "TIMEOUT": UpstreamTimeout}

# Cohere status -> (status, OpenAI error type, code) the client sees. 402 (billing) reads as
# OpenAI's quota 429; 422 and 501 are requests Cohere will not serve, so 400; 498 is Cohere's
# invalid token; 499 (cancelled upstream) and unknown 5xx are bad-gateway failures; 529 overloaded.
ERRORS: dict[int, tuple[int, str, str | None]] = {
    400: (400, "invalid_request_error", None),
    401: (401, "invalid_request_error", "invalid_api_key"),
    402: (429, "insufficient_quota", "insufficient_quota"),
    403: (403, "invalid_request_error", "permission_denied"),
    404: (404, "invalid_request_error", "not_found"),
    408: (408, "invalid_request_error", "timeout"),
    413: (413, "invalid_request_error", "request_too_large"),
    422: (400, "invalid_request_error", None),
    429: (429, "rate_limit_exceeded", "rate_limit_exceeded"),
    498: (401, "invalid_request_error", "invalid_api_key"),
    499: (502, "upstream_error", "upstream_cancelled"),
    500: (500, "server_error", None),
    501: (400, "invalid_request_error", "unsupported"),
    502: (502, "upstream_error", "upstream_unavailable"),
    503: (503, "server_error", "service_unavailable"),
    504: (504, "upstream_error", "upstream_timeout"),
    529: (503, "server_error", "overloaded"),
}
_OTHER_4XX = (400, "invalid_request_error", None)
_OTHER_5XX = (502, "upstream_error", "upstream_unavailable")


class Answer(NamedTuple):
    """What an answer needs from its request: the model to name, and the embedding encoding."""

    model: str
    base64: bool


def _json(raw: bytes, provider: str) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise UpstreamError(
            f"Upstream provider '{provider}' (cohere) sent an answer that is not a JSON object."
        )
    return data


def usage(raw: Any) -> dict[str, int]:
    billed = raw.get("billed_units") if isinstance(raw, dict) else None
    tokens = raw.get("tokens") if isinstance(raw, dict) else None
    counts = billed if isinstance(billed, dict) and billed.get("input_tokens") is not None else tokens
    counts = counts if isinstance(counts, dict) else {}
    prompt = int(counts.get("input_tokens") or 0)
    completion = int(counts.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def failure(reason: str, detail: Any, provider: str) -> UpstreamError:
    message = f"Upstream provider '{provider}' (cohere) ended the generation with {reason}"
    return FAILED[reason](f"{message}: {detail}" if detail else message + ".")


def chat_completion(raw: bytes, answer: Answer, provider: str) -> bytes:
    data = _json(raw, provider)
    reason = data.get("finish_reason")
    if reason in FAILED:
        raise failure(reason, data.get("error"), provider)
    message = data.get("message") or {}
    text = "".join(p.get("text", "") for p in message.get("content") or () if p.get("type") == "text")
    calls = [
        {
            "id": call.get("id"),
            "type": "function",
            "function": {
                "name": (call.get("function") or {}).get("name"),
                "arguments": (call.get("function") or {}).get("arguments") or "{}",
            },
        }
        for call in message.get("tool_calls") or ()
    ]
    out_message: dict[str, Any] = {
        "role": "assistant",
        "content": text or message.get("tool_plan") or (None if calls else ""),
        "refusal": None,
        "annotations": [],
    }
    if calls:
        out_message["tool_calls"] = calls
    # Cohere may say COMPLETE after tool calls; OpenAI always says tool_calls.
    finish = "tool_calls" if calls else FINISH.get(str(reason), "stop")
    return dumps(
        {
            "id": data.get("id") or f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": answer.model,
            "choices": [{"index": 0, "message": out_message, "logprobs": None, "finish_reason": finish}],
            "usage": usage(data.get("usage")),
        }
    )


def embeddings(raw: bytes, answer: Answer, provider: str) -> bytes:
    data = _json(raw, provider)
    vectors = (data.get("embeddings") or {}).get("float") or []
    items = [
        {
            "object": "embedding",
            "index": i,
            # OpenAI's base64 is the float32 vector, little-endian, base64-encoded.
            "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if answer.base64 else v,
        }
        for i, v in enumerate(vectors)
    ]
    tokens = usage(data.get("meta") or {})["prompt_tokens"]
    return dumps(
        {
            "object": "list",
            "data": items,
            "model": answer.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def error(status: int, raw: bytes, provider: str) -> tuple[int, bytes | None]:
    """Cohere's `{"message": ...}` (v2 adds an `id`) as OpenAI's error, with a matching status;
    None for a body of another shape."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    message = parsed.get("message") if isinstance(parsed, dict) else None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        message = parsed["error"].get("message")
    mapped, kind, code = ERRORS.get(status, _OTHER_5XX if status >= 500 else _OTHER_4XX)
    if not isinstance(message, str) or not message:
        return mapped, None
    text = f"Upstream provider '{provider}' (cohere) answered {status}: {message}"
    return mapped, dumps({"error": {"message": text, "type": kind, "param": None, "code": code}})


class ChatStream(StreamTranslator):
    """Cohere v2 chat events (`event: <type>` + one JSON `data:` line) -> OpenAI chunks.

    Each event is parsed once; every chunk is a prebuilt head + the delta + a prebuilt
    tail, so a text delta costs one `loads` and one `dumps` of its text.
    """

    def __init__(self, provider: str, model: str, include_usage: bool) -> None:
        self.provider = provider
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())
        self._buffer = b""
        self._head = b""  # `data: {...,"delta":` once the message id is known
        self._text_head = b""  # the head + `{"content":`
        self._id = ""
        self._tail = (
            b',"logprobs":null,"finish_reason":null}]'
            + (b',"usage":null' if include_usage else b"")
            + b"}\n\n"
        )
        self._text_tail = b""
        self._tool = -1  # index of the current tool call
        self._ended = False  # message-end seen
        self._failed = False  # an error event has gone out: the rest is ignored
        self.usage: tuple[int, int] | None = None  # at message-end, whether or not the client sees it

    def feed(self, data: bytes) -> bytes:
        if self._failed:
            return b""
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        end = buffer.find(b"\n\n")
        if end >= 0 and end == len(buffer) - 2:  # the usual read: exactly one whole event
            self._buffer = b""
            return self._event(buffer[:end])
        out = []
        start = 0
        while not self._failed:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            chunk = self._event(buffer[start:end])
            if chunk:
                out.append(chunk)
            start = end + 2
        self._buffer = buffer[start:] if not self._failed else b""
        return b"".join(out)

    def finish(self) -> bytes:
        out = b""
        if not self._failed and self._buffer.strip():
            out = self._event(self._buffer.rstrip(b"\n"))
            self._buffer = b""
        if self._failed:
            return out
        if not self._ended:
            return out + self._error(
                UpstreamError(f"Upstream provider '{self.provider}' (cohere) ended the stream early.")
            )
        return out + b"data: [DONE]\n\n"

    # -- events ---------------------------------------------------------------

    def _event(self, event: bytes) -> bytes:
        at = event.find(b"data:")
        if at < 0:
            return b""  # a comment or keep-alive
        nl = event.find(b"\n", at)
        if nl < 0:
            payload = event[at + 5 :]
        else:  # several data lines join with newlines (SSE)
            payload = b"\n".join(
                line[5:].removeprefix(b" ") for line in event[at:].split(b"\n") if line.startswith(b"data:")
            )
        if payload[:1] == b" ":
            payload = payload[1:]
        if payload == b"[DONE]" or self._ended:
            return b""
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return self._error(
                UpstreamError(f"Upstream provider '{self.provider}' (cohere) sent a malformed stream event.")
            )
        kind = obj.get("type")
        delta = obj.get("delta") or {}
        message = delta.get("message") or {}
        if kind == "content-delta":
            text = (message.get("content") or {}).get("text")
            return self._content(text) if text else b""
        if kind == "tool-plan-delta":
            text = message.get("tool_plan")
            return self._content(text) if text else b""
        if kind == "tool-call-delta":
            arguments = ((message.get("tool_calls") or {}).get("function") or {}).get("arguments")
            if not arguments:
                return b""
            prefix = self._open()
            return (
                prefix
                + self._head
                + b'{"tool_calls":[{"index":%d,"function":{"arguments":' % self._tool
                + dumps(arguments)
                + b"}}]}"
                + self._tail
            )
        if kind == "message-start":
            return self._open(obj.get("id"))
        if kind == "content-start":
            text = (message.get("content") or {}).get("text")
            return self._content(text) if text else b""
        if kind == "tool-call-start":
            return self._tool_start(message.get("tool_calls") or {})
        if kind == "message-end":
            return self._end(delta)
        return b""  # content-end, tool-call-end, citations, debug: nothing for OpenAI

    def _open(self, ident: Any = None) -> bytes:
        """The role chunk, once: at message-start, or before the first delta if that never came."""
        if self._head:
            return b""
        self._id = ident if isinstance(ident, str) and ident else f"chatcmpl-{uuid.uuid4().hex}"
        self._head = (
            b'data: {"id":'
            + dumps(self._id)
            + b',"object":"chat.completion.chunk","created":%d,"model":' % self.created
            + dumps(self.model)
            + b',"choices":[{"index":0,"delta":'
        )
        self._text_head = self._head + b'{"content":'
        self._text_tail = b"}" + self._tail
        return self._head + b'{"role":"assistant","content":"","refusal":null}' + self._tail

    def _content(self, text: str) -> bytes:
        if self._text_head:
            return self._text_head + dumps(text) + self._text_tail
        return self._open() + self._text_head + dumps(text) + self._text_tail

    def _tool_start(self, call: dict[str, Any]) -> bytes:
        self._tool += 1
        function = call.get("function") or {}
        delta = {
            "tool_calls": [
                {
                    "index": self._tool,
                    "id": call.get("id"),
                    "type": "function",
                    "function": {"name": function.get("name"), "arguments": function.get("arguments") or ""},
                }
            ]
        }
        return self._open() + self._head + dumps(delta) + self._tail

    def _end(self, delta: dict[str, Any]) -> bytes:
        reason = delta.get("finish_reason")
        if reason in FAILED or delta.get("error"):
            return self._error(
                failure(reason if reason in FAILED else "ERROR", delta.get("error"), self.provider)
            )
        self._ended = True
        finish = "tool_calls" if self._tool >= 0 else FINISH.get(str(reason), "stop")
        prefix = self._open()
        out = prefix + self._head + b'{},"logprobs":null,"finish_reason":"' + finish.encode() + b'"}]'
        out += b',"usage":null}\n\n' if self.include_usage else b"}\n\n"
        counts = usage(delta.get("usage"))
        self.usage = (counts["prompt_tokens"], counts["completion_tokens"])
        if self.include_usage:
            chunk = {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": counts,
            }
            out += b"data: " + dumps(chunk) + b"\n\n"
        return out

    def _error(self, exc: UpstreamError) -> bytes:
        """One final `error` event, which the OpenAI SDKs raise; nothing follows it."""
        self._failed = True
        return b"event: error\ndata: " + exc.body() + b"\n\n"
