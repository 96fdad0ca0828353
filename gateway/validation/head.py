"""Bounds the request head before anything reads it: 431 for a header line or a whole head too large.

nginx's defaults (`large_client_header_buffers 4 8k`): one line (the request
line or a header, without its CRLF) at most 8 KiB, the whole head at most
32 KiB. A request line over the line bound is 414, as nginx answers. Sizes are
counted as the server hands the head over (names lowercased, `: ` between name
and value, CRLF after each line), before auth, so an oversized head never reaches a key lookup.

The server has read the whole head before any ASGI layer runs, and uvicorn's
httptools parser has no bound of its own: `protocol.py` stops a head past the
bound while it arrives under `gateway serve`; under another server, nginx in
front bounds what it buffers.
"""

from __future__ import annotations

from gateway.errors import HeadTooLarge, URITooLong
from gateway.types import ASGIApp, Receive, Scope, Send

_CRLF = 2
_SEP = 2  # ": " between a header's name and its value
_VERSION = len(b" HTTP/1.1")
_SHOWN = 64  # characters of an oversized header's name named in the refusal


class HeadLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_line_bytes: int, max_head_bytes: int) -> None:
        self.app = app
        self.max_line = max_line_bytes
        self.max_head = max_head_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self.check(scope)
        if error is None:
            await self.app(scope, receive, send)
        else:
            await scope["gateway"].send_error(send, error)

    def check(self, scope: Scope) -> HeadTooLarge | URITooLong | None:
        query = scope.get("query_string", b"")
        target = len(scope.get("raw_path") or scope["path"].encode()) + (len(query) + 1 if query else 0)
        line = len(scope["method"]) + 1 + target + _VERSION
        if line > self.max_line:
            return URITooLong(f"The request line is {line} bytes, over the limit of {self.max_line} bytes.")
        headers = scope["headers"]
        total = line + _CRLF + _CRLF  # the request line's CRLF and the blank line that ends the head
        for name, value in headers:
            total += len(name) + len(value)
        total += (_SEP + _CRLF) * len(headers)
        # A head under the line bound has no line over it: the common case stops here.
        if total > self.max_line:
            for name, value in headers:
                size = len(name) + _SEP + len(value)
                if size > self.max_line:
                    shown = name[:_SHOWN].decode("latin-1")
                    return HeadTooLarge(
                        f"Request header fields too large: the '{shown}' header line is {size} bytes, "
                        f"over the limit of {self.max_line} bytes."
                    )
        if total > self.max_head:
            return HeadTooLarge(
                f"Request header fields too large: the request head is {total} bytes, "
                f"over the limit of {self.max_head} bytes."
            )
        return None
