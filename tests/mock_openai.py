"""A loopback stand-in for the OpenAI API, for tests that need a real upstream.

`MockOpenAI` is a small HTTP/1.1 server (asyncio + h11, run in a background
thread) that answers under `/v1` in OpenAI's wire format:

    POST /v1/chat/completions    echo of the last user message, stream or not
    POST /v1/completions         legacy text completion, stream or not
    POST /v1/embeddings          deterministic vectors, float or base64
    POST /v1/images/generations  url or b64_json images
    GET  /v1/models, /v1/models/{id}

Every request is recorded (`mock.requests`: method, path, query, headers as a
list, raw body) so a test can assert what a gateway forwarded. A request must
carry `Authorization: Bearer <api_key>`, or it gets OpenAI's 401 (`mock.api_keys` holds
every key accepted: add to it for a gateway provider with several keys).

Behaviour is switched per test with `mock.behave(...)`, matched on the request's
upstream `model` and/or path; it returns a `Behaviour` that also reports what
happened (hits, and `disconnected`, set when the client closed its connection
before the response was complete):

    b = mock.behave(model="mock-gpt", status=429)                 # OpenAI error body
    b = mock.behave(key="sk-b", status=429)                       # only requests sent with that key
    b = mock.behave(model="mock-gpt", delay_head=3)               # slow first byte
    b = mock.behave(model="mock-gpt", hang=True)                  # never answers
    b = mock.behave(model="mock-gpt", chunks=20, chunk_delay=0.1) # slow stream
    b = mock.behave(model="mock-gpt", chunks=5, reset_after=2)    # TCP RST mid-stream
    assert b.wait_disconnected(1.0)

A hand-written server rather than uvicorn, because uvicorn cannot reset a
connection, and h11 is strict about framing, so a malformed upstream request
from the gateway is caught (recorded in `mock.protocol_errors`, answered 400).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

import h11

DEFAULT_API_KEY = "sk-upstream-secret"
EMBEDDING_DIMENSIONS = 8
MODELS = ("mock-gpt-upstream", "mock-embed", "mock-image", "mock-instruct")

# Default error bodies per status, worded as the real API words them.
ERRORS: dict[int, dict[str, Any]] = {
    400: {"message": "Invalid request (mock).", "type": "invalid_request_error", "param": None, "code": None},
    401: {
        "message": "Incorrect API key provided. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    },
    403: {
        "message": "You are not allowed to sample from this model",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    },
    404: {
        "message": "The model does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    },
    429: {
        "message": "Rate limit reached for requests (mock). Please try again in 1s.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    },
    500: {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    },
    503: {
        "message": "The engine is currently overloaded, please try again later.",
        "type": "server_error",
        "param": None,
        "code": None,
    },
}


@dataclass
class RecordedRequest:
    method: str
    path: str  # percent-decoded, without the query
    query: str
    target: str  # the request-target exactly as received
    headers: list[tuple[str, str]]  # (lower-cased name, value), in order, repeats kept
    raw_headers: list[tuple[bytes, bytes]]  # names as sent
    body: bytes
    http_version: str
    received_at: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        """The first value of header `name`, or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Behaviour:
    """One rule for `MockOpenAI`: what to do with the requests it matches, and what it saw."""

    model: str | None = None  # matches the request body's "model"
    path: str | None = None  # matches the path, e.g. "/v1/chat/completions"
    status: int = 200
    error: dict[str, Any] | None = None  # error fields merged over ERRORS[status]
    body: bytes | None = None  # a raw response body instead of the generated one
    headers: list[tuple[str, str]] = field(default_factory=list)  # extra response headers
    delay_head: float = 0.0  # seconds before the response head
    hang: bool = False  # never answer; wait for the client to go away
    chunks: int | None = None  # stream content as this many chunks "chunk0 ", "chunk1 ", ...
    chunk_delay: float = 0.0  # seconds between stream events
    end_delay: float = 0.0  # seconds between `data: [DONE]` and the stream's end (its last chunk)
    reset_after: int | None = None  # abort the TCP connection (RST) after this many content chunks
    error_after: int | None = None  # send an in-stream error event after this many content chunks
    times: int | None = None  # match only this many requests (None: every one)
    key: str | None = None  # matches requests carrying this credential (any of the providers' headers)

    hits: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    completed: threading.Event = field(default_factory=threading.Event)

    def matches(self, path: str, model: Any, key: str | None = None) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.key is not None and self.key != key:
            return False
        if self.path is not None and self.path != path:
            return False
        return self.model is None or self.model == model

    def wait_disconnected(self, timeout: float) -> bool:
        """True once a client closed its connection before this rule's response was complete."""
        return self.disconnected.wait(timeout)


