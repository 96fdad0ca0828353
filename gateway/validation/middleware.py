"""Reads a hot route's JSON body once, within a size bound, and checks the fields routing needs.

Everything later (limits, cache, router, adapters) reads `ctx.body`; nobody
parses the request again. Fields the upstream alone cares about are left to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import BodyTooLarge, GatewayError, InvalidRequest, MethodNotAllowed
from gateway.providers import Operation
from gateway.types import ASGIApp, Receive, Scope, Send

MAX_DEPTH = 64

# The field each operation cannot do without, and the JSON types it may have.
_REQUIRED: dict[Operation, tuple[str, tuple[type, ...], str]] = {
    Operation.chat: ("messages", (list,), "an array of message objects"),
    Operation.completions: ("prompt", (str, list), "a string or an array"),
    Operation.embeddings: ("input", (str, list), "a string or an array"),
    Operation.images: ("prompt", (str,), "a string"),
}


def _too_deep(node: Any, limit: int) -> bool:
    stack = [(node, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse(raw: bytes, op: Operation) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    # Counting brackets is C-speed; only a body that could be too deep is walked.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _too_deep(body, MAX_DEPTH):
        raise InvalidRequest(f"The request body is nested deeper than {MAX_DEPTH} levels.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("You must provide a model parameter as a non-empty string.", param="model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    if "stream_options" in body and not isinstance(body["stream_options"], (dict, type(None))):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    field, types, expected = _REQUIRED[op]
    value = body.get(field)
    if not isinstance(value, types) or (op is Operation.chat and not all(isinstance(m, dict) for m in value)):
        raise InvalidRequest(f"'{field}' is required and must be {expected}.", param=field)
    return body


class BodyMiddleware:
    def __init__(self, app: ASGIApp, *, routes: Mapping[str, Operation], max_bytes: int) -> None:
        self.app = app
        self.routes = routes
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        op = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if op is None:
            await self.app(scope, receive, send)
            return
        ctx = scope["gateway"]
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"Only POST is supported on {scope['path']}.")
            raw = await self.read(scope, receive)
            if raw is None:  # the client went away while sending
                return
            ctx.body = parse(raw, op)
            ctx.model = ctx.body["model"]
        except GatewayError as exc:
            await ctx.send_error(send, exc)
            return
        ctx.operation = op
        await self.app(scope, receive, send)

    async def read(self, scope: Scope, receive: Receive) -> bytes | None:
        too_large = BodyTooLarge(f"The request body exceeds the limit of {self.max_bytes} bytes.")
        for name, value in scope["headers"]:
            if name == b"content-length":
                # Refuse before reading: the declared size is already over.
                if not value.isdigit() or int(value) > self.max_bytes:
                    raise too_large if value.isdigit() else InvalidRequest("Invalid Content-Length header.")
                break
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
