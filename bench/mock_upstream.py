"""Zero-delay mock upstream of the benchmark: the OpenAI API, and the streams of the translated providers.

A raw asyncio protocol on uvloop with the httptools parser, so its own cost (tens of µs per
request) stays small next to the gateway it serves. HTTP/1.1 keep-alive; every answer is written
synchronously, which also keeps pipelined requests in order.

  POST /v1/chat/completions   chat.completion JSON (content-length), or with "stream": true an SSE
                              stream (chunked): role chunk, N content chunks, finish chunk, a usage
                              chunk when stream_options.include_usage, then `data: [DONE]`.
                              N = max_tokens (or max_completion_tokens), else --chunks.
  POST /v1/embeddings         one --embed-dim vector per input
  GET  /v1/models             the model list
  POST /v1/messages           Anthropic Messages stream ("stream": true only): message_start,
                              content_block_start, ping, N text deltas, content_block_stop,
                              message_delta (stop_reason, usage), message_stop
  POST /v2/chat               Cohere v2 chat stream ("stream": true only): message-start,
                              content-start, N content-delta, content-end, message-end (usage),
                              then `data: [DONE]`
  POST /openai/deployments/{d}/chat/completions?api-version=...
                              Azure OpenAI: OpenAI's answers with Azure's content-filter fields; a
                              stream opens with the prompt-filter event (`choices: []`, `object: ""`)
  Event shapes follow tests/mock_anthropic.py, tests/mock_cohere.py and tests/mock_azure.py
  (compact JSON, as the real APIs write it). A model (Azure: deployment) ending in "-slow" gets its
  stream events --slow-delay seconds apart (default SLOW_DELAY_S), to see whether the gateway relays
  them as they come, or to hold streams open (bench/hold.py).

For the failover scenario (bench/failover.py):
  POST /_bench/outage         {"mode": "503" | "refuse", "seconds": S}: for S seconds answer 503 to
                              every API request, or close the listening socket and every open
                              connection (connections refused), then serve again
  GET  /_bench/log            {"served": [...], "outages": [...]}: perf_counter() (CLOCK_MONOTONIC,
                              the harness's clock too) of every 200 API answer since the last call
                              (with --record), and of each outage's start and actual end

Any Authorization, x-api-key or api-key header is accepted; a request without one gets 401.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import time
from array import array
from typing import Any, cast

import httptools
import orjson
import uvloop

TEXT = "The quick brown fox jumps over the lazy dog while the gateway relays every token of this answer"
WORDS = TEXT.split()
MAX_CHUNKS = 4096  # a client asking max_tokens=1e9 must not make the mock allocate gigabytes
API_ROUTES = (b"/v1/chat/completions", b"/v1/embeddings", b"/v1/messages", b"/v2/chat")
AZURE_MODEL = "gpt-4o-2024-08-06"  # Azure names the deployment's model, not the deployment
_SAFE = {"filtered": False, "severity": "safe"}
_UNDETECTED = {"filtered": False, "detected": False}
AZURE_PROMPT_FILTER = {
    "hate": _SAFE,
    "jailbreak": _UNDETECTED,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
AZURE_CHOICE_FILTER = {
    "hate": _SAFE,
    "protected_material_code": _UNDETECTED,
    "protected_material_text": _UNDETECTED,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
AZURE_PATH = (b"/openai/deployments/", b"/chat/completions")
SLOW_SUFFIX, SLOW_DELAY_S = "-slow", 0.02


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _framed(events: list[bytes]) -> list[bytes]:
    """SSE events as HTTP chunks, the terminating chunk joined to the last one."""
    out = [_chunk(e) for e in events]
    out[-1] += b"0\r\n\r\n"
    return out


def _sse(data: dict[str, Any]) -> bytes:
    """An event as Anthropic and Cohere send it: its type on an `event:` line, then the JSON."""
    return b"event: %b\ndata: %b\n\n" % (data["type"].encode(), orjson.dumps(data))


def _head(status: bytes, ctype: bytes, length: int, keep_alive: bool) -> bytes:
    return (
        b"HTTP/1.1 %b\r\ncontent-type: %b\r\ncontent-length: %d\r\n"
        b"x-request-id: req_mock\r\nopenai-processing-ms: 0\r\n%b\r\n"
    ) % (status, ctype, length, b"" if keep_alive else b"connection: close\r\n")


def _error(status: bytes, message: str, keep_alive: bool, kind: str = "invalid_request_error") -> bytes:
    error = {"message": message, "type": kind, "param": None, "code": None}
    body = orjson.dumps({"error": error})
    return _head(status, b"application/json", len(body), keep_alive) + body


class Answers:
    """Builds response bytes; the per-word stream deltas are rendered once at start."""

    def __init__(self, chunks: int, embed_dim: int) -> None:
        self.chunks = chunks
        self.ids = itertools.count(1)
        # OpenAI's choices (role, per-word content, finish), and Azure's: the same plus its filter results.
        self.choices = {azure: self._choices(azure) for azure in (False, True)}
        self.azure_prompt_filter = b"data: %b\n\n" % orjson.dumps(
            {
                "choices": [],
                "created": 0,
                "id": "",
                "model": "",
                "object": "",
                "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": AZURE_PROMPT_FILTER}],
            }
        )
        self.anthropic_deltas = [
            _sse(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w + " "}}
            )
            for w in WORDS
        ]
        self.cohere_deltas = [
            _sse({"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": w + " "}}}})
            for w in WORDS
        ]
        self.vector = orjson.dumps([round(((i * 7919) % 1000) / 1000 - 0.5, 6) for i in range(embed_dim)])
        model = {"id": "mock-gpt-upstream", "object": "model", "created": 1700000000, "owned_by": "mock"}
        self.models = orjson.dumps({"object": "list", "data": [model]})

    @staticmethod
    def _choices(azure: bool) -> tuple[bytes, list[bytes], bytes]:
        # Azure rates each piece of content; role and finish chunks carry `{}`.
        rated = b',"content_filter_results":%b' % orjson.dumps(AZURE_CHOICE_FILTER) if azure else b""
        empty = b',"content_filter_results":{}' if azure else b""
        choice = b'[{"index":0,"delta":%b,"logprobs":null,"finish_reason":%b%b}]'
        return (
            choice % (b'{"role":"assistant","content":""}', b"null", empty),
            [choice % (b'{"content":%b}' % orjson.dumps(w + " "), b"null", rated) for w in WORDS],
            choice % (b"{}", b'"stop"', empty),
        )

    def n_tokens(self, req: dict[str, Any]) -> int:
        n = req.get("max_tokens") or req.get("max_completion_tokens") or self.chunks
        return max(1, min(int(n), MAX_CHUNKS)) if isinstance(n, int) else self.chunks

    @staticmethod
    def prompt_tokens(req: dict[str, Any]) -> int:
        msgs = req.get("messages")
        if not isinstance(msgs, list):
            return 1
        return 1 + sum(len(str(m.get("content", ""))) // 4 for m in msgs if isinstance(m, dict))

    def chat(self, req: dict[str, Any], model: str) -> bytes:
        n, pt = self.n_tokens(req), self.prompt_tokens(req)
        content = " ".join(WORDS[i % len(WORDS)] for i in range(n))
        return orjson.dumps(
            {
                "id": f"chatcmpl-mock{next(self.ids):010d}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": pt, "completion_tokens": n, "total_tokens": pt + n},
                "system_fingerprint": "fp_mock",
            }
        )

    def stream(self, req: dict[str, Any], model: str, azure: bool = False) -> list[bytes]:
        """SSE events, each already framed as one HTTP chunk."""
        n, pt = self.n_tokens(req), self.prompt_tokens(req)
        opts = req.get("stream_options")
        usage = isinstance(opts, dict) and opts.get("include_usage") is True
        head = (
            b'data: {"id":"chatcmpl-mock%010d","object":"chat.completion.chunk","created":%d,'
            b'"model":%b,"system_fingerprint":"fp_mock","choices":'
            % (next(self.ids), int(time.time()), orjson.dumps(model))
        )
        tail = b',"usage":null}\n\n' if usage else b"}\n\n"
        role, deltas, finish = self.choices[azure]
        choices = [role, *(deltas[i % len(deltas)] for i in range(n)), finish]
        events = [self.azure_prompt_filter] if azure else []
        events += (head + c + tail for c in choices)
        if usage:
            events.append(
                head + b'[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,'
                b'"total_tokens":%d}}\n\n' % (pt, n, pt + n)
            )
        events.append(b"data: [DONE]\n\n")
        return _framed(events)

    def anthropic_stream(self, req: dict[str, Any], model: str) -> list[bytes]:
        n = self.n_tokens(req)
        usage = {
            "input_tokens": self.prompt_tokens(req),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 1,
            "service_tier": "standard",
        }
        message: dict[str, Any] = {
            "id": f"msg_mock{next(self.ids):010d}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        stop = {"stop_reason": "end_turn", "stop_sequence": None}
        return _framed(
            [
                _sse({"type": "message_start", "message": message}),
                _sse(
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
                ),
                _sse({"type": "ping"}),
                *(self.anthropic_deltas[i % len(self.anthropic_deltas)] for i in range(n)),
                _sse({"type": "content_block_stop", "index": 0}),
                _sse({"type": "message_delta", "delta": stop, "usage": {"output_tokens": n}}),
                _sse({"type": "message_stop"}),
            ]
        )

    def cohere_stream(self, req: dict[str, Any]) -> list[bytes]:
        n, billed = self.n_tokens(req), self.prompt_tokens(req)
        empty = {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}
        content = {"message": {"content": {"type": "text", "text": ""}}}
        usage = {  # Cohere counts its own prompt template in `tokens`, not in `billed_units`
            "billed_units": {"input_tokens": billed, "output_tokens": n},
            "tokens": {"input_tokens": billed + 7, "output_tokens": n},
        }
        ident = f"0c0e0e00-0000-4000-8000-{next(self.ids):012d}"
        return _framed(
            [
                _sse({"id": ident, "type": "message-start", "delta": {"message": empty}}),
                _sse({"type": "content-start", "index": 0, "delta": content}),
                *(self.cohere_deltas[i % len(self.cohere_deltas)] for i in range(n)),
                _sse({"type": "content-end", "index": 0}),
                _sse({"type": "message-end", "delta": {"finish_reason": "COMPLETE", "usage": usage}}),
                b"data: [DONE]\n\n",
            ]
        )

    def embeddings(self, req: dict[str, Any], model: str) -> bytes:
        inp = req.get("input", "")
        items = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
        data = b",".join(
            b'{"object":"embedding","index":%d,"embedding":%b}' % (i, self.vector) for i in range(len(items))
        )
        toks = sum(max(1, len(str(x)) // 4) for x in items)
        usage = b'"usage":{"prompt_tokens":%d,"total_tokens":%d}' % (toks, toks)
        return b'{"object":"list","data":[%b],"model":%b,%b}' % (data, orjson.dumps(model), usage)


class Mock:
    """The listening server, its answers, and the outages and answer times the failover scenario uses."""

    def __init__(
        self, host: str, port: int, answers: Answers, record: bool, slow_delay: float = SLOW_DELAY_S
    ) -> None:
        self.host, self.port, self.answers, self.record = host, port, answers, record
        self.slow_delay = slow_delay
        self.served = array("d")  # perf_counter() of each 200 API answer, when recording
        self.outages: list[dict[str, Any]] = []
        self.failing_until = 0.0  # 503 to every API request until then (perf_counter)
        self.server: asyncio.AbstractServer | None = None
        self.conns: set[Connection] = set()

    async def listen(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Connection(self), self.host, self.port, backlog=1024)

    def outage(self, mode: str, seconds: float) -> dict[str, Any]:
        now = time.perf_counter()
        outage: dict[str, Any] = {"mode": mode, "down": now, "up": now + seconds}
        self.outages.append(outage)
        if mode == "503":
            self.failing_until = now + seconds
        else:
            asyncio.get_running_loop().call_soon(self._refuse, outage, seconds)
        return outage

    def _refuse(self, outage: dict[str, Any], seconds: float) -> None:
        # Called after the control answer was written: close() flushes it before the FIN.
        assert self.server is not None
        self.server.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()

        async def reopen() -> None:
            await self.listen()
            outage["up"] = time.perf_counter()  # when connections are accepted again

        asyncio.get_running_loop().call_later(seconds, lambda: asyncio.ensure_future(reopen()))

    def log(self) -> bytes:
        out = orjson.dumps({"served": self.served.tolist(), "outages": self.outages})
        self.served = array("d")
        return out


class Connection(asyncio.Protocol):
    def __init__(self, mock: Mock) -> None:
        self.mock = mock
        self.answers = mock.answers
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.authorized = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.mock.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.mock.conns.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._write(_error(b"400 Bad Request", f"malformed HTTP: {exc}", False), False)

    def on_message_begin(self) -> None:
        self.url, self.body, self.authorized = b"", [], False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # OpenAI and Cohere: Authorization; Anthropic: x-api-key; Azure: api-key.
        if len(name) in (13, 9, 7) and name.lower() in (b"authorization", b"x-api-key", b"api-key") and value:
            self.authorized = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        method, (path, _, query) = self.parser.get_method(), self.url.partition(b"?")
        if not self.authorized:
            self._write(_error(b"401 Unauthorized", "missing Authorization header", keep_alive), keep_alive)
        elif path.startswith(b"/_bench/"):
            self._control(method, path, keep_alive)
        elif self.mock.failing_until and time.perf_counter() < self.mock.failing_until:
            message = "mock outage: service unavailable"
            self._write(_error(b"503 Service Unavailable", message, keep_alive, "server_error"), keep_alive)
        elif method == b"GET" and path == b"/v1/models":
            self._json(self.answers.models, keep_alive)
        elif method == b"POST" and path in API_ROUTES:
            self._post(path, keep_alive)
        elif method == b"POST" and path.startswith(AZURE_PATH[0]) and path.endswith(AZURE_PATH[1]):
            if b"api-version=" in query:
                self._post(path, keep_alive)
            else:  # as Azure answers a request without its api-version
                self._write(_error(b"404 Not Found", "Resource not found", keep_alive), keep_alive)
        else:
            message = f"no route {method.decode()} {path.decode(errors='replace')}"
            self._write(_error(b"404 Not Found", message, keep_alive), keep_alive)

    def _control(self, method: bytes, path: bytes, keep_alive: bool) -> None:
        if method == b"GET" and path == b"/_bench/log":
            self._json(self.mock.log(), keep_alive)
            return
        try:
            req = orjson.loads(b"".join(self.body))
            mode, seconds = req["mode"], float(req["seconds"])
            ok = method == b"POST" and path == b"/_bench/outage" and mode in ("503", "refuse") and seconds > 0
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            message = 'expected POST /_bench/outage {"mode": "503" | "refuse", "seconds": S > 0}'
            self._write(_error(b"400 Bad Request", message, keep_alive), keep_alive)
            return
        self._json(orjson.dumps(self.mock.outage(mode, seconds)), keep_alive)

    def _post(self, path: bytes, keep_alive: bool) -> None:
        try:
            req = orjson.loads(b"".join(self.body))
        except orjson.JSONDecodeError as exc:
            req = f"invalid JSON: {exc}"
        if not isinstance(req, dict):
            message = f"body must be a JSON object, got {req!s:.100}"
            self._write(_error(b"400 Bad Request", message, keep_alive), keep_alive)
            return
        model = req.get("model")
        if not isinstance(model, str):
            model = "mock-gpt-upstream"
        stream = req.get("stream") is True
        azure = path.startswith(AZURE_PATH[0])
        name = path[len(AZURE_PATH[0]) : -len(AZURE_PATH[1])].decode() if azure else model
        delay = self.mock.slow_delay if name.endswith(SLOW_SUFFIX) else 0.0
        if path == b"/v1/embeddings":
            self._json(self.answers.embeddings(req, model), keep_alive)
        elif path in (b"/v1/messages", b"/v2/chat"):
            if not stream:
                message = "this mock serves only streams on this route"
                self._write(_error(b"400 Bad Request", message, keep_alive), keep_alive)
                return
            anthropic = path == b"/v1/messages"
            self._stream(
                self.answers.anthropic_stream(req, model) if anthropic else self.answers.cohere_stream(req),
                keep_alive,
                delay,
            )
        elif azure:
            if stream:
                self._stream(self.answers.stream(req, AZURE_MODEL, azure=True), keep_alive, delay)
            else:
                self._json(self.answers.chat(req, AZURE_MODEL), keep_alive)
        elif stream:
            self._stream(self.answers.stream(req, model), keep_alive, delay)
        else:
            self._json(self.answers.chat(req, model), keep_alive)
        if self.mock.record:
            self.mock.served.append(time.perf_counter())

    def _json(self, body: bytes, keep_alive: bool) -> None:
        self._write(_head(b"200 OK", b"application/json", len(body), keep_alive) + body, keep_alive)

    def _stream(self, events: list[bytes], keep_alive: bool, delay: float = 0.0) -> None:
        if self.transport is None:
            return
        head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\nx-request-id: req_mock\r\n"
            + (b"" if keep_alive else b"connection: close\r\n")
            + b"\r\n"
        )
        # One write per event, as a real upstream sends them, so the reader sees separate segments.
        self.transport.write(head + events[0])
        if delay:
            later = asyncio.get_running_loop().call_later
            for i, event in enumerate(events[1:-1], 1):
                later(delay * i, self._send, event)
            later(delay * (len(events) - 1), self._write, events[-1], keep_alive)
            return
        for event in events[1:-1]:
            self.transport.write(event)
        self._write(events[-1], keep_alive)

    def _send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _write(self, data: bytes, keep_alive: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(data)
        if not keep_alive:
            self.transport.close()


async def serve(mock: Mock) -> None:
    loop = asyncio.get_running_loop()
    await mock.listen()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"mock upstream on http://{mock.host}:{mock.port}/v1", flush=True)
    await stop.wait()
    if mock.server is not None:
        mock.server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chunks", type=int, default=20, help="content chunks per stream without max_tokens")
    ap.add_argument("--embed-dim", type=int, default=1536)
    ap.add_argument("--record", action="store_true", help="keep the time of every 200 answer (/_bench/log)")
    ap.add_argument(
        "--slow-delay", type=float, default=SLOW_DELAY_S, help="seconds between a -slow model's events"
    )
    args = ap.parse_args()
    answers = Answers(args.chunks, args.embed_dim)
    uvloop.run(serve(Mock(args.host, args.port, answers, args.record, args.slow_delay)))


if __name__ == "__main__":
    main()
