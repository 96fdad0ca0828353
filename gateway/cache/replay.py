"""One stored answer, either mode: a stream assembled into one JSON answer, a JSON answer cut into SSE.

For chat completions and legacy completions, the two shapes OpenAI streams.
Assembling merges what the chunks carry per choice: role, content and refusal
text, tool calls (and the legacy `function_call`) by index, finish reason,
token logprobs, and the usage chunk when there is one. Cutting emits, per
choice, a role-and-content chunk (with its logprobs), a tool-calls chunk, a
finish chunk, then the usage chunk only when the request asked for it
(`stream_options.include_usage`), then `data: [DONE]`. Ids and `created` are
the stored answer's. Anything else (another operation, an error event, a body
that does not parse) gives None: the caller treats the entry as a miss.

`fit` serves one entry to a request exactly as the upstream would have answered it:
a stream's usage event goes only to a request that asked for it (and is stripped
otherwise, as the live relay strips the one the gateway asked for), and a stream
stored without one does not serve a request that needs usage (a JSON answer always
carries it), so that request goes upstream and refills the entry.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.providers.base import USAGE_EVENT, UsageFilter

SSE_CONTENT_TYPE = b"text/event-stream; charset=utf-8"
JSON_CONTENT_TYPE = b"application/json"
_CHUNK = "chat.completion.chunk"
_TEXT = "text_completion"
# Top-level fields an answer and its chunks share.
_SHARED = ("id", "created", "model", "system_fingerprint", "service_tier")


def is_sse(content_type: bytes) -> bool:
    return content_type.startswith(b"text/event-stream")


def wants_usage(request: dict[str, Any]) -> bool:
    """Whether the answer carries usage: a JSON answer always, a stream only with `include_usage`."""
    if request.get("stream") is not True:
        return True
    options = request.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def fit(content_type: bytes, body: bytes, request: dict[str, Any]) -> tuple[bytes, bytes] | None:
    """The stored answer (`content_type`, `body`) as `request` must get it, or None when it cannot."""
    streaming, usage = request.get("stream") is True, wants_usage(request)
    if not is_sse(content_type):
        if not streaming:
            return content_type, body
        stream = json_to_sse(body, include_usage=usage)
        return None if stream is None else (SSE_CONTENT_TYPE, stream)
    if usage and not USAGE_EVENT.search(body):
        return None
    if not streaming:
        answer = sse_to_json(body)
        return None if answer is None else (JSON_CONTENT_TYPE, answer)
    if not usage:
        strip = UsageFilter()
        body = strip.feed(body) + strip.finish()
    return content_type, body


def _events(body: bytes) -> list[dict[str, Any]] | None:
    events: list[dict[str, Any]] = []
    for line in body.splitlines():
        if line.startswith(b"event:"):
            return None  # only errors are named events in OpenAI's streams
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            continue
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(event, dict) or "error" in event:
            return None
        events.append(event)
    return events


def sse_to_json(body: bytes) -> bytes | None:
    """The JSON answer a stream adds up to, or None."""
    events = _events(body)
    if not events or events[0].get("object") not in (_CHUNK, _TEXT):
        return None
    chat = events[0]["object"] == _CHUNK
    answer: dict[str, Any] = {k: events[0][k] for k in _SHARED if k in events[0]}
    answer["object"] = "chat.completion" if chat else _TEXT
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for event in events:
        usage = event.get("usage") or usage
        for part in event.get("choices") or ():
            choice = choices.setdefault(part.get("index", 0), {"texts": {}, "tools": {}, "logprobs": None})
            if chat:
                _merge_delta(choice, part.get("delta") or {})
            else:
                choice["texts"]["text"] = choice["texts"].get("text", "") + (part.get("text") or "")
            if part.get("finish_reason") is not None:
                choice["finish_reason"] = part["finish_reason"]
            choice["logprobs"] = _merge_logprobs(choice["logprobs"], part.get("logprobs"))
    answer["choices"] = [_choice(index, choices[index], chat) for index in sorted(choices)]
    if usage is not None:
        answer["usage"] = usage
    return orjson.dumps(answer)


def _merge_delta(choice: dict[str, Any], delta: dict[str, Any]) -> None:
    if delta.get("role"):
        choice["role"] = delta["role"]
    texts = choice["texts"]
    for field in ("content", "refusal"):
        if delta.get(field) is not None:
            texts[field] = texts.get(field, "") + delta[field]
    for call in delta.get("tool_calls") or ():
        merged = choice["tools"].setdefault(call.get("index", 0), {"function": {"name": "", "arguments": ""}})
        for field in ("id", "type"):
            if call.get(field):
                merged[field] = call[field]
        function = call.get("function") or {}
        for field in ("name", "arguments"):
            merged["function"][field] += function.get(field) or ""
    if delta.get("function_call"):
        merged = choice.setdefault("function_call", {"name": "", "arguments": ""})
        for field in ("name", "arguments"):
            merged[field] += delta["function_call"].get(field) or ""


def _merge_logprobs(merged: Any, part: Any) -> Any:
    """Token logprobs lists, concatenated key by key (chat: content/refusal; legacy: tokens...)."""
    if not isinstance(part, dict):
        return merged
    merged = dict(merged or {})
    for field, value in part.items():
        if isinstance(value, list):
            merged[field] = (merged.get(field) or []) + value
        else:
            merged.setdefault(field, value)
    return merged


def _choice(index: int, choice: dict[str, Any], chat: bool) -> dict[str, Any]:
    finish = choice.get("finish_reason")
    if not chat:
        text = choice["texts"].get("text", "")
        return {"text": text, "index": index, "logprobs": choice["logprobs"], "finish_reason": finish}
    texts = choice["texts"]
    message: dict[str, Any] = {
        "role": choice.get("role", "assistant"),
        "content": texts.get("content"),
        "refusal": texts.get("refusal"),
    }
    if choice["tools"]:
        message["tool_calls"] = [
            {"id": call.get("id", ""), "type": call.get("type", "function"), "function": call["function"]}
            for _, call in sorted(choice["tools"].items())
        ]
    if "function_call" in choice:
        message["function_call"] = choice["function_call"]
    return {"index": index, "message": message, "logprobs": choice["logprobs"], "finish_reason": finish}


def json_to_sse(body: bytes, *, include_usage: bool) -> bytes | None:
    """The stream a JSON answer would have been, or None."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(answer, dict) or answer.get("object") not in ("chat.completion", _TEXT):
        return None
    chat = answer["object"] == "chat.completion"
    base: dict[str, Any] = {k: answer[k] for k in _SHARED if k in answer}
    base["object"] = _CHUNK if chat else _TEXT
    if include_usage:
        base["usage"] = None  # as OpenAI: every chunk carries the field, the last one the numbers
    chunks = []
    for choice in answer.get("choices") or ():
        index = choice.get("index", 0)
        if not chat:
            chunks.append({**base, "choices": [{**choice, "index": index}]})
            continue
        message = choice.get("message") or {}
        delta = {"role": message.get("role", "assistant"), "content": message.get("content")}
        if message.get("refusal") is not None:
            delta["refusal"] = message["refusal"]
        chunks.append({**base, "choices": [_delta(index, delta, choice.get("logprobs"))]})
        calls = message.get("tool_calls")
        if calls:
            indexed = [{"index": i, **call} for i, call in enumerate(calls)]
            chunks.append({**base, "choices": [_delta(index, {"tool_calls": indexed})]})
        if message.get("function_call"):
            chunks.append({**base, "choices": [_delta(index, {"function_call": message["function_call"]})]})
        chunks.append({**base, "choices": [_delta(index, {}, finish=choice.get("finish_reason"))]})
    if include_usage and answer.get("usage") is not None:
        chunks.append({**base, "choices": [], "usage": answer["usage"]})
    return b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


def _delta(
    index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
