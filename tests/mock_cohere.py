"""A loopback stand-in for Cohere's API v2, for tests that need a real Cohere upstream.

`MockCohere` reuses `MockOpenAI`'s server (threads, recording, `behave(...)` rules,
resets, slow heads, hangs) and speaks Cohere's wire format from its API reference:

    POST /v2/chat    stream or not; the reply is "echo: " + the last user message,
                     or "tool said: ..." when the conversation ends with tool results.
                     With `tools` in the request, each "call NAME {json}" in the last
                     user message (NAME one of the tools) becomes a tool call with
                     those JSON arguments ("call NAME" alone: `{}`); `tool_choice`
                     REQUIRED calls the first tool (arguments `{}`) when none is asked for.
                     `max_tokens` (whitespace words) and `stop_sequences` cut the reply
                     with finish reasons MAX_TOKENS and STOP_SEQUENCE.
    POST /v2/embed   `embeddings.float` / `embeddings.base64` (float32 little-endian), with
                     `meta.billed_units.input_tokens`; `output_dimension` sets the size.

Streams are SSE: `event: <type>` + one JSON `data:` line per event, then `data: [DONE]`.
Usage reports `billed_units` (whitespace words of the messages) and `tokens`
(billed + PROMPT_TEMPLATE_TOKENS, as Cohere counts its own prompt template there).
Errors are Cohere's `{"id": ..., "message": ...}`; a wrong key gets 401 "invalid api token".
Values outside the ranges the reference gives get Cohere's 400; so do fields the v2 API
does not define (strict on purpose, whatever the real API does with them: a gateway that
leaks an OpenAI field such as `top_p` into a Cohere request is caught).

    b = mock.behave(model="command-x", finish_reason="ERROR")  # generation fails (stream: message-end)
    b = mock.behave(model="command-x", error_after=2)            # stream fails after 2 content deltas
"""

from __future__ import annotations

import base64
import json
import re
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import h11

from tests.mock_openai import (
    Behaviour,
    Connection,
    MockOpenAI,
    RecordedRequest,
    _Reset,
    embedding_vector,
    words,
)

DEFAULT_API_KEY = "co-upstream-secret"
PROMPT_TEMPLATE_TOKENS = 7

MESSAGES = {
    400: "invalid request: mock bad request",
    401: "invalid api token",
    402: "Please add or update your payment method.",
    403: "You do not have access to this resource.",
    404: "model not found, make sure the correct model ID was used and that you have access to the model.",
    422: "invalid request: unprocessable entity",
    429: "You are using a Trial key, which is limited to 20 API calls / minute.",
    499: "request cancelled",
    500: "internal server error, this has been reported to our developers.",
    503: "service unavailable",
}

CHAT_FIELDS = frozenset(
    {
        "model", "messages", "tools", "strict_tools", "documents", "citation_options", "response_format",
        "safety_mode", "max_tokens", "stop_sequences", "temperature", "seed", "frequency_penalty",
        "presence_penalty", "k", "p", "logprobs", "tool_choice", "thinking", "priority", "stream",
    }
)  # fmt: skip
EMBED_FIELDS = frozenset(
    {"model", "input_type", "texts", "images", "inputs", "max_tokens", "output_dimension", "embedding_types",
     "truncate", "priority"}
)  # fmt: skip
INPUT_TYPES = frozenset({"search_document", "search_query", "classification", "clustering", "image"})
CONTENT_TYPES = {
    "system": {"text"},
    "user": {"text", "image_url"},
    "assistant": {"text"},
    "tool": {"text", "document"},
}
_CALL = re.compile(r"\bcall (\w+)")


@dataclass
class CohereBehaviour(Behaviour):
    finish_reason: str | None = None  # end the generation with this reason (ERROR, TIMEOUT, ...)


class MockCohere(MockOpenAI):
    def __init__(self, api_key: str = DEFAULT_API_KEY, host: str = "127.0.0.1") -> None:
        super().__init__(api_key, host)

    @property
    def base_url(self) -> str:
        """As the cohere SDK and the gateway's `cohere` provider take it: the origin."""
        return self.url

    def behave(self, **kwargs: Any) -> CohereBehaviour:
        behaviour = CohereBehaviour(**kwargs)
        with self._lock:
            self._behaviours.insert(0, behaviour)
        return behaviour


