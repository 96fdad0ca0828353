"""GET /metrics on a port of its own (`metrics.port`): a minimal HTTP/1.1 server, one request per connection.

Every worker binds the port with SO_REUSEPORT, and any of them answers with the
replica's sum. Uvicorn is not reused: a second uvicorn server in a worker would
take over its signal handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.types import ASGIApp, Message

log = logging.getLogger("gateway.metrics")

_HEAD_LIMIT = 16384
_READ_S = 10.0
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
}


async def serve(app: ASGIApp, host: str, port: int) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _exchange(app, reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            log.debug("metrics port: %r", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, reuse_port=True, limit=_HEAD_LIMIT)


async def _exchange(app: ASGIApp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_S)
    request_line, *lines = head[:-4].split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        writer.write(_response(400, b"text/plain", b"bad request\n"))
        return
    method, target, _ = parts
    path = target.split(b"?", 1)[0].decode("latin-1")
    if path != "/metrics":
        writer.write(_response(404, b"text/plain", b"only /metrics here\n"))
        return
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    scope = {"type": "http", "method": method.decode("latin-1"), "path": path, "headers": headers}
    status = 500
    out = [b""]  # the head's header lines, then the body's pieces

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            out[0] = b"".join(name + b": " + value + b"\r\n" for name, value in message.get("headers", ()))
        else:
            out.append(message.get("body", b""))

    await app(scope, receive, send)
    head = b"HTTP/1.1 %d %s\r\nconnection: close\r\n" % (status, _REASONS.get(status, b""))
    writer.write(head + out[0] + b"\r\n" + b"".join(out[1:]))
    await writer.drain()


def _response(status: int, content_type: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
        status,
        _REASONS[status],
        content_type,
        len(body),
        body,
    )
