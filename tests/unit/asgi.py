"""Drive an ASGI app in-process with a scripted client, capturing what it sends."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from gateway.context import RequestContext
from gateway.types import ASGIApp, Message


class Result:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.chunks: list[bytes] = []

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return orjson.loads(self.body)


def scope(path: str = "/v1/chat/completions", method: str = "POST", headers: list[tuple[bytes, bytes]] = ()) -> dict:  # type: ignore[assignment,type-arg]
    s: dict[str, Any] = {"type": "http", "path": path, "method": method, "headers": list(headers)}
    s["gateway"] = RequestContext(b"req_test", 0.0)
    return s


async def call(app: ASGIApp, s: dict, chunks: list[bytes] = (), disconnect: bool = False) -> Result:  # type: ignore[assignment,type-arg]
    messages: list[Message] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    if disconnect or not messages:
        messages.append({"type": "http.disconnect"})
    result = Result()

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            result.status = message["status"]
            result.headers = dict(message["headers"])
        else:
            result.chunks.append(message.get("body", b""))

    await app(s, receive, send)
    return result


def ok_app(seen: list[dict]) -> ASGIApp:  # type: ignore[type-arg]
    async def app(s: dict, receive: Any, send: Any) -> None:  # type: ignore[type-arg]
        seen.append(s)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app
