"""Reads a hot route's JSON body once, within a size bound, and validates it before anything is charged.

Everything later (limits, cache, router, adapters) reads `ctx.body`, the parsed
dict; nobody parses the request again. The body is checked against its
operation's schema (`validate.py`): types, ranges, required fields, roles and
content shapes, as OpenAI documents them. Fields no schema declares pass untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import BodyTooLarge, GatewayError, InvalidRequest, MethodNotAllowed, UnsupportedMediaType
from gateway.providers import Operation
from gateway.types import ASGIApp, Receive, Scope, Send
from gateway.validation.validate import validate

MAX_DEPTH = 64


def is_json(content_type: bytes) -> bool:
    """application/json or a +json type, any parameters (charset) aside."""
    if content_type == b"application/json":  # what the SDKs send
        return True
    media = content_type.partition(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


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
    validate(body, op)
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
        # Both refusals come before reading: the declared size or type is already wrong.
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    raise too_large if value.isdigit() else InvalidRequest("Invalid Content-Length header.")
            elif name == b"content-type" and not is_json(value):
                # No Content-Type at all is let through: some clients omit it for a JSON body.
                shown = value[:100].decode("latin-1")
                raise UnsupportedMediaType(
                    f"Unsupported Content-Type '{shown}': "
                    "send the body as JSON with 'Content-Type: application/json'."
                )
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