class _ClientGone(Exception):
    """The client closed (or reset) its connection while we were answering."""


class _Reset(Exception):
    """A behaviour asked for the connection to be reset."""


class MockOpenAI:
    """The server; use as a context manager or call `start()` / `stop()`.

    Other providers' mocks subclass it and its `Connection`, overriding
    `Connection.check_auth`, `Connection.error_body` and `Connection.route`.
    """

    connection_class: type[Connection]

    def __init__(self, api_key: str = DEFAULT_API_KEY, host: str = "127.0.0.1") -> None:
        self.api_key = api_key
        self.api_keys = {api_key}  # every key accepted
        self.host = host
        self.port = 0
        self.requests: list[RecordedRequest] = []
        self.protocol_errors: list[str] = []
        self.connections = 0
        self._behaviours: list[Behaviour] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._counter = 0
        self._startup_error: BaseException | None = None

    # -- control, from the test's thread --------------------------------

    @property
    def url(self) -> str:
        """The server's origin; the OpenAI base_url is `url + "/v1"`."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def behave(self, **kwargs: Any) -> Behaviour:
        """Add a rule (see `Behaviour`); the newest matching rule wins."""
        behaviour = Behaviour(**kwargs)
        with self._lock:
            self._behaviours.insert(0, behaviour)
        return behaviour

    def reset(self) -> None:
        """Forget rules and recorded requests (between tests)."""
        with self._lock:
            self._behaviours.clear()
            self.requests.clear()
            self.protocol_errors.clear()

    def requests_to(self, path: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def wait_for_requests(self, count: int, timeout: float) -> list[RecordedRequest]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.01)
        with self._lock:
            return list(self.requests)

    def start(self) -> MockOpenAI:
        self._thread = threading.Thread(target=self._run, name="mock-openai", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("mock OpenAI server did not start within 10 s")
        if self._startup_error is not None:
            raise RuntimeError("mock OpenAI server failed to start") from self._startup_error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)

    def __enter__(self) -> MockOpenAI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the server, on its own thread -----------------------------------

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_server(self._on_connection, self.host, 0)
        except OSError as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=5)
        await server.wait_closed()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self.connection_class(self, reader, writer).run()
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _choose(self, path: str, model: Any, key: str | None = None) -> Behaviour | None:
        with self._lock:
            for behaviour in self._behaviours:
                if behaviour.matches(path, model, key):
                    behaviour.hits += 1
                    return behaviour
        return None

    def _next_id(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter


class Connection:
    """One client connection: keep-alive request cycles until either side closes."""

    def __init__(self, mock: MockOpenAI, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.mock = mock
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER)
        self.gone = asyncio.Event()
        self.pending = bytearray()  # bytes read while a response was being written
        self._current: Behaviour | None = None  # the rule answering the request in progress

    async def run(self) -> None:
        while True:
            try:
                request = await self._read_request()
            except h11.RemoteProtocolError as exc:
                self.mock.protocol_errors.append(str(exc))
                if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._send_simple(400, _error_body(400, {"message": f"Bad HTTP framing: {exc}"}))
                return
            if request is None:
                return
            self.mock._record(request)
            try:
                await self._respond(request)
            except (_ClientGone, ConnectionError):
                return
            except _Reset:
                # Let the chunks already written reach the client: an RST discards unsent data.
                await asyncio.sleep(0.05)
                _abort_with_rst(self.writer)
                return
            if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is h11.MUST_CLOSE:
                return
            try:
                self.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_request(self) -> RecordedRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                if self.pending:
                    data, self.pending = bytes(self.pending), bytearray()
                else:
                    try:
                        data = await self.reader.read(65536)
                    except ConnectionError:
                        return None
                self.h11.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return _recorded(head, bytes(body))
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    async def _watch_client(self) -> None:
        """Notice the client going away while we answer (or pause) mid-response."""
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self.pending += data
        except ConnectionError:
            pass
        self.gone.set()

    async def _respond(self, request: RecordedRequest) -> None:
        watcher = asyncio.create_task(self._watch_client())
        self._current = None
        try:
            await self._dispatch(request)
        except _ClientGone:
            if self._current is not None:
                self._current.disconnected.set()
            raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if self._current is not None:
            self._current.completed.set()

    async def _dispatch(self, request: RecordedRequest) -> None:
        try:
            payload = request.json() if request.body else None
        except ValueError:
            payload = None
        model = payload.get("model") if isinstance(payload, dict) else None
        bearer = request.header("authorization") or ""
        key = request.header("x-api-key") or request.header("api-key") or bearer.removeprefix("Bearer ")
        behaviour = self._current = self.mock._choose(request.path, model, key or None)
        if behaviour is not None:
            behaviour.requests.append(request)
            if behaviour.hang:
                await self._wait_gone(None)
            if behaviour.delay_head:
                await self._wait_gone(behaviour.delay_head)

        if not await self.check_auth(request):
            return
        if behaviour is not None and behaviour.status >= 400:
            body = behaviour.body or self.error_body(behaviour.status, behaviour.error or {})
            await self._send_json(behaviour.status, body, behaviour.headers)
        elif behaviour is not None and behaviour.body is not None:
            await self._send_json(behaviour.status, behaviour.body, behaviour.headers)
        else:
            await self.route(request, payload, behaviour)

    async def check_auth(self, request: RecordedRequest) -> bool:
        """Answer 401 as the provider does when the credential is missing or wrong."""
        if request.header("authorization") in {f"Bearer {key}" for key in self.mock.api_keys}:
            return True
        missing = request.header("authorization") is None
        fields = {"message": _NO_KEY, "code": None} if missing else {}
        await self._send_json(401, _error_body(401, fields))
        return False

    def error_body(self, status: int, fields: dict[str, Any]) -> bytes:
        """The provider's error body for `status`, with `fields` overriding the defaults."""
        return _error_body(status, fields)

    async def route(self, request: RecordedRequest, payload: Any, behaviour: Behaviour | None) -> None:
        method, path = request.method, request.path
        routes = {
            "/v1/chat/completions": _chat,
            "/v1/completions": _completion,
            "/v1/embeddings": _embeddings,
            "/v1/images/generations": _images,
        }
        if path in routes and method == "POST":
            if not isinstance(payload, dict):
                await self._send_json(400, _error_body(400, {"message": _BAD_JSON}))
                return
            problem = _validate(path, payload)
            if problem is not None:
                await self._send_json(400, _error_body(400, problem))
                return
            created = int(time.time())
            ident = self.mock._next_id()
            if payload.get("stream") is True and path in ("/v1/chat/completions", "/v1/completions"):
                await self._stream(path, payload, behaviour, created, ident)
                return
            result = routes[path](payload, behaviour, created, ident)
            await self._send_json(200, json.dumps(result).encode(), behaviour.headers if behaviour else [])
        elif path == "/v1/models" and method == "GET":
            data = [_model_object(name) for name in MODELS]
            await self._send_json(200, json.dumps({"object": "list", "data": data}).encode())
        elif path.startswith("/v1/models/") and method == "GET":
            name = path.removeprefix("/v1/models/")
            if name in MODELS:
                await self._send_json(200, json.dumps(_model_object(name)).encode())
            else:
                message = f"The model '{name}' does not exist"
                await self._send_json(404, _error_body(404, {"message": message, "param": "model"}))
        else:
            message = f"Invalid URL ({method} {path})"
            await self._send_json(404, _error_body(404, {"message": message, "code": None}))

    async def _stream(
        self, path: str, payload: dict[str, Any], behaviour: Behaviour | None, created: int, ident: int
    ) -> None:
        headers = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]
        await self._send_head(200, headers + (behaviour.headers if behaviour else []))
        delay = behaviour.chunk_delay if behaviour else 0.0
        reset_after = behaviour.reset_after if behaviour else None
        error_after = behaviour.error_after if behaviour else None
        make = _chat_stream if path == "/v1/chat/completions" else _completion_stream
        content_sent = 0
        for index, (kind, event) in enumerate(make(payload, behaviour, created, ident)):
            if index and delay:
                await self._wait_gone(delay)
            if kind == "content":
                if reset_after is not None and content_sent == reset_after:
                    raise _Reset
                if error_after is not None and content_sent == error_after:
                    error = _error_body(500, behaviour.error if behaviour and behaviour.error else {})
                    await self._send_data(b"data: " + error + b"\n\n")
                    await self._send_end()
                    return
                content_sent += 1
            await self._send_data(b"data: " + json.dumps(event).encode() + b"\n\n")
        await self._send_data(b"data: [DONE]\n\n")
        if behaviour and behaviour.end_delay:
            await self._wait_gone(behaviour.end_delay)
        await self._send_end()

    # -- writing -----------------------------------------------------------

    async def _wait_gone(self, seconds: float | None) -> None:
        """Sleep `seconds` (None: forever), raising _ClientGone if the client leaves meanwhile."""
        try:
            await asyncio.wait_for(self.gone.wait(), seconds)
        except TimeoutError:
            return
        raise _ClientGone

    async def _write(self, data: bytes) -> None:
        if self.gone.is_set() or self.writer.is_closing():
            raise _ClientGone
        self.writer.write(data)
        try:
            await self.writer.drain()
        except ConnectionError as exc:
            raise _ClientGone from exc

    async def _send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        all_headers = [
            ("date", formatdate(usegmt=True)),
            ("x-request-id", f"req_mock{self.mock._next_id():08d}"),
            ("openai-version", "2020-10-01"),
            ("openai-processing-ms", "1"),
            *headers,
        ]
        await self._write(self.h11.send(h11.Response(status_code=status, headers=all_headers)) or b"")

    async def _send_data(self, data: bytes) -> None:
        await self._write(self.h11.send(h11.Data(data=data)) or b"")

    async def _send_end(self) -> None:
        await self._write(self.h11.send(h11.EndOfMessage()) or b"")

    async def _send_json(
        self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None
    ) -> None:
        extra = list(headers or [])
        if status == 429 and not any(k.lower() == "retry-after" for k, _ in extra):
            extra.append(("retry-after", "1"))
        await self._send_head(
            status,
            [("content-type", "application/json"), ("content-length", str(len(body))), *extra],
        )
        await self._send_data(body)
        await self._send_end()

    async def _send_simple(self, status: int, body: bytes) -> None:
        with contextlib.suppress(h11.LocalProtocolError, _ClientGone, ConnectionError):
            await self._send_json(status, body, [("connection", "close")])