def error_json(status: int, fields: dict[str, Any] | None = None) -> bytes:
    body = {"id": str(uuid.uuid4()), "message": MESSAGES.get(status, MESSAGES[500 if status >= 500 else 400])}
    body.update(fields or {})
    return json.dumps(body).encode()


class CohereConnection(Connection):
    async def check_auth(self, request: RecordedRequest) -> bool:
        authorization = request.header("authorization")
        if authorization == f"Bearer {self.mock.api_key}":
            return True
        message = "no api key supplied" if authorization is None else "invalid api token"
        await self._send_json(401, error_json(401, {"message": message}))
        return False

    def error_body(self, status: int, fields: dict[str, Any]) -> bytes:
        return error_json(status, fields)

    async def _send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        head = [("date", formatdate(usegmt=True)), ("x-debug-trace-id", uuid.uuid4().hex), *headers]
        await self._write(self.h11.send(h11.Response(status_code=status, headers=head)) or b"")

    async def route(self, request: RecordedRequest, payload: Any, behaviour: Behaviour | None) -> None:
        checks = {"/v2/chat": _check_chat, "/v2/embed": _check_embed}
        if request.method != "POST" or request.path not in checks:
            await self._send_json(
                404, error_json(404, {"message": f"no route for {request.method} {request.path}"})
            )
            return
        if not isinstance(payload, dict):
            await self._send_json(
                400, error_json(400, {"message": "invalid request: body must be a JSON object"})
            )
            return
        problem = checks[request.path](payload)
        if problem is not None:
            await self._send_json(400, error_json(400, {"message": f"invalid request: {problem}"}))
            return
        extra = behaviour.headers if behaviour else []
        cohere = behaviour if isinstance(behaviour, CohereBehaviour) else None
        if request.path == "/v2/embed":
            await self._send_json(200, json.dumps(_embed(payload)).encode(), extra)
        elif payload.get("stream") is True:
            await self._stream(payload, cohere)
        else:
            await self._send_json(200, json.dumps(_chat(payload, cohere)).encode(), extra)

    async def _stream(self, payload: dict[str, Any], behaviour: CohereBehaviour | None) -> None:
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
        await self._send_head(200, headers + (behaviour.headers if behaviour else []))
        sent = 0
        for index, event in enumerate(_chat_events(payload, behaviour)):
            if index and behaviour and behaviour.chunk_delay:
                await self._wait_gone(behaviour.chunk_delay)
            if event["type"] == "content-delta" and behaviour:
                if behaviour.reset_after == sent:
                    raise _Reset
                if behaviour.error_after == sent:
                    event = _message_end(
                        "ERROR", _usage(payload, sent), (behaviour.error or {}).get("message")
                    )
            await self._send_data(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
            if event["type"] == "message-end":
                break
            sent += event["type"] == "content-delta"
        await self._send_data(b"data: [DONE]\n\n")
        await self._send_end()


# -- validation: what Cohere's v2 API rejects ---------------------------------------


def _check_chat(p: dict[str, Any]) -> str | None:
    unknown = sorted(set(p) - CHAT_FIELDS)
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}"
    if not isinstance(p.get("model"), str):
        return "model is required"
    messages = p.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, m in enumerate(messages):
        problem = _check_message(m) if isinstance(m, dict) else "must be an object"
        if problem:
            return f"messages[{i}]: {problem}"
    tools = p.get("tools")
    if tools is not None:
        for tool in tools:
            fn = tool.get("function") if isinstance(tool, dict) else None
            if (
                not isinstance(fn, dict)
                or tool.get("type") != "function"
                or not isinstance(fn.get("name"), str)
            ):
                return "each tool must be {type: function, function: {name, parameters}}"
            if not isinstance(fn.get("parameters"), dict):
                return f"tool {fn['name']}: parameters must be a JSON schema object"
    if p.get("tool_choice") is not None and (p["tool_choice"] not in ("REQUIRED", "NONE") or not tools):
        return "tool_choice must be REQUIRED or NONE, with tools"
    ranges = {"p": (0.01, 0.99), "frequency_penalty": (0.0, 1.0), "presence_penalty": (0.0, 1.0)}
    for key, (low, high) in ranges.items():
        if key in p and not (isinstance(p[key], int | float) and low <= p[key] <= high):
            return f"{key} must be between {low} and {high}"
    if "temperature" in p and not (isinstance(p["temperature"], int | float) and p["temperature"] >= 0):
        return "temperature must be a non-negative number"
    if "max_tokens" in p and not (isinstance(p["max_tokens"], int) and p["max_tokens"] > 0):
        return "max_tokens must be a positive integer"
    stops = p.get("stop_sequences", [])
    if not isinstance(stops, list) or len(stops) > 5 or not all(isinstance(s, str) for s in stops):
        return "stop_sequences must be a list of at most 5 strings"
    fmt = p.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object")):
        return "response_format type must be text or json_object"
    return None


