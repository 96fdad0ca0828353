"""An attempt's upstream error answer, and how a failed request ends.

An upstream error body in the provider's own error shape reaches the client as OpenAI's shape,
its message kept (the provider key masked). Any other body (a CDN's HTML 502 page, a plain-text
503, JSON of another shape) is not shown: the client gets a short message of ours naming the
status, provider, deployment and request id, and the body goes to the log, truncated and masked.

A failure is answered as a JSON error response, or, once the response head has gone out (a
stream's heartbeats), as the one final SSE `error` event the SDKs raise.
"""

from __future__ import annotations

import contextlib
import logging

import orjson

from gateway.context import RequestContext
from gateway.errors import GatewayError, UpstreamError
from gateway.routing.router import Route
from gateway.types import Send
from gateway.upstream import UpstreamResponse

log = logging.getLogger("gateway.forward")

_ERROR_BODY_LIMIT = 65536  # read at most this much of an error body
LOGGED_BYTES = 500  # of an error body, in its log line
_RETRY_HEADERS = frozenset({b"retry-after", b"retry-after-ms"})  # the SDKs honour both


class Failed:
    """An attempt's upstream error answer, kept in case it is the last one."""

    __slots__ = ("body", "headers", "route", "status")

    def __init__(self, route: Route, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.route = route
        self.status = status
        self.body = body
        self.headers = headers


async def read_error(ctx: RequestContext, route: Route, response: UpstreamResponse) -> Failed:
    """`response`'s error answer in OpenAI's shape, with the provider key masked; logged once."""
    raw = b""
    with contextlib.suppress(UpstreamError):  # a body cut short: what arrived is all there is to show
        async for chunk in response:
            raw += chunk
            if len(raw) > _ERROR_BODY_LIMIT:
                break
    adapter = route.adapter
    raw = adapter.keys.mask(raw)
    status, body = adapter.translate_error(response.status, raw)
    # `%r`: an HTML page's line breaks stay on the one log line (the log's masker hides any other secret).
    text = raw[:LOGGED_BYTES].decode("utf-8", "replace")
    log.warning(
        "upstream %s answered %d (request %s): %r", route.id, response.status, ctx.request_id.decode(), text
    )
    if body is None:
        message = (
            f"Upstream provider '{adapter.name}' (deployment {route.id}) answered HTTP {response.status}; "
            f"request id {ctx.request_id.decode()}."
        )
        error = {"message": message, "type": "upstream_error", "param": None, "code": None}
        body = orjson.dumps({"error": error})
    headers = [(k, v) for k, v in response.headers if k in _RETRY_HEADERS]
    return Failed(route, status, body, headers)


def error_event(body: bytes) -> bytes:
    """The final SSE event of a stream that cannot go on; the SDKs raise it as an APIError."""
    return b"event: error\ndata: " + body + b"\n\n"


async def send_failure(
    ctx: RequestContext,
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """Answer with an error: a whole JSON response, or the stream's last event if it has begun."""
    ctx.status = status  # the access log's and cache's view, even where the wire said 200 already
    if ctx.responded:
        await send({"type": "http.response.body", "body": error_event(body)})
        return
    ctx.responded = True
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def send_error(ctx: RequestContext, send: Send, exc: GatewayError) -> None:
    """`exc` as the answer (`send_failure`)."""
    await send_failure(ctx, send, exc.status, exc.body(), [*exc.headers, *ctx.headers()])