# -- requests ------------------------------------------------------------------

_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
    "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)


def _recorded(head: h11.Request, body: bytes) -> RecordedRequest:
    target = head.target.decode("latin-1")
    raw_path, _, query = target.partition("?")
    raw = list(head.headers.raw_items())
    return RecordedRequest(
        method=head.method.decode("ascii"),
        path=unquote(raw_path),
        query=query,
        target=target,
        headers=[(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw],
        raw_headers=raw,
        body=body,
        http_version=head.http_version.decode("ascii"),
    )


def _validate(path: str, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The few checks the real API makes that catch a mangled forwarded body."""
    if not isinstance(payload.get("model"), str):
        return {"message": "you must provide a model parameter", "param": None}
    required = {
        "/v1/chat/completions": "messages",
        "/v1/completions": "prompt",
        "/v1/embeddings": "input",
        "/v1/images/generations": "prompt",
    }[path]
    if required not in payload:
        return {
            "message": f"Missing required parameter: '{required}'.",
            "param": required,
            "code": "missing_required_parameter",
        }
    if path == "/v1/chat/completions" and not isinstance(payload["messages"], list):
        return {
            "message": "Invalid type for 'messages': expected an array, but got a string instead.",
            "param": "messages",
            "code": "invalid_type",
        }
    return None


def _error_body(status: int, fields: dict[str, Any]) -> bytes:
    base = dict(ERRORS.get(status, ERRORS[500] if status >= 500 else ERRORS[400]))
    base.update(fields)
    return json.dumps({"error": base}).encode()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# -- responses -----------------------------------------------------------------


def words(text: str) -> list[str]:
    """How the mock counts tokens: whitespace-separated words."""
    return text.split()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def echo_text(messages: list[Any]) -> str:
    """The reply of the chat endpoint: "echo: " + the last user message."""
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return "echo: " + (_text_of(users[-1].get("content")) if users else "")


def prompt_tokens(payload: dict[str, Any]) -> int:
    if "messages" in payload:
        return sum(len(words(_text_of(m.get("content")))) for m in payload["messages"] if isinstance(m, dict))
    prompt = payload.get("prompt", payload.get("input", ""))
    items = prompt if isinstance(prompt, list) else [prompt]
    return sum(len(words(p)) if isinstance(p, str) else len(p) if isinstance(p, list) else 1 for p in items)


def _pieces(text: str, behaviour: Behaviour | None) -> list[str]:
    if behaviour is not None and behaviour.chunks is not None:
        return [f"chunk{i} " for i in range(behaviour.chunks)]
    return re.findall(r"\S+\s*|\s+", text) or [""]


def _usage(prompt: int, completion: int, chat: bool) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if chat:
        usage["prompt_tokens_details"] = {"cached_tokens": 0, "audio_tokens": 0}
        usage["completion_tokens_details"] = {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return usage


def _chat(payload: dict[str, Any], behaviour: Behaviour | None, created: int, ident: int) -> dict[str, Any]:
    pieces = _pieces(echo_text(payload["messages"]), behaviour)
    n = payload.get("n") or 1
    return {
        "id": f"chatcmpl-mock{ident}",
        "object": "chat.completion",
        "created": created,
        "model": payload["model"],
        "choices": [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": "".join(pieces),
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i in range(n)
        ],
        "usage": _usage(prompt_tokens(payload), len(pieces) * n, chat=True),
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }


def _chat_stream(
    payload: dict[str, Any], behaviour: Behaviour | None, created: int, ident: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind, chunk) pairs: a role chunk, one "content" chunk per piece, the finish, the usage."""
    pieces = _pieces(echo_text(payload["messages"]), behaviour)
    options = payload.get("stream_options") or {}
    include_usage = options.get("include_usage") is True
    base: dict[str, Any] = {
        "id": f"chatcmpl-mock{ident}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": payload["model"],
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }

    def chunk(choices: list[dict[str, Any]], usage: Any = None, obfuscate: bool = True) -> dict[str, Any]:
        out = {**base, "choices": choices}
        if include_usage:
            out["usage"] = usage
        if obfuscate and options.get("include_obfuscation", True):
            out["obfuscation"] = "mock"
        return out

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    yield "role", chunk(choice({"role": "assistant", "content": "", "refusal": None}))
    for piece in pieces:
        yield "content", chunk(choice({"content": piece}))
    yield "finish", chunk(choice({}, "stop"))
    if include_usage:
        yield "usage", chunk([], _usage(prompt_tokens(payload), len(pieces), chat=True))


def _completion_text(payload: dict[str, Any]) -> str:
    prompt = payload["prompt"]
    first = prompt[0] if isinstance(prompt, list) and prompt else prompt
    if first is None:  # a null prompt: the model starts a new document
        return "echo: "
    if isinstance(first, int):  # one prompt of token ids
        first = prompt
    return "echo: " + (first if isinstance(first, str) else " ".join(map(str, first)))


def _completion(
    payload: dict[str, Any], behaviour: Behaviour | None, created: int, ident: int
) -> dict[str, Any]:
    pieces = _pieces(_completion_text(payload), behaviour)
    return {
        "id": f"cmpl-mock{ident}",
        "object": "text_completion",
        "created": created,
        "model": payload["model"],
        "choices": [{"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": _usage(prompt_tokens(payload), len(pieces), chat=False),
        "system_fingerprint": "fp_mock",
    }


def _completion_stream(
    payload: dict[str, Any], behaviour: Behaviour | None, created: int, ident: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    pieces = _pieces(_completion_text(payload), behaviour)
    include_usage = (payload.get("stream_options") or {}).get("include_usage") is True
    base = {
        "id": f"cmpl-mock{ident}",
        "object": "text_completion",
        "created": created,
        "model": payload["model"],
    }
    for i, piece in enumerate(pieces):
        finish = "stop" if i == len(pieces) - 1 else None
        out = {**base, "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            out["usage"] = None
        yield "content", out
    if include_usage:
        yield (
            "usage",
            {**base, "choices": [], "usage": _usage(prompt_tokens(payload), len(pieces), chat=False)},
        )


def embedding_vector(item: Any, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """The mock's vector for one input: exact in float32, so base64 round-trips bit for bit."""
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    while len(digest) < dimensions:
        digest += hashlib.sha256(digest).digest()
    return [(b - 128) / 128 for b in digest[:dimensions]]


def _embeddings(
    payload: dict[str, Any], behaviour: Behaviour | None, created: int, ident: int
) -> dict[str, Any]:
    raw = payload["input"]
    # A list of strings or of token arrays is a batch; a string or one token array is one input.
    batch = isinstance(raw, list) and bool(raw) and not all(isinstance(x, int) for x in raw)
    items = raw if batch else [raw]
    dimensions = payload.get("dimensions") or EMBEDDING_DIMENSIONS
    data = []
    for i, item in enumerate(items):
        vector = embedding_vector(item, dimensions)
        if payload.get("encoding_format") == "base64":
            encoded: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            encoded = vector
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    tokens = prompt_tokens({"input": items})
    return {
        "object": "list",
        "data": data,
        "model": payload["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# The smallest valid PNG (1x1, transparent), for b64_json images.
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def _images(payload: dict[str, Any], behaviour: Behaviour | None, created: int, ident: int) -> dict[str, Any]:
    n = payload.get("n") or 1
    as_b64 = payload.get("response_format") == "b64_json"
    data = [
        {"b64_json": base64.b64encode(TINY_PNG).decode(), "revised_prompt": payload["prompt"]}
        if as_b64
        else {"url": f"https://images.mock.invalid/{ident}/{i}.png", "revised_prompt": payload["prompt"]}
        for i in range(n)
    ]
    return {"created": created, "data": data}


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1700000000, "owned_by": "mock"}


MockOpenAI.connection_class = Connection