def _check_message(m: dict[str, Any]) -> str | None:
    role = m.get("role")
    if role not in CONTENT_TYPES:
        return f"invalid role {role!r}"
    content = m.get("content")
    if role == "tool" and not isinstance(m.get("tool_call_id"), str):
        return "tool messages need a tool_call_id"
    if role == "assistant" and m.get("tool_calls"):
        for call in m["tool_calls"]:
            fn = call.get("function") or {}
            if not isinstance(call.get("id"), str) or not isinstance(fn.get("arguments"), str):
                return "tool calls need an id and string arguments"
        return None
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return "content must be a string or a list of content blocks"
    for block in content:
        if not isinstance(block, dict) or block.get("type") not in CONTENT_TYPES[role]:
            return f"content block type not allowed for {role}"
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            return "text blocks need text"
    return None


def _check_embed(p: dict[str, Any]) -> str | None:
    unknown = sorted(set(p) - EMBED_FIELDS)
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}"
    if not isinstance(p.get("model"), str):
        return "model is required"
    if p.get("input_type") not in INPUT_TYPES:
        return "valid input_type must be provided with the provided model"
    texts = p.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return "texts must be a non-empty list of strings"
    if len(texts) > 96:
        return f"total number of texts must be at most 96 - received {len(texts)}"
    if not set(p.get("embedding_types") or ["float"]) <= {"float", "base64"}:
        return "the mock serves embedding_types float and base64"
    dimension = p.get("output_dimension")
    if dimension is not None and not (isinstance(dimension, int) and dimension > 0):
        return "output_dimension must be a positive integer"
    return None


# -- answers ---------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(b.get("text", "") for b in content or () if isinstance(b, dict))


def _usage(payload: dict[str, Any], output: int) -> dict[str, Any]:
    billed = sum(len(words(_text(m.get("content")))) for m in payload["messages"])
    return {
        "billed_units": {"input_tokens": billed, "output_tokens": output},
        "tokens": {"input_tokens": billed + PROMPT_TEMPLATE_TOKENS, "output_tokens": output},
    }


def _tool_calls(payload: dict[str, Any], text: str) -> list[dict[str, Any]]:
    names = {t["function"]["name"] for t in payload.get("tools") or ()}
    decoder = json.JSONDecoder()
    calls = []
    for match in _CALL.finditer(text):
        if match.group(1) not in names:
            continue
        rest = text[match.end() :].lstrip()
        arguments = decoder.raw_decode(rest)[0] if rest.startswith("{") else {}
        ident = f"{match.group(1)}_{uuid.uuid4().hex[:12]}"
        call = {
            "id": ident,
            "type": "function",
            "function": {"name": match.group(1), "arguments": json.dumps(arguments)},
        }
        calls.append(call)
    return calls


