"""A loopback stand-in for Anthropic's Messages API, on `MockOpenAI`'s server plumbing.

    POST /v1/messages    stream or not, written from the API reference and checked
                         against the official `anthropic` SDK (tests/unit/test_mock_anthropic.py)

The base URL is the server's origin (`mock.base_url`), as the SDK takes it. A
request needs the key (`x-api-key: <api_key>` or `Authorization: Bearer <api_key>`,
else 401 authentication_error) and an `anthropic-version` header (else 400), and the body is checked as the API checks
it: `max_tokens` required, no unknown top-level fields, user/assistant roles, and
every `tool_result` answering a `tool_use` of the message just before (and every
`tool_use` answered in the next message).

What it answers, deterministically:
- text "echo: <text of the last user message>", or, when that message carries tool
  results, "tool result: <their contents joined by ' | '>";
- `tool_use` blocks when the request has `tools` and the last user text says
  `call <tool_name>` (optionally followed by a JSON object, the tool's input), one
  block per such phrase; a forcing `tool_choice` (`any`, `tool`) calls a tool even
  unasked (and, as the API does then, writes no text first); `none` never does;
- `stop_sequences` cut the text (stop_reason "stop_sequence"); more words than
  `max_tokens` cut it too (stop_reason "max_tokens");
- usage: one token per word; the system prompt's words are reported as read from the
  prompt cache (`cache_read_input_tokens`), the rest as `input_tokens`.

`mock.behave(...)` works as for MockOpenAI: `status=529` answers Anthropic's
overloaded error, `error_after=N` sends an `error` event after N text deltas,
`chunks`, `chunk_delay`, `reset_after`, `delay_head`, `hang` likewise.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import h11

from tests.mock_openai import Behaviour, Connection, MockOpenAI, RecordedRequest, _pieces, _Reset, words

DEFAULT_API_KEY = "sk-ant-mock-secret"
VERSION = "2023-06-01"

# Status -> (error type, default message), as the API reference lists them.
ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request (mock)."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found (mock)."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit (mock)."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out (mock)."),
    529: ("overloaded_error", "Overloaded"),
}
# The top-level fields the Messages API accepts; any other is "Extra inputs are not permitted".
FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
        "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier",
        "container", "context_management", "mcp_servers", "cache_control", "inference_geo",
        "output_config", "speed", "diagnostics",
    }
)  # fmt: skip
_CALL = re.compile(r"\bcall (\w+)")


def error_json(status: int, fields: dict[str, Any] | None = None, request_id: str = "req_mock") -> bytes:
    kind, message = ERRORS.get(status, ERRORS[500] if status >= 500 else ERRORS[400])
    error = {"type": kind, "message": message, **(fields or {})}
    return json.dumps({"type": "error", "error": error, "request_id": request_id}).encode()


class MockAnthropic(MockOpenAI):
    """The server; `mock.base_url` is what `anthropic.Anthropic(base_url=...)` takes."""

    connection_class: type[Connection]

    def __init__(self, api_key: str = DEFAULT_API_KEY, host: str = "127.0.0.1") -> None:
        super().__init__(api_key=api_key, host=host)

    @property
    def base_url(self) -> str:
        return self.url


# -- what to answer ------------------------------------------------------------


@dataclass
class Reply:
    """One planned answer: text pieces, tool calls, stop reason and token counts."""

    text: bool  # whether a text block comes first
    pieces: list[str]
    calls: list[tuple[str, str, dict[str, Any]]]  # (id, name, input)
    stop_reason: str
    stop_sequence: str | None
    input_tokens: int
    cached_tokens: int
    output_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.output_tokens = len(self.pieces) + len(self.calls)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = []
    for block in content:
        if isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif isinstance(block, dict) and block.get("type") == "tool_result":
            parts.append(_text(block.get("content")))
    return " ".join(parts)


def _calls(text: str, tools: list[dict[str, Any]], choice: dict[str, Any], ident: int) -> list[Any]:
    names = [str(t.get("name")) for t in tools]
    wanted: list[tuple[str, dict[str, Any]]] = []
    for match in _CALL.finditer(text):
        if match.group(1) not in names:
            continue
        rest = text[match.end() :].lstrip()
        tool_input: Any = {}
        if rest.startswith("{"):
            try:
                tool_input, _ = json.JSONDecoder().raw_decode(rest)
            except ValueError:
                tool_input = {}
        wanted.append((match.group(1), tool_input))
    kind = choice.get("type", "auto")
    if kind == "none":
        wanted = []
    elif kind == "tool":
        forced = str(choice.get("name"))
        wanted = [w for w in wanted if w[0] == forced] or [(forced, {})]
    elif kind == "any" and not wanted:
        wanted = [(names[0], {})]
    if choice.get("disable_parallel_tool_use"):
        wanted = wanted[:1]
    return [(f"toolu_mock{ident:04d}{i}", name, args) for i, (name, args) in enumerate(wanted)]


def plan(payload: dict[str, Any], behaviour: Behaviour | None, ident: int) -> Reply:
    messages = payload["messages"]
    users = [m for m in messages if m.get("role") == "user"]
    last = users[-1]["content"] if users else ""
    results = (
        [b for b in last if isinstance(b, dict) and b.get("type") == "tool_result"]
        if isinstance(last, list)
        else []
    )
    if results:
        text = "tool result: " + " | ".join(_text(r.get("content")) for r in results)
    else:
        text = "echo: " + _text(last)
    choice = payload.get("tool_choice") or {}
    calls = _calls(_text(last), payload.get("tools") or [], choice, ident) if payload.get("tools") else []
    stop_reason, stop_sequence = ("tool_use" if calls else "end_turn"), None
    cuts = [(text.find(s), s) for s in payload.get("stop_sequences") or [] if s and s in text]
    if cuts:
        at, stop_sequence = min(cuts)
        text, stop_reason, calls = text[:at], "stop_sequence", []
    pieces = _pieces(text, behaviour)
    if len(pieces) > payload["max_tokens"]:
        pieces, stop_reason, stop_sequence, calls = pieces[: payload["max_tokens"]], "max_tokens", None, []
    system = _text(payload.get("system"))
    return Reply(
        text=not (calls and choice.get("type") in ("any", "tool")),
        pieces=pieces,
        calls=calls,
        stop_reason=stop_reason,
        stop_sequence=stop_sequence,
        input_tokens=sum(len(words(_text(m.get("content")))) for m in messages),
        cached_tokens=len(words(system)),
    )


def validate(payload: Any) -> str | None:
    """The first problem the real API would report, worded as it words them, or None."""
    if not isinstance(payload, dict):
        return "Request body must be a JSON object."
    for name in payload:
        if name not in FIELDS:
            return f"{name}: Extra inputs are not permitted"
    for name in ("model", "messages", "max_tokens"):
        if name not in payload:
            return f"{name}: Field required"
    if not isinstance(payload["max_tokens"], int) or payload["max_tokens"] < 1:
        return "max_tokens: Input should be greater than or equal to 1"
    temperature = payload.get("temperature", 0)
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 1:
        return "temperature: Input should be less than or equal to 1"
    if set(payload.get("metadata") or {}) - {"user_id"}:
        return "metadata: only user_id is permitted"
    messages = payload["messages"]
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    for i, tool in enumerate(payload.get("tools") or []):
        if not isinstance(tool, dict) or "input_schema" not in tool or "name" not in tool:
            return f"tools.{i}.input_schema: Field required"
        if not isinstance(tool["input_schema"], dict) or tool["input_schema"].get("type") != "object":
            return f"tools.{i}.input_schema.type: Input should be 'object'"
    pending: set[str] = set()  # tool_use ids the next message must answer
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        content = message.get("content")
        if not isinstance(content, (str, list)):
            return f"messages.{i}.content: Input should be a valid list"
        blocks = content if isinstance(content, list) else []
        for j, block in enumerate(blocks):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                return f"messages.{i}.content.{j}: Input should be a valid dictionary"
        answered = {b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"}
        if answered - pending or (message["role"] == "assistant" and answered):
            return (
                f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{sorted(map(str, answered - pending))}. Each `tool_result` block must have a "
                "corresponding `tool_use` block in the previous message."
            )
        if pending - answered:
            return (
                f"messages.{i - 1}: `tool_use` ids were found without `tool_result` blocks immediately "
                f"after: {sorted(pending - answered)}. Each `tool_use` block must have a corresponding "
                "`tool_result` block in the next message."
            )
        pending = {b["id"] for b in blocks if b.get("type") == "tool_use"}
    return None


# -- the wire ----------------------------------------------------------------


class AnthropicConnection(Connection):
    mock: MockAnthropic

    async def check_auth(self, request: RecordedRequest) -> bool:
        # The API takes the key as `x-api-key` (what the gateway sends) or as a bearer token (what
        # the SDK sends since 2.x).
        key = request.header("x-api-key")
        bearer = request.header("authorization")
        if key != self.mock.api_key and bearer != f"Bearer {self.mock.api_key}":
            missing = key is None and bearer is None
            message = "x-api-key header is required" if missing else "invalid x-api-key"
            await self._send_json(401, self.error_body(401, {"message": message}))
            return False
        if not request.header("anthropic-version"):
            message = "anthropic-version: header is required"
            await self._send_json(400, self.error_body(400, {"message": message}))
            return False
        return True

    def error_body(self, status: int, fields: dict[str, Any]) -> bytes:
        return error_json(status, fields, f"req_mock{self.mock._next_id():08d}")

    async def _send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        # Anthropic's head fields, not OpenAI's (no openai-version / openai-processing-ms).
        head = [("date", formatdate(usegmt=True)), ("request-id", f"req_mock{self.mock._next_id():08d}")]
        await self._write(self.h11.send(h11.Response(status_code=status, headers=head + headers)) or b"")

    async def route(self, request: RecordedRequest, payload: Any, behaviour: Behaviour | None) -> None:
        if (request.method, request.path) != ("POST", "/v1/messages"):
            await self._send_json(404, self.error_body(404, {"message": "Not Found"}))
            return
        problem = validate(payload)
        if problem is not None:
            await self._send_json(400, self.error_body(400, {"message": problem}))
            return
        ident = self.mock._next_id()
        reply = plan(payload, behaviour, ident)
        message_id = f"msg_mock{ident:08d}"
        if payload.get("stream") is True:
            await self._stream_message(message_id, payload["model"], reply, behaviour)
            return
        content: list[dict[str, Any]] = []
        if reply.text:
            content.append({"type": "text", "text": "".join(reply.pieces)})
        content += [{"type": "tool_use", "id": i, "name": n, "input": a} for i, n, a in reply.calls]
        body = {
            **_message(message_id, payload["model"], reply),
            "content": content,
            "stop_reason": reply.stop_reason,
            "stop_sequence": reply.stop_sequence,
        }
        body["usage"]["output_tokens"] = reply.output_tokens
        await self._send_json(200, json.dumps(body).encode(), behaviour.headers if behaviour else [])

    async def _stream_message(
        self, message_id: str, model: str, reply: Reply, behaviour: Behaviour | None
    ) -> None:
        headers = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]
        await self._send_head(200, headers + (behaviour.headers if behaviour else []))
        delay = behaviour.chunk_delay if behaviour else 0.0
        reset_after = behaviour.reset_after if behaviour else None
        error_after = behaviour.error_after if behaviour else None
        sent = 0
        for index, (kind, event) in enumerate(_events(message_id, model, reply)):
            if index and delay:
                await self._wait_gone(delay)
            if kind == "content":
                if reset_after is not None and sent == reset_after:
                    raise _Reset
                if error_after is not None and sent == error_after:
                    error = json.loads(error_json(529, behaviour.error if behaviour else None))
                    await self._send_data(_sse({"type": "error", "error": error["error"]}))
                    await self._send_end()
                    return
                sent += 1
            await self._send_data(_sse(event))
        await self._send_end()


def _message(message_id: str, model: str, reply: Reply) -> dict[str, Any]:
    usage = {
        "input_tokens": reply.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": reply.cached_tokens,
        "output_tokens": 1,
        "service_tier": "standard",
    }
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }


def _fragments(tool_input: dict[str, Any]) -> list[str]:
    """Tool input JSON in pieces, as the API streams it: an empty first fragment, then cuts anywhere."""
    text = json.dumps(tool_input)
    step = max(1, len(text) // 3)
    return ["", *(text[i : i + step] for i in range(0, len(text), step))]


def _events(message_id: str, model: str, reply: Reply) -> list[tuple[str, dict[str, Any]]]:
    """(kind, event) in the API's order; kind "content" marks the text deltas behaviours count."""
    events: list[tuple[str, dict[str, Any]]] = [
        ("meta", {"type": "message_start", "message": _message(message_id, model, reply)})
    ]
    index = 0
    if reply.text:
        events.append(
            (
                "meta",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
        )
        events.append(("meta", {"type": "ping"}))
        for piece in reply.pieces:
            delta = {"type": "text_delta", "text": piece}
            events.append(("content", {"type": "content_block_delta", "index": 0, "delta": delta}))
        events.append(("meta", {"type": "content_block_stop", "index": 0}))
        index = 1
    for offset, (call_id, name, args) in enumerate(reply.calls):
        block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
        events.append(
            ("meta", {"type": "content_block_start", "index": index + offset, "content_block": block})
        )
        for fragment in _fragments(args):
            delta = {"type": "input_json_delta", "partial_json": fragment}
            events.append(("meta", {"type": "content_block_delta", "index": index + offset, "delta": delta}))
        events.append(("meta", {"type": "content_block_stop", "index": index + offset}))
    stop = {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence}
    events.append(
        ("meta", {"type": "message_delta", "delta": stop, "usage": {"output_tokens": reply.output_tokens}})
    )
    events.append(("meta", {"type": "message_stop"}))
    return events


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


MockAnthropic.connection_class = AnthropicConnection
