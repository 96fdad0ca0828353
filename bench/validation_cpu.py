"""CPU per request of request validation and the head bound (run pinned: taskset -c 0).

taskset -c 0 .venv/bin/python -m bench.validation_cpu

For a typical body of each operation (chat with tools, a tool round trip and
multi-part content; a short chat; completions; a batch of embeddings; images):
`parse` is orjson alone (what the gateway paid before validation), `validate`
the schema check of the parsed dict, `body layer` the whole of it as the
gateway runs it (parse, depth and model checks, validate). `head` is the head
bound over the 17 headers the openai SDK sends. Figures are process CPU per
call, the best of 5 rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.context import RequestContext
from gateway.providers import Operation
from gateway.validation.head import HeadLimitMiddleware
from gateway.validation.middleware import parse
from gateway.validation.validate import validate

ROUNDS = 5
CALLS = 50_000
TARGET_US = 10.0

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
    "additionalProperties": False,
}
CHAT_TOOLS = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly; call tools when needed."},
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "What's the weather in Paris and Berlin? And what is in this picture?",
                },
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Berlin"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18, "sky": "cloudy"}'},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"temp_c": 15, "sky": "rain"}'},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city",
                "parameters": WEATHER,
                "strict": True,
            },
        },
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "description": "Local time in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        },
    ],
    "tool_choice": "auto",
    "temperature": 0.2,
    "max_tokens": 512,
    "stream": True,
    "stream_options": {"include_usage": True},
    "user": "user-1234",
}
CHAT_SHORT = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a haiku about request validation."},
    ],
    "temperature": 0.7,
    "max_tokens": 128,
}
COMPLETIONS = {
    "model": "gpt-3.5-turbo-instruct",
    "prompt": "Translate to French: The gateway refuses a request it cannot serve.",
    "max_tokens": 64,
    "temperature": 0,
    "stop": ["\n"],
}
EMBEDDINGS = {
    "model": "text-embedding-3-small",
    "input": [f"document {i}: a paragraph of text to embed for search" for i in range(16)],
    "encoding_format": "base64",
    "dimensions": 512,
}
IMAGES = {
    "model": "dall-e-3",
    "prompt": "A lighthouse at dusk, oil painting",
    "n": 1,
    "size": "1024x1024",
    "quality": "standard",
    "response_format": "url",
}

BODIES: list[tuple[str, Operation, dict[str, Any]]] = [
    ("chat, tools + parts", Operation.chat, CHAT_TOOLS),
    ("chat, short", Operation.chat, CHAT_SHORT),
    ("completions", Operation.completions, COMPLETIONS),
    ("embeddings x16", Operation.embeddings, EMBEDDINGS),
    ("images", Operation.images, IMAGES),
]

SDK_HEADERS = [
    (b"host", b"127.0.0.1:8080"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"accept", b"application/json"),
    (b"content-type", b"application/json"),
    (b"user-agent", b"OpenAI/Python 1.99.9"),
    (b"x-stainless-lang", b"python"),
    (b"x-stainless-package-version", b"1.99.9"),
    (b"x-stainless-os", b"Linux"),
    (b"x-stainless-arch", b"x64"),
    (b"x-stainless-runtime", b"CPython"),
    (b"x-stainless-runtime-version", b"3.11.7"),
    (b"authorization", b"Bearer sk-bench-key-00000500-abcdef"),
    (b"x-stainless-async", b"false"),
    (b"x-stainless-retry-count", b"0"),
    (b"x-stainless-read-timeout", b"600"),
    (b"content-length", b"1405"),
]


def cpu_us(call: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.process_time()
        for _ in range(CALLS):
            call()
        best = min(best, time.process_time() - start)
    return best / CALLS * 1e6


def main() -> None:
    print(f"{'body':<22}{'bytes':>7}{'parse':>9}{'validate':>10}{'body layer':>12}   (us CPU per request)")
    worst = 0.0
    for name, op, body in BODIES:
        raw = orjson.dumps(body)
        parsed = orjson.loads(raw)
        loads = cpu_us(lambda raw=raw: orjson.loads(raw))
        check = cpu_us(lambda parsed=parsed, op=op: validate(parsed, op))
        layer = cpu_us(lambda raw=raw, op=op: parse(raw, op))
        worst = max(worst, check)
        print(f"{name:<22}{len(raw):>7}{loads:>9.2f}{check:>10.2f}{layer:>12.2f}")
    head = HeadLimitMiddleware(None, max_line_bytes=8192, max_head_bytes=32768)  # type: ignore[arg-type]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": SDK_HEADERS,
        "gateway": RequestContext(b"r", 0.0),
    }
    head_us = cpu_us(lambda: head.check(scope))
    print(f"head bound, {len(SDK_HEADERS)} SDK headers: {head_us:.2f} us CPU per request")
    verdict = "within" if worst <= TARGET_US else "OVER"
    print(f"validation, worst typical body: {worst:.2f} us ({verdict} the {TARGET_US:.0f} us target)")


if __name__ == "__main__":
    main()
