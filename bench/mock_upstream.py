"""Zero-delay mock of the OpenAI API, the upstream of the benchmark.

A raw asyncio protocol on uvloop with the httptools parser, so its own cost (tens of µs per
request) stays small next to the gateway it serves. HTTP/1.1 keep-alive; every answer is written
synchronously, which also keeps pipelined requests in order.

  POST /v1/chat/completions   chat.completion JSON (content-length), or with "stream": true an SSE
                              stream (chunked): role chunk, N content chunks, finish chunk, a usage
                              chunk when stream_options.include_usage, then `data: [DONE]`.
                              N = max_tokens (or max_completion_tokens), else --chunks.
  POST /v1/embeddings         one --embed-dim vector per input
  GET  /v1/models             the model list

Any Authorization header is accepted; a request without one gets 401.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import time
from typing import Any, cast

import httptools
import orjson
import uvloop

TEXT = "The quick brown fox jumps over the lazy dog while the gateway relays every token of this answer"
WORDS = TEXT.split()
MAX_CHUNKS = 4096  # a client asking max_tokens=1e9 must not make the mock allocate gigabytes


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _head(status: bytes, ctype: bytes, length: int, keep_alive: bool) -> bytes:
    return (
        b"HTTP/1.1 %b\r\ncontent-type: %b\r\ncontent-length: %d\r\n"
        b"x-request-id: req_mock\r\nopenai-processing-ms: 0\r\n%b\r\n"
    ) % (status, ctype, length, b"" if keep_alive else b"connection: close\r\n")


def _error(status: bytes, message: str, keep_alive: bool) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    body = orjson.dumps({"error": error})
    return _head(status, b"application/json", len(body), keep_alive) + body


class Answers:
    """Builds response bytes; the per-word stream deltas are rendered once at start."""

    def __init__(self, chunks: int, embed_dim: int) -> None:
        self.chunks = chunks
        self.ids = itertools.count(1)
        self.deltas = [
            b'[{"index":0,"delta":{"content":%b},"logprobs":null,"finish_reason":null}]'
            % orjson.dumps(w + " ")
            for w in WORDS
        ]
        self.vector = orjson.dumps([round(((i * 7919) % 1000) / 1000 - 0.5, 6) for i in range(embed_dim)])
        model = {"id": "mock-gpt-upstream", "object": "model", "created": 1700000000, "owned_by": "mock"}
        self.models = orjson.dumps({"object": "list", "data": [model]})

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

    def stream(self, req: dict[str, Any], model: str) -> list[bytes]:
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
        choices = [
            b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
        ]
        choices += (self.deltas[i % len(self.deltas)] for i in range(n))
        choices.append(b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]')
        events = [_chunk(head + c + tail) for c in choices]
        if usage:
            events.append(
                _chunk(
                    head + b'[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,'
                    b'"total_tokens":%d}}\n\n' % (pt, n, pt + n)
                )
            )
        events.append(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        return events

    def embeddings(self, req: dict[str, Any], model: str) -> bytes:
        inp = req.get("input", "")
        items = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
        data = b",".join(
            b'{"object":"embedding","index":%d,"embedding":%b}' % (i, self.vector) for i in range(len(items))
        )
        toks = sum(max(1, len(str(x)) // 4) for x in items)
        usage = b'"usage":{"prompt_tokens":%d,"total_tokens":%d}' % (toks, toks)
        return b'{"object":"list","data":[%b],"model":%b,%b}' % (data, orjson.dumps(model), usage)


class Connection(asyncio.Protocol):
    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.authorized = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

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
        if len(name) == 13 and name.lower() == b"authorization" and value:
            self.authorized = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        method, path = self.parser.get_method(), self.url.partition(b"?")[0]
        if not self.authorized:
            self._write(_error(b"401 Unauthorized", "missing Authorization header", keep_alive), keep_alive)
        elif method == b"GET" and path == b"/v1/models":
            self._json(self.answers.models, keep_alive)
        elif method == b"POST" and path in (b"/v1/chat/completions", b"/v1/embeddings"):
            self._post(path, keep_alive)
        else:
            message = f"no route {method.decode()} {path.decode(errors='replace')}"
            self._write(_error(b"404 Not Found", message, keep_alive), keep_alive)

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
        if path == b"/v1/embeddings":
            self._json(self.answers.embeddings(req, model), keep_alive)
        elif req.get("stream") is True:
            self._stream(self.answers.stream(req, model), keep_alive)
        else:
            self._json(self.answers.chat(req, model), keep_alive)

    def _json(self, body: bytes, keep_alive: bool) -> None:
        self._write(_head(b"200 OK", b"application/json", len(body), keep_alive) + body, keep_alive)

    def _stream(self, events: list[bytes], keep_alive: bool) -> None:
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
        for event in events[1:-1]:
            self.transport.write(event)
        self._write(events[-1], keep_alive)

    def _write(self, data: bytes, keep_alive: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(data)
        if not keep_alive:
            self.transport.close()


async def serve(host: str, port: int, answers: Answers) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(answers), host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"mock upstream on http://{host}:{port}/v1", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chunks", type=int, default=20, help="content chunks per stream without max_tokens")
    ap.add_argument("--embed-dim", type=int, default=1536)
    args = ap.parse_args()
    uvloop.run(serve(args.host, args.port, Answers(args.chunks, args.embed_dim)))


if __name__ == "__main__":
    main()