def reply(payload: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]], str]:
    """(text pieces, tool calls, finish reason) for a chat request."""
    messages = payload["messages"]
    results = []
    for m in reversed(messages):
        if m.get("role") != "tool":
            break
        results.insert(0, _text(m.get("content")))
    users = [m for m in messages if m.get("role") == "user"]
    last_user = _text(users[-1].get("content")) if users else ""
    if not results and payload.get("tools") and payload.get("tool_choice") != "NONE":
        calls = _tool_calls(payload, last_user)
        if not calls and payload.get("tool_choice") == "REQUIRED":
            calls = _tool_calls(payload, "call " + payload["tools"][0]["function"]["name"])
        if calls:
            return [f"I will call {', '.join(c['function']['name'] for c in calls)}."], calls, "TOOL_CALL"
    text = "tool said: " + "; ".join(results) if results else "echo: " + last_user
    reason = "COMPLETE"
    for stop in payload.get("stop_sequences") or ():
        if stop in text:
            text, reason = text[: text.index(stop)], "STOP_SEQUENCE"
    pieces = re.findall(r"\S+\s*|\s+", text) or [""]
    limit = payload.get("max_tokens")
    if limit is not None and len(pieces) > limit:
        pieces, reason = pieces[:limit], "MAX_TOKENS"
    return pieces, [], reason


def _pieces(payload: dict[str, Any], behaviour: CohereBehaviour | None) -> tuple[list[str], list[Any], str]:
    pieces, calls, reason = reply(payload)
    if behaviour is not None and behaviour.chunks is not None:
        pieces = [f"chunk{i} " for i in range(behaviour.chunks)]
    if behaviour is not None and behaviour.finish_reason is not None:
        reason = behaviour.finish_reason
    return pieces, calls, reason


def _chat(payload: dict[str, Any], behaviour: CohereBehaviour | None) -> dict[str, Any]:
    pieces, calls, reason = _pieces(payload, behaviour)
    message: dict[str, Any] = {"role": "assistant"}
    if calls:
        message["tool_plan"] = "".join(pieces)
        message["tool_calls"] = calls
    else:
        message["content"] = [{"type": "text", "text": "".join(pieces)}]
    return {
        "id": str(uuid.uuid4()),
        "message": message,
        "finish_reason": reason,
        "usage": _usage(payload, len(pieces)),
    }


def _message_end(reason: str, usage: dict[str, Any], error: str | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {"finish_reason": reason, "usage": usage}
    if reason == "ERROR":
        delta["error"] = error or "internal error during generation (mock)"
    return {"type": "message-end", "delta": delta}


def _chat_events(payload: dict[str, Any], behaviour: CohereBehaviour | None) -> Iterator[dict[str, Any]]:
    pieces, calls, reason = _pieces(payload, behaviour)
    empty = {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}
    yield {"id": str(uuid.uuid4()), "type": "message-start", "delta": {"message": empty}}
    if calls:
        for piece in pieces:
            yield {"type": "tool-plan-delta", "delta": {"message": {"tool_plan": piece}}}
        for i, call in enumerate(calls):
            arguments = call["function"]["arguments"]
            start = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
            yield {"type": "tool-call-start", "index": i, "delta": {"message": {"tool_calls": start}}}
            for at in range(0, len(arguments), 5):  # arguments arrive in fragments, as from the model
                fragment = {"function": {"arguments": arguments[at : at + 5]}}
                yield {"type": "tool-call-delta", "index": i, "delta": {"message": {"tool_calls": fragment}}}
            yield {"type": "tool-call-end", "index": i}
    else:
        yield {
            "type": "content-start",
            "index": 0,
            "delta": {"message": {"content": {"type": "text", "text": ""}}},
        }
        for piece in pieces:
            yield {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": piece}}}}
        yield {"type": "content-end", "index": 0}
    yield _message_end(reason, _usage(payload, len(pieces)))


def _embed(payload: dict[str, Any]) -> dict[str, Any]:
    texts = payload["texts"]
    size = payload.get("output_dimension") or 8
    vectors = [embedding_vector(text, size) for text in texts]
    out: dict[str, Any] = {}
    for kind in payload.get("embedding_types") or ["float"]:
        if kind == "float":
            out["float"] = vectors
        else:
            out["base64"] = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
    billed = sum(len(words(t)) for t in texts)
    return {
        "id": str(uuid.uuid4()),
        "embeddings": out,
        "texts": texts,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": billed}},
        "response_type": "embeddings_by_type",
    }


MockCohere.connection_class = CohereConnection
